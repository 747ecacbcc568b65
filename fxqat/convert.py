"""``fxqat.convert``: QAT GraphModule → INT8 PyTorch GraphModule on oneDNN's quantized CPU kernels.

The QAT graph already says where every grid is (``insert_quantizers``): each quantizer node follows its producer,
shared ops sit on their inputs' grid. Conversion walks it once, tracking each value's domain — float, or uint8 on
(scale, zero_point) — and emits:

    ConvBnAct ─► FakeQuant      ==>  Int8ConvBnAct (BN folded, weights int8 per-channel, SiLU fused, uint8 out)
    float op ─► FakeQuant       ==>  float op ─► Quantize
    add ─► FakeQuant            ==>  Int8Add (requantized)
    cat / upsample / chunk      ==>  the same op on uint8 (inputs share one grid)
    maxpool                     ==>  Int8MaxPool
    uint8 value ─► float op     ==>  Dequantize ─► float op (DFL, decode, and the graph outputs)

Classes whose spec is not 8-bit (e.g. 16-bit activations) stay float with their fake-quantizer (simulated).
Last, the layout passes (``passes/int8_layout.py``) decide which tensors are copied and where.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .graph.meta import info
from .graph.patterns import op_kind
from .modules.conv_bn_act import ConvBnAct
from .modules.int8 import Dequantize, Int8Act, Int8Add, Int8ConvBnAct, Int8MaxPool, Quantize
from .passes.int8_layout import int8_layout_passes
from .passes.pipeline import run_passes
from .quant.fake_quant import FakeQuant

BACKENDS = ("onednn", "x86")


def _grid(fq: FakeQuant) -> tuple[float, int] | None:
    """(scale, zero_point) on the uint8 grid, or None if this quantizer cannot run on uint8 kernels."""
    s = fq.spec
    if s.bits != 8 or fq.ch_axis is not None or not bool(fq.initialized):
        return None
    scale, zp = float(fq.scale.reshape(-1)[0]), int(fq.zero_point.reshape(-1)[0])
    if s.symmetric:  # int8 [-128, 127] with zp 0 is the uint8 grid with zp 128
        zp += 128
    return scale, zp


def _int8_conv(m: ConvBnAct, xq: tuple[float, int], out: tuple[float, int] | None,
               act: str | None = None) -> Int8ConvBnAct:
    with torch.no_grad():
        w, b = m.folded()
        fq = m.weight_fq
        fq.observe(w)
        scale = fq.scale.detach().reshape(-1).float()
        if scale.numel() == 1:
            scale = scale.expand(w.shape[0]).contiguous()
        zp = fq.zero_point.reshape(-1)
        if zp.numel() == 1:
            zp = zp.expand(w.shape[0])
        wq = fq.codes(w)
        if bool((zp != 0).any()):
            raise ValueError("INT8 conversion needs symmetric weights (zero_point 0); set weight symmetric: true")
        return Int8ConvBnAct(wq.to(torch.int8), scale, b.detach(), m.conv, xq, out, act or m.act_kind)


def _reads_shape(n: fx.Node) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``: depends on the value's shape only."""
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in ("shape", "ndim")
    return n.op == "call_method" and n.target in ("size", "dim")


def convert(qat_model: fx.GraphModule, backend: str = "onednn") -> fx.GraphModule:
    """INT8 model computing what the QAT model computes in eval mode: the decoded predictions
    (B, 4 + nc, anchors), as Ultralytics returns them in export mode.

    ``backend``: "onednn" (default) or "x86" — both run oneDNN's fused INT8 convolutions here; "x86" also sets
    ``torch.backends.quantized.engine`` to x86 for any remaining torch.ao quantized op.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: valid choices are {', '.join(BACKENDS)}")
    if backend in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = backend
    src = copy.deepcopy(qat_model).cpu().eval()
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    dom: dict[fx.Node, tuple[float, int] | None] = {}  # None = float
    mods: dict[str, nn.Module] = {}
    deq_cache: dict[fx.Node, fx.Node] = {}

    def add_module(name: str, m: nn.Module) -> str:
        path = name.replace(".", "_")
        mods[path] = m
        return path

    def fq_of(n: fx.Node) -> FakeQuant | None:
        users = list(n.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(src.get_submodule(users[0].target),
                                                                           FakeQuant):
            return src.get_submodule(users[0].target)
        return None

    def as_float(n: fx.Node) -> fx.Node:
        if dom.get(n) is None:
            return env[n]
        if n not in deq_cache:
            path = add_module(f"dequant_{n.name}", Dequantize(*dom[n]))
            deq_cache[n] = g.call_module(path, (env[n],))
        return deq_cache[n]

    def float_args(n: fx.Node):
        return fx.node.map_arg(n.args, as_float), fx.node.map_arg(n.kwargs, as_float)

    for n in src.graph.nodes:
        kind = op_kind(src, n)
        if n.op == "placeholder":
            env[n], dom[n] = g.placeholder(n.name), None
        elif n.op == "output":
            g.output(fx.node.map_arg(n.args[0], as_float))
        elif kind == "quant":
            fq = src.get_submodule(n.target)
            p = n.args[0]
            grid = _grid(fq)
            if dom.get(p) is not None:  # producer already emits this grid
                env[n], dom[n] = env[p], dom[p]
            elif grid is not None:
                env[n] = g.call_module(add_module(f"quant_{p.name}", Quantize(*grid)), (env[p],))
                dom[n] = grid
            else:  # not 8-bit: keep simulating in float
                env[n] = g.call_module(add_module(f"fq_{p.name}", copy.deepcopy(fq)), (as_float(p),))
                dom[n] = None
        elif kind == "conv" and isinstance(src.get_submodule(n.target), ConvBnAct):
            m = src.get_submodule(n.target)
            x = n.args[0]
            out_fq = fq_of(n)
            out = _grid(out_fq) if out_fq is not None else None
            pre = _grid(m.preact_fq) if m.preact_fq is not None else None
            if m.weight_fq is not None and dom.get(x) is not None and (out_fq is None or out is not None) and \
                    (m.preact_fq is None or pre is not None):
                if pre is None:
                    env[n] = g.call_module(add_module(n.target, _int8_conv(m, dom[x], out)), (env[x],))
                else:  # conv to the pre-activation grid, then the activation between two grids
                    c = g.call_module(add_module(n.target, _int8_conv(m, dom[x], pre, act="none")), (env[x],))
                    env[n] = g.call_module(add_module(f"{n.target}_act", Int8Act(pre, out, m.act)), (c,))
                dom[n] = out
            else:
                env[n] = g.call_module(add_module(n.target, m), (as_float(x),))
                dom[n] = None
        elif kind == "add" and all(dom.get(a) is not None for a in n.args[:2]):
            out_fq = fq_of(n)
            out = _grid(out_fq) if out_fq is not None else None
            env[n] = g.call_module(add_module(f"add_{n.name}", Int8Add(dom[n.args[0]], dom[n.args[1]], out)),
                                   (env[n.args[0]], env[n.args[1]]))
            dom[n] = out
        elif kind in ("cat", "split", "resize", "pool") and n.all_input_nodes and \
                all(dom.get(a) is not None for a in n.all_input_nodes):
            grids = {dom[a] for a in n.all_input_nodes}
            assert len(grids) == 1, f"{n.name}: inputs on different grids {grids}"
            args, kwargs = fx.node.map_arg(n.args, lambda a: env[a]), fx.node.map_arg(n.kwargs, lambda a: env[a])
            if kind == "pool":
                env[n] = g.call_module(add_module(n.target, Int8MaxPool(src.get_submodule(n.target))), args)
            elif n.op == "call_module":
                env[n] = g.call_module(add_module(n.target, src.get_submodule(n.target)), args, kwargs)
            else:
                env[n] = g.create_node(n.op, n.target, args, kwargs, n.name)
            dom[n] = grids.pop()
        elif kind == "decode":  # the deployed model returns decoded predictions only; feats: shapes only
            m = copy.deepcopy(src.get_submodule(n.target))
            m.export, m.fast_dfl = True, True
            boxes, scores, feats = n.args
            env[n] = g.call_module(add_module(n.target, m), (as_float(boxes), as_float(scores),
                                                              [env[f] for f in feats]))
            dom[n] = None
        elif _reads_shape(n):  # a shape is the same on either grid: no dequantization just to read it
            env[n] = g.create_node(n.op, n.target, fx.node.map_arg(n.args, lambda a: env[a]), n.kwargs, n.name)
            dom[n] = None
        else:
            args, kwargs = float_args(n)
            if n.op == "call_module":
                env[n] = g.call_module(add_module(n.target, src.get_submodule(n.target)), args, kwargs)
            elif n.op == "get_attr":
                env[n] = g.get_attr(n.target)
            else:
                env[n] = g.create_node(n.op, n.target, args, kwargs, n.name)
            dom[n] = None
        if n in env and n.op not in ("placeholder", "output") and "fxqat" not in env[n].meta:
            env[n].meta["fxqat"] = copy.copy(info(n))  # a quantizer sharing its producer's node keeps its meta
    root = nn.Module()
    for path, m in mods.items():
        root.add_module(path, m)
    out = run_passes(fx.GraphModule(root, g, class_name="Int8YoloGraph"), int8_layout_passes())
    out.meta = {k: v for k, v in getattr(qat_model, "meta", {}).items() if k in ("names", "nc", "stride", "yaml")}
    out.eval()
    return out

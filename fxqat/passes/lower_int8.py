"""Pass (convert stage): lower the QAT graph to INT8 modules, one rule per op kind (``LOWERINGS``).

Walks the QAT graph once in order, tracking each value's domain — float, or uint8 on (scale, zero_point) — and
reading each node's annotation (``node.meta["fxqat"].qspec``: its weight spec, the grid its output lies on, whether
it shares its input's grid):

    conv   ConvBnAct on a grid          ==> Int8ConvBnAct (BN folded, int8 weights, SiLU fused, uint8 or float out);
                                            weights wider than 8 bits run float (FrozenConvBnAct: the same values)
    quant  FakeQuant after a float op   ==> Quantize (8-bit grids; other widths keep simulating in float)
    add    on a grid                    ==> Int8Add (requantized)
    cat / split / resize / detach (shared grid) ==> the same op on uint8;  pool ==> Int8MaxPool
    mean   on a grid                    ==> Int8GlobalAvgPool (exact integer sums, float out)
    identity                            ==> nothing: its input, on its grid (Dropout in eval)
    matmul / softmax                    ==> float (attention math; its inputs dequantized once)
    decode                              ==> the head's float tail, configured for deployment (fast DFL, export)
    other / io                          ==> float op; a uint8 value it reads is dequantized once

A registered op kind with no rule here is refused (``ConvertError`` naming the node), never silently run float.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ConvertError
from ..graph.meta import info
from ..graph.registry import op_kind
from ..modules.conv_bn_act import ConvBnAct, FrozenConvBnAct
from ..modules.int8 import Dequantize, Int8Act, Int8Add, Int8ConvBnAct, Int8GlobalAvgPool, Int8MaxPool, Quantize
from ..quant.fake_quant import FakeQuant
from ..quant.spec import NodeQSpec
from .base import FxqatPass
from .insert_quantizers import quantizer_path

Grid = tuple[float, int]


def uint8_grid(fq: FakeQuant) -> Grid | None:
    """(scale, zero_point) on the uint8 grid, or None if this quantizer cannot run on uint8 kernels."""
    s = fq.spec
    if s.bits != 8 or fq.ch_axis is not None or not bool(fq.initialized):
        return None
    scale, zp = fq.qparams()  # a learned (LSQ) scale: its positive value, as the forward uses it
    scale, zp = float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])
    if s.symmetric:  # int8 [-128, 127] with zp 0 is the uint8 grid with zp 128
        zp += 128
    return scale, zp


def int8_conv(m: ConvBnAct, xq: Grid, out: Grid | None, act: str | None = None) -> Int8ConvBnAct:
    codes, scale, bias = m.weight_codes()
    return Int8ConvBnAct(codes.to(torch.int8), scale, bias, m.conv, xq, out, act or m.act_kind)


def _reads_shape(n: fx.Node) -> bool:
    """``x.shape``, ``x.size(...)``, ``x.dim()``: depends on the value's shape only."""
    if n.op == "call_function" and n.target is getattr and len(n.args) > 1:
        return n.args[1] in ("shape", "ndim")
    return n.op == "call_method" and n.target in ("size", "dim")


class Lowering:
    """The state of one walk: the new graph, each old node's new value and domain (None = float)."""

    def __init__(self, src: fx.GraphModule):
        self.src, self.g = src, fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.dom: dict[fx.Node, Grid | None] = {}
        self.mods: dict[str, nn.Module] = {}
        self._deq: dict[fx.Node, fx.Node] = {}

    def module(self, n: fx.Node) -> nn.Module:
        return self.src.get_submodule(n.target)

    def add_module(self, name: str, m: nn.Module) -> str:
        path = name.replace(".", "_")
        self.mods[path] = m
        return path

    def call(self, name: str, m: nn.Module, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.g.call_module(self.add_module(name, m), args, kwargs or {})

    def output_quantizer(self, n: fx.Node) -> FakeQuant | None:
        """The quantizer of the grid the annotation puts ``n``'s output on (None: float output)."""
        q = info(n).qspec
        return self.src.get_submodule(quantizer_path(q.grid)) if isinstance(q, NodeQSpec) and q.grid else None

    def on_grid(self, *nodes: fx.Node) -> bool:
        return all(self.dom.get(a) is not None for a in nodes)

    def as_float(self, n: fx.Node) -> fx.Node:
        if self.dom.get(n) is None:
            return self.env[n]
        if n not in self._deq:
            self._deq[n] = self.call(f"dequant_{n.name}", Dequantize(*self.dom[n]), (self.env[n],))
        return self._deq[n]

    def same_op(self, n: fx.Node, args, kwargs) -> fx.Node:
        if n.op == "call_module":
            return self.call(n.target, self.module(n), args, kwargs)
        if n.op == "get_attr":
            return self.g.get_attr(n.target)
        return self.g.create_node(n.op, n.target, args, kwargs, n.name)

    def set(self, n: fx.Node, value: fx.Node, grid: Grid | None) -> None:
        self.env[n], self.dom[n] = value, grid


# ------------------------------------------------------------------------------------------------- rules per kind

def lower_io(c: Lowering, n: fx.Node) -> None:
    if n.op == "placeholder":
        c.set(n, c.g.placeholder(n.name), None)
    else:
        c.g.output(fx.node.map_arg(n.args[0], c.as_float))


def lower_quant(c: Lowering, n: fx.Node) -> None:
    fq, p = c.module(n), n.args[0]
    grid = uint8_grid(fq)
    if c.dom.get(p) is not None and (grid is None or grid == c.dom[p]):  # the producer already emits this grid
        c.set(n, c.env[p], c.dom[p])
    elif grid is not None:  # a float value, or codes on another grid (after an identity op): (re)quantize
        c.set(n, c.call(f"quant_{p.name}", Quantize(*grid), (c.as_float(p),)), grid)
    else:  # not an 8-bit grid: keep simulating in float
        c.set(n, c.call(f"fq_{p.name}", copy.deepcopy(fq), (c.as_float(p),)), None)


def lower_conv(c: Lowering, n: fx.Node) -> None:
    m, x, q = c.module(n), n.args[0], info(n).qspec
    if not isinstance(m, ConvBnAct):
        return lower_float(c, n)
    out_fq = c.output_quantizer(n)
    out = uint8_grid(out_fq) if out_fq is not None else None
    pre = uint8_grid(m.preact_fq) if m.preact_fq is not None else None
    int8 = (isinstance(q, NodeQSpec) and q.weight is not None and m.weight_fq is not None and c.on_grid(x) and
            m.weight_fq.spec.bits <= 8 and  # wider weights (16-bit) keep simulating: int8 codes cannot hold them
            (out_fq is None or out is not None) and (m.preact_fq is None or pre is not None))
    if not int8:  # float, on the weights fake-quant computes with (folded and on their grid once, here)
        return c.set(n, c.call(n.target, FrozenConvBnAct(m), (c.as_float(x),)), None)
    if pre is None:
        y = c.call(n.target, int8_conv(m, c.dom[x], out), (c.env[x],))
    else:  # conv to the pre-activation grid, then the activation between two grids
        y = c.call(n.target, int8_conv(m, c.dom[x], pre, act="none"), (c.env[x],))
        y = c.call(f"{n.target}_act", Int8Act(pre, out, m.act), (y,))
    c.set(n, y, out)


def lower_add(c: Lowering, n: fx.Node) -> None:
    a, b = n.args[:2]
    if not c.on_grid(a, b):
        return lower_float(c, n)
    out_fq = c.output_quantizer(n)
    out = uint8_grid(out_fq) if out_fq is not None else None
    c.set(n, c.call(f"add_{n.name}", Int8Add(c.dom[a], c.dom[b], out), (c.env[a], c.env[b])), out)


def lower_shared(c: Lowering, n: fx.Node) -> None:
    """cat / split / resize / pool: on the uint8 codes when the annotation says the output shares the inputs' grid."""
    q = info(n).qspec
    if not (isinstance(q, NodeQSpec) and q.shared and n.all_input_nodes and c.on_grid(*n.all_input_nodes)):
        return lower_float(c, n)
    grids = {c.dom[a] for a in n.all_input_nodes}
    if len(grids) != 1:
        raise ConvertError(f"{n.name} ({info(n).module_path}): inputs on different grids {sorted(grids)}")
    args, kwargs = fx.node.map_arg(n.args, c.env.__getitem__), fx.node.map_arg(n.kwargs, c.env.__getitem__)
    if op_kind(c.src, n) == "pool":
        c.set(n, c.call(n.target, Int8MaxPool(c.module(n)), args), grids.pop())
    else:
        c.set(n, c.same_op(n, args, kwargs), grids.pop())


def lower_mean(c: Lowering, n: fx.Node) -> None:
    x = n.args[0]
    if not c.on_grid(x):
        return lower_float(c, n)
    c.set(n, c.call(n.target, Int8GlobalAvgPool(c.dom[x]), (c.env[x],)), None)


def lower_identity(c: Lowering, n: fx.Node) -> None:
    c.set(n, c.env[n.args[0]], c.dom.get(n.args[0]))


def lower_decode(c: Lowering, n: fx.Node) -> None:
    """The deployed model returns decoded predictions only; ``feats`` are read for their shapes. A task head's extra
    inputs (mask coefficients and prototypes, keypoints, angle logits) follow ``feats`` and are read as float."""
    m = c.module(n)
    if not hasattr(m, "with_options"):  # a bare DFL leaf: float
        return lower_float(c, n)
    if len(n.args) == 1:  # Classify's softmax on the float logits
        return c.set(n, c.call(n.target, m.with_options(export=True), (c.as_float(n.args[0]),)), None)
    boxes, scores, feats, *extra = n.args
    dec = m.with_options(export=True, fast_dfl=True)
    # extras may be None (a pruned input) or per-level lists (YOLO26 Pose26's keypoint features)
    args = (c.as_float(boxes), c.as_float(scores), [c.env[f] for f in feats],
            *(fx.node.map_arg(e, c.as_float) for e in extra))
    c.set(n, c.call(n.target, dec, args), None)


def lower_float(c: Lowering, n: fx.Node) -> None:
    if _reads_shape(n):  # a shape is the same on either grid: no dequantization just to read it
        v = c.g.create_node(n.op, n.target, fx.node.map_arg(n.args, c.env.__getitem__), n.kwargs, n.name)
        return c.set(n, v, None)
    c.set(n, c.same_op(n, *(fx.node.map_arg(a, c.as_float) for a in (n.args, n.kwargs))), None)


LOWERINGS: dict[str, Callable[[Lowering, fx.Node], None]] = {
    "io": lower_io, "quant": lower_quant, "conv": lower_conv, "add": lower_add,
    "cat": lower_shared, "split": lower_shared, "resize": lower_shared, "pool": lower_shared, "detach": lower_shared,
    "mean": lower_mean, "identity": lower_identity, "matmul": lower_float, "softmax": lower_float,
    "decode": lower_decode, "other": lower_float,
}


class LowerInt8(FxqatPass):
    name = "lower_int8"

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        c = Lowering(gm)
        for n in gm.graph.nodes:
            kind = op_kind(gm, n)
            rule = LOWERINGS.get(kind)
            if rule is None:
                raise ConvertError(f"{n.name} ({info(n).module_path or n.target}): op kind {kind!r} has no INT8 "
                                   f"lowering rule; add one to fxqat.passes.lower_int8.LOWERINGS (kinds with rules: "
                                   f"{', '.join(LOWERINGS)})")
            rule(c, n)
            v = c.env.get(n)
            if v is not None and n.op not in ("placeholder", "output") and "fxqat" not in v.meta:
                v.meta["fxqat"] = copy.copy(info(n))  # a quantizer sharing its producer's node keeps its meta
        root = nn.Module()
        for path, m in c.mods.items():
            root.add_module(path, m)
        return fx.GraphModule(root, c.g, class_name="Int8YoloGraph")

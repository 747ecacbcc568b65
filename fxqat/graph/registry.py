"""The op-kind registry: which kind of operation a graph node is, from module types and functions, never from names.

Every stage asks this one table (NNCF's metatypes idea): the pattern matcher (roles name op kinds), the qconfig
annotation (which nodes get a spec, which keep their input's grid), quantizer insertion, INT8 lowering (a rule per
kind) and the ONNX export.

    kind     shares its input's grid   quantizable   what it is
    conv                                  yes         fused Conv+BN(+act) or a bare Conv2d
    add                                   yes         residual add of two tensors
    cat        yes                                    torch.cat / Concat
    pool       yes                                    MaxPool2d (max commutes with dequantization)
    resize     yes                                    nearest Upsample (copies values)
    split      yes                                    chunk / split and their getitems
    detach     yes                                    Tensor.detach (the one-to-one head's inputs in training)
    mean                                              global average pool (AdaptiveAvgPool2d to 1×1): float
    identity                                          Dropout (an identity in eval)
    matmul                                            ``@`` / torch.matmul (attention: float unless a rule says)
    softmax                                           softmax (attention weights): float
    decode                                            a head's float tail (DFL, anchors, box decode, sigmoid)
    quant                                             a fake-quantizer
    io                                                graph input / output
    other                                             anything else: float

A new op kind is one :func:`register_module` / :func:`register_function` call plus, if the INT8 model should run it
on integers, a lowering rule in ``fxqat/passes/lower_int8.py`` (``convert`` refuses a kind it has no rule for).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn


@dataclass(frozen=True)
class OpKind:
    name: str
    shares_grid: bool = False  # the output lies on the input's grid: no quantizer of its own
    quantizable: bool = False  # gets a NodeQSpec resolved from the qconfig (weights and/or output)


KINDS: dict[str, OpKind] = {k.name: k for k in (
    OpKind("conv", quantizable=True), OpKind("add", quantizable=True),
    OpKind("cat", shares_grid=True), OpKind("pool", shares_grid=True), OpKind("resize", shares_grid=True),
    OpKind("split", shares_grid=True), OpKind("detach", shares_grid=True), OpKind("mean"), OpKind("identity"),
    OpKind("matmul"), OpKind("softmax"),
    OpKind("decode"), OpKind("quant"), OpKind("io"), OpKind("other"),
)}

# module type → kind, or a function (module) → kind; the most derived registered type wins
_MODULES: dict[type, str | Callable[[nn.Module], str]] = {}
_FUNCTIONS: dict[Callable, str | Callable[[fx.Node], str]] = {}
_METHODS: dict[str, str] = {}
_LAZY_DONE = False


def register_kind(kind: OpKind) -> OpKind:
    KINDS[kind.name] = kind
    return kind


def register_module(cls: type, kind: str | Callable[[nn.Module], str]) -> None:
    """``call_module`` nodes of ``cls`` (or a subclass) are of ``kind`` (a name or a function of the module)."""
    if isinstance(kind, str) and kind not in KINDS:
        raise KeyError(f"op kind {kind!r} is not registered; known: {', '.join(KINDS)}")
    _MODULES[cls] = kind


def register_function(fn: Callable, kind: str | Callable[[fx.Node], str]) -> None:
    _FUNCTIONS[fn] = kind


def register_method(name: str, kind: str) -> None:
    _METHODS[name] = kind


def _add_kind(node: fx.Node) -> str:
    return "add" if all(isinstance(a, fx.Node) for a in node.args[:2]) else "other"


def _getitem_kind(node: fx.Node) -> str:
    src = node.args[0]
    return "split" if isinstance(src, fx.Node) and _node_kind(None, src) == "split" else "other"


register_module(nn.Conv2d, "conv")
register_module(nn.MaxPool2d, "pool")
register_module(nn.Upsample, lambda m: "resize" if m.mode == "nearest" else "other")
register_module(nn.AdaptiveAvgPool2d, lambda m: "mean" if m.output_size in (1, (1, 1)) else "other")
register_module(nn.Dropout, "identity")
for _f in (torch.cat, torch.concat):
    register_function(_f, "cat")
for _f in (operator.add, torch.add):
    register_function(_f, _add_kind)
register_function(operator.getitem, _getitem_kind)
for _m in ("chunk", "split"):
    register_method(_m, "split")
register_function(torch.chunk, "split")
register_method("detach", "detach")
for _f in (operator.matmul, torch.matmul):
    register_function(_f, "matmul")
register_method("softmax", "softmax")
register_function(torch.softmax, "softmax")
register_module(nn.Softmax, "softmax")


def _register_fxqat_modules() -> None:
    """fxqat's and Ultralytics' own module types (imported on first use: they import this module's users)."""
    global _LAZY_DONE
    _LAZY_DONE = True
    from ultralytics.nn.modules.block import DFL

    from ..modules.conv_bn_act import ConvBnAct, FrozenConvBnAct
    from ..modules.decode import DetectDecode
    from ..quant.fake_quant import FakeQuant

    register_module(ConvBnAct, "conv")
    register_module(FrozenConvBnAct, "conv")  # a convert-stage conv that stays float
    register_module(DetectDecode, "decode")
    register_module(DFL, "decode")
    from ..modules.heads import ClassifyDecode

    register_module(ClassifyDecode, "decode")
    register_module(FakeQuant, "quant")


def module_kind(m: nn.Module) -> str:
    if not _LAZY_DONE:
        _register_fxqat_modules()
    for cls in type(m).__mro__:
        k = _MODULES.get(cls)
        if k is not None:
            return k if isinstance(k, str) else k(m)
    return "other"


def _node_kind(gm: fx.GraphModule | None, node: fx.Node) -> str:
    if node.op in ("placeholder", "output"):
        return "io"
    if node.op == "call_module":
        return module_kind(gm.get_submodule(node.target)) if gm is not None else "other"
    if node.op == "call_function":
        k = _FUNCTIONS.get(node.target)
        return "other" if k is None else k if isinstance(k, str) else k(node)
    if node.op == "call_method":
        return _METHODS.get(node.target, "other")
    return "other"


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """The registered kind of ``node``: conv | add | cat | pool | resize | split | detach | mean | identity |
    matmul | softmax | decode | quant | io | other."""
    return _node_kind(gm, node)


def kind(name: str) -> OpKind:
    return KINDS[name]

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import fxqat
from fxqat.errors import ConvertError
from fxqat.graph import registry
from fxqat.graph.registry import KINDS, OpKind, op_kind
from fxqat.modules.conv_bn_act import ConvBnAct
from fxqat.modules.decode import DetectDecode
from fxqat.quant.fake_quant import FakeQuant


def test_kinds_come_from_types_and_functions_not_names(v8n_graph):
    gm = v8n_graph
    kinds = {n.name: op_kind(gm, n) for n in gm.graph.nodes}
    assert kinds["x"] == "io" and kinds["model_22_decode"] == "decode"
    assert kinds["model_9_m"] == "pool" and kinds["model_10"] == "resize"
    assert kinds["cat"] == "cat" and kinds["chunk"] == "split" and kinds["getitem"] == "split"
    assert kinds["add"] == "add" and kinds["model_0_conv"] == "conv"

    class Renamed(nn.MaxPool2d):  # a subclass with another name is still a pool; a look-alike name is not
        pass

    assert registry.module_kind(Renamed(2)) == "pool"
    assert registry.module_kind(type("MaxPool2d", (nn.Module,), {})()) == "other"
    assert registry.module_kind(ConvBnAct(nn.Conv2d(1, 1, 1), None, None)) == "conv"
    assert registry.module_kind(FakeQuant(fxqat.quant.spec.ACT_UINT8)) == "quant"
    assert registry.module_kind(nn.Upsample(scale_factor=2, mode="bilinear")) == "other"
    assert DetectDecode in registry._MODULES
    assert {k for k, v in KINDS.items() if v.shares_grid} == {"cat", "pool", "resize", "split", "detach"}


def test_attention_and_detach_kinds():
    """Attention's matmuls and softmax, and the end-to-end head's detach, are kinds of their own (by function)."""
    g = fx.Graph()
    x = g.placeholder("x")
    nodes = [g.call_function(operator.matmul, (x, x)), g.call_function(torch.matmul, (x, x)),
             g.call_method("softmax", (x, -1)), g.call_function(torch.softmax, (x, -1)), g.call_method("detach", (x,))]
    gm = fx.GraphModule(nn.Module(), g)
    assert [op_kind(gm, n) for n in nodes] == ["matmul", "matmul", "softmax", "softmax", "detach"]
    assert registry.module_kind(nn.Softmax(-1)) == "softmax"
    assert KINDS["detach"].shares_grid and not KINDS["matmul"].quantizable


def test_a_kind_without_lowering_rule_makes_convert_raise_naming_it():
    class Gelu2(nn.Module):
        def forward(self, x):
            return nn.functional.gelu(x)

    registry.register_kind(OpKind("gelu2"))
    registry.register_module(Gelu2, "gelu2")
    try:
        root = nn.Module()
        root.act = Gelu2()
        g = fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_module("act", (x,)))
        gm = fx.GraphModule(root, g)
        with pytest.raises(ConvertError, match=r"act \(.*\): op kind 'gelu2' has no INT8 lowering rule"):
            fxqat.convert(gm)
    finally:
        del registry._MODULES[Gelu2]
        del KINDS["gelu2"]


def test_functions_and_methods(v8n_graph):
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    add = g.call_function(operator.add, (a, b))
    add_const = g.call_function(operator.add, (a, 1.0))
    cat = g.call_function(torch.cat, ([a, b], 1))
    g.output((add, add_const, cat))
    gm = fx.GraphModule(nn.Module(), g)
    assert [op_kind(gm, n) for n in (add, add_const, cat)] == ["add", "other", "cat"]

"""Passes (export stage): the QAT graph made ready for ``torch.onnx.export`` as a TensorRT-style QDQ model.

    FoldConvsForExport   ConvBnAct ─► ExportConv: BN folded into constant weights stored on the weight grid
    FixLearnedScales     learned (LSQ) scales as constants holding their positive values
    DecodeForExport      the head's decode returns the decoded tensor only, DFL as softmax + a 1×16 MatMul
    RequantizeSharedOps  after a Concat / MaxPool / Resize / Split on a grid: the same quantizer again (an exact
                         identity that lets runtimes run the op in INT8 with no scale change around it)
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph.meta import info
from ..graph.registry import op_kind
from ..modules.conv_bn_act import ConvBnAct
from ..quant.fake_quant import FakeQuant
from ..quant.spec import NodeQSpec
from .base import FxqatPass
from .insert_quantizers import grid_of


class ExportConv(nn.Module):
    """Conv with BN folded into constant weights (on the weight quantizer's grid), activation applied."""

    def __init__(self, m: ConvBnAct):
        super().__init__()
        w, b = m.deploy_weight()
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = nn.Parameter(b.clone(), requires_grad=False)
        self.weight_fq = copy.deepcopy(m.weight_fq)
        self.preact_fq = copy.deepcopy(m.preact_fq)
        for fq in (self.weight_fq, self.preact_fq):
            if fq is not None:
                fq.observe_enabled = False
                fq.always_observe = False
        fq = self.weight_fq
        if fq is not None and fq.qmax - fq.qmin < 255 and fq.qmin < 0:  # below 8 bits: ONNX has no such Q/DQ range
            with torch.no_grad():  # the weights on their own grid, stored in int8 containers with the same scale
                self.weight.copy_(fq(self.weight))
            fq.qmin, fq.qmax = -128, 127
        elif fq is not None and fq.qmax - fq.qmin > 255:  # wider than 8 bits: no integer kernel takes them;
            with torch.no_grad():  # the weights on their own grid as float constants (the runtime runs this conv
                self.weight.copy_(fq(self.weight))  # in float, on exactly the values fake-quant computed with)
            self.weight_fq = None
        c = m.conv
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups
        self.act = m.act

    def forward(self, x):
        w = self.weight_fq(self.weight) if self.weight_fq is not None else self.weight
        y = F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.act(self.preact_fq(y) if self.preact_fq is not None else y)


class FixLearnedScales(FxqatPass):
    """Learned (LSQ) scales become constants holding their positive values (``FakeQuant.fix_learned_scale``)."""

    name = "fix_learned_scales"

    def run(self, gm: fx.GraphModule) -> bool:
        return any([fq.fix_learned_scale() for fq in gm.modules() if isinstance(fq, FakeQuant)])


class FoldConvsForExport(FxqatPass):
    name = "fold_convs_for_export"

    def run(self, gm: fx.GraphModule) -> bool:
        for fq in (m for m in gm.modules() if isinstance(m, FakeQuant)):
            fq.observe_enabled = False
        convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   ConvBnAct)]
        for n in convs:
            gm.add_submodule(n.target, ExportConv(gm.get_submodule(n.target)))
        return bool(convs)


class DecodeForExport(FxqatPass):
    name = "decode_for_export"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in gm.graph.nodes:
            m = gm.get_submodule(n.target) if n.op == "call_module" else None
            if op_kind(gm, n) == "decode" and hasattr(m, "with_options"):
                gm.add_submodule(n.target, m.with_options(export=True, fast_dfl=True))
                changed = True
        return changed


class RequantizeSharedOps(FxqatPass):
    name = "requantize_shared_ops"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in list(gm.graph.nodes):
            q = info(n).qspec
            if not (isinstance(q, NodeQSpec) and q.shared and q.grid is not None) or n.op == "call_method":
                continue  # chunk's tuple output: its getitems are requantized instead
            users = [u for u in n.users if op_kind(gm, u) != "quant"]
            if not users:
                continue
            with gm.graph.inserting_after(n):
                fq = gm.graph.call_module(grid_of(n), (n,))
            n.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)
            changed = True
        return changed

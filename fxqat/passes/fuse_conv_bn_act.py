"""Pass: Conv2d → BatchNorm2d → SiLU (and Conv2d → BN, and a bare Conv2d) become one :class:`ConvBnAct`.

    x ─► conv ─► bn ─► act ─►        ==>        x ─► ConvBnAct(conv, bn, act) ─►

An ``nn.Identity`` activation (Ultralytics' ``Conv(..., act=False)``: SPPF's and SCDown's first convs, the
attention's qkv / pe / proj, the FFN's last conv) is fused too: left as a node of its own it got an output quantizer
of its own, a second rounding of the conv's output onto a grid a hair from the conv's, and in the INT8 model a
dequantize → quantize pair around nothing.

Matched on graph structure (each step the single user of the previous one); the fused module takes the path of the
Ultralytics ``Conv`` block (``model.1``, ``model.2.cv1``) so module paths stay readable. Weight specs are set later
by the insertion pass.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..graph.meta import info
from ..modules.conv_bn_act import ConvBnAct
from .base import FxqatPass

ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.Hardswish, nn.LeakyReLU, nn.Identity)


def _module(gm: fx.GraphModule, node: fx.Node, types) -> nn.Module | None:
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, types) else None


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


class FuseConvBnAct(FxqatPass):
    name = "fuse_conv_bn_act"

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if _module(gm, n, (nn.Conv2d, nn.BatchNorm2d))]
        assert not left, f"unfused conv/bn nodes remain: {left[:5]}"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            conv = _module(gm, node, nn.Conv2d)
            if conv is None or info(node).block == "DFL":
                continue
            chain, bn, act = [node], None, None
            nxt = _only_user(node)
            if nxt is not None and (bn := _module(gm, nxt, nn.BatchNorm2d)) is not None:
                chain.append(nxt)
                nxt = _only_user(nxt)
            if nxt is not None and (act := _module(gm, nxt, ACTIVATIONS)) is not None:
                chain.append(nxt)
            path = node.target.rsplit(".", 1)[0] if node.target.endswith(".conv") and bn is not None else node.target
            meta = info(node)
            fused = ConvBnAct(conv, bn, act)
            changed = True
            if len(chain) == 1:  # a bare conv (Detect's last 1x1): swap the module, keep the node and its name
                gm.add_submodule(node.target, fused)
                continue
            gm.add_submodule(path, fused)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(path, node.args, node.kwargs)
            chain[-1].replace_all_uses_with(new)
            for n in reversed(chain):
                gm.graph.erase_node(n)
            new.meta["fxqat"] = meta
            meta.module_path = path
            new._rename(path.replace(".", "_"))
        return changed

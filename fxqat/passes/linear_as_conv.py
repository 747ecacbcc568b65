"""Pass: Classify's ``pool → flatten → dropout → Linear`` becomes ``pool → dropout → 1×1 conv → flatten``.

    x ─► AdaptiveAvgPool2d(1) ─► flatten(1) ─► Dropout ─► Linear ─►
    ==>  x ─► AdaptiveAvgPool2d(1) ─► Dropout ─► Conv2d 1×1 (the Linear's weight and bias) ─► flatten(1) ─►

On a (B, C, 1, 1) map a 1×1 conv computes what the Linear computes on (B, C), so the classifier gets what every conv
gets — per-channel INT8 weights, fused QAT, INT8 lowering and QDQ export — instead of a second code path. The conv
keeps the Linear's module path (``model.9.linear``) and node meta; dropout acts element-wise, on either shape.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .base import FxqatPass


def _mod(gm: fx.GraphModule, node, types):
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, types) else None


def _classifier_chain(gm: fx.GraphModule, node: fx.Node):
    """(pool, flatten, dropouts) feeding the Linear ``node``, or None when the Linear is not a pooled classifier."""
    drops, cur = [], node.args[0]
    while _mod(gm, cur, nn.Dropout) is not None and len(cur.users) == 1:
        drops.append(cur)
        cur = cur.args[0]
    if not (isinstance(cur, fx.Node) and cur.op == "call_method" and cur.target == "flatten" and len(cur.users) == 1
            and tuple(cur.args[1:]) == (1,)):
        return None
    pool = _mod(gm, cur.args[0], nn.AdaptiveAvgPool2d)
    if pool is None or pool.output_size not in (1, (1, 1)):
        return None
    return cur.args[0], cur, list(reversed(drops))


class LinearAsConv(FxqatPass):
    name = "linear_as_conv"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            lin = _mod(gm, node, nn.Linear)
            chain = _classifier_chain(gm, node) if lin is not None else None
            if chain is None:
                continue
            pool, flatten, drops = chain
            conv = nn.Conv2d(lin.in_features, lin.out_features, 1, bias=lin.bias is not None)
            conv.weight.data = lin.weight.detach().clone().reshape(lin.out_features, lin.in_features, 1, 1)
            if lin.bias is not None:
                conv.bias.data = lin.bias.detach().clone()
            conv.train(lin.training)
            gm.add_submodule(node.target, conv)  # same path, same node: the Linear becomes the conv
            x = pool
            for d in drops:  # dropout straight on the pooled map
                d.args = (x,)
                x = d
            node.args = (x,)
            with gm.graph.inserting_after(node):
                flat = gm.graph.call_method("flatten", (node, 1))
            node.replace_all_uses_with(flat, delete_user_cb=lambda u, f=flat: u is not f)
            flat.meta.update(flatten.meta)
            gm.graph.erase_node(flatten)
            changed = True
        return changed

    def ensures(self, gm: fx.GraphModule) -> None:
        left = [n.name for n in gm.graph.nodes if _mod(gm, n, nn.Linear) is not None]
        assert not left, f"Linear layers fxqat cannot quantize remain: {left} (only a pooled classifier's Linear)"

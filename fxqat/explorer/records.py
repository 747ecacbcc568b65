"""The explorer's data: one JSON-ready record per graph node and one per collapsible block.

A node record holds what the details panel shows: op, module path, registered op kind, pattern role, the
NodeQSpec's precision label, the rule that set it (``rules.rule_info``), and the quantizers its weights and its
output pass through (scales, zero points, the observer's range, the representable range of the grid).
Blocks are the Ultralytics layers (``model.N``) and, inside them, nested blocks (C2f's Bottlenecks) holding at
least two nodes that are not quantizers.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..graph.draw import draw_kind, node_precision
from ..graph.meta import info
from ..graph.registry import KINDS, op_kind
from ..graph.summary import _fmt_shape, _target_name
from ..quant.fake_quant import FakeQuant
from ..quant.spec import NodeQSpec, QuantSpec
from .rules import rule_info

DIGITS = 7  # significant digits kept for floats in the page (scales match the model's to 1e-6 relative)


def num(v) -> float | None:
    """A float rounded to DIGITS significant digits; None for NaN/Inf (JSON has neither)."""
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{DIGITS}g}")


def nums(t) -> list:
    return [num(v) for v in torch.as_tensor(t).detach().reshape(-1).tolist()]


def spec_dict(s: QuantSpec | None) -> dict | None:
    if s is None:
        return None
    d = {"label": s.label(), "bits": s.bits, "symmetric": s.symmetric, "per_channel": s.per_channel,
         "observer": s.observer, "learnable": s.learnable}
    if s.fixed is not None:
        d["fixed"] = [num(s.fixed[0]), int(s.fixed[1])]
    if s.observer == "percentile":
        d["percentile"] = s.percentile
    return d


def quantizer_dict(fq: FakeQuant, path: str) -> dict:
    """Scale(s), zero point(s), the observer's range and the grid's representable range of one quantizer."""
    scale, zp = fq.qparams()
    obs = fq.observer
    lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    observed = None
    if torch.is_tensor(lo) and torch.is_tensor(hi) and lo.numel() and hi.numel():
        observed = [num(lo.min()), num(hi.max())]
        observed = observed if None not in observed else None  # never observed (a fixed grid): ±inf
    s, z = scale.reshape(-1).float(), zp.reshape(-1).float()
    d = {"path": path, "label": fq.spec.label(), "qmin": fq.qmin, "qmax": fq.qmax,
         "initialized": bool(fq.initialized), "observer": fq.spec.observer, "observed": observed,
         "per_channel": fq.ch_axis is not None}
    if fq.ch_axis is None:
        d["scale"], d["zero_point"] = num(s[0]), int(z[0])
        d["grid"] = [num((fq.qmin - z[0]) * s[0]), num((fq.qmax - z[0]) * s[0])]
    else:
        d["scales"], d["zero_points"] = nums(s), [int(v) for v in z.tolist()]
        d["scale_range"] = [num(s.min()), num(s.max())]
    return d


def _target(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    if n.op in ("placeholder", "output"):
        return n.op
    return _target_name(n)


def _quantizer_of(gm: fx.GraphModule, n: fx.Node) -> fx.Node | None:
    """The activation quantizer node reading ``n`` directly (the value consumers of ``n`` see), if any."""
    for u in n.users:
        if u.op == "call_module" and isinstance(gm.get_submodule(u.target), FakeQuant):
            return u
    return None


def group_chain(n: fx.Node, keep: set[str]) -> list[str]:
    """The block paths enclosing ``n``, outermost first, restricted to the blocks the page collapses."""
    return [p for p, _ in info(n).scope if p in keep]


def collapsible_groups(nodes: list[fx.Node], gm: fx.GraphModule) -> dict[str, dict]:
    """Blocks worth a box: every Ultralytics layer with two nodes or more, and nested blocks with at least two nodes
    that are not quantizers (a Conv and its quantizer stay two plain nodes inside their layer)."""
    members: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    depth: dict[str, int] = {}
    for n in nodes:
        for d, (p, t) in enumerate(info(n).scope):
            members.setdefault(p, []).append(n)
            types[p], depth[p] = t, d
    keep = {}
    for p, ms in members.items():
        real = [m for m in ms if op_kind(gm, m) != "quant"]
        if (depth[p] == 0 and len(ms) >= 2) or (depth[p] > 0 and len(real) >= 2):
            keep[p] = {"path": p, "type": types[p], "layer": info(ms[0]).layer, "depth": depth[p]}
    return keep


def node_records(gm: fx.GraphModule, qconfig=None, qconfig_text: str | None = None) -> tuple[list[dict], dict]:
    """(node records in graph order, block records by path) for ``gm`` (traced or prepared)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    groups = collapsible_groups(nodes, gm)
    keep = set(groups)
    out = []
    for n in nodes:
        i = info(n)
        kind = op_kind(gm, n)
        q = i.qspec
        rec = {"id": index[n], "name": n.name, "op": n.op, "target": _target(gm, n), "kind": kind,
               "draw_kind": draw_kind(n, gm), "layer": i.layer, "layer_type": i.layer_type,
               "module_path": i.module_path, "block": i.block, "role": i.role,
               "groups": group_chain(n, keep), "inputs": [index[a] for a in n.all_input_nodes],
               "shape": _fmt_shape(n.meta.get("tensor_meta")), "quantizable": KINDS[kind].quantizable,
               "precision": node_precision(n, gm) if q is not None else "float",
               "label": q.label() if hasattr(q, "label") else ""}
        if isinstance(q, NodeQSpec):
            rec.update({"weight_spec": spec_dict(q.weight), "output_spec": spec_dict(q.output), "shared": q.shared,
                        "grid_owner": q.grid, "rule": rule_info(n, kind, q, qconfig, qconfig_text)})
        elif isinstance(q, QuantSpec):  # a quantizer node
            rec["output_spec"] = spec_dict(q)
            rec["grid_owner"] = n.target.removeprefix("quant.")
        m = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(m, FakeQuant):
            rec["quantizer"] = quantizer_dict(m, n.target)
        else:
            qn = _quantizer_of(gm, n)
            if qn is not None:
                rec["quantizer"] = quantizer_dict(gm.get_submodule(qn.target), qn.target)
                rec["quant_node"] = index[qn]
        wfq = getattr(m, "weight_fq", None)
        if isinstance(wfq, FakeQuant):
            if hasattr(m, "folded"):  # the weight quantizer's grid follows the folded weights (as the forward sets it)
                with torch.no_grad():
                    wfq.observe(m.folded()[0])
            rec["weight_quantizer"] = quantizer_dict(wfq, f"{n.target}.weight_fq")
        if hasattr(m, "conv"):
            rec["weight_shape"] = list(m.conv.weight.shape)
        out.append(rec)
    _follow_grid_owners(out)
    return out, groups


def _follow_grid_owners(records: list[dict]) -> None:
    """Nodes on another node's grid (shared ops, quantizers, values read by quantized ops) point at the rule that set
    the owner's output: the grid's spec is the highest precision its producers ask for, the owner being the first."""
    by_name = {r["name"]: r for r in records}
    for r in records:
        owner = by_name.get(r.get("grid_owner") or "")
        rule = r.get("rule")
        if owner is None or owner is r or not owner.get("rule") or (rule and rule.get("where")):
            continue
        why = rule["text"] if rule else f"the quantizer of {owner['name']}'s grid"
        r["rule"] = {"source": owner["rule"]["source"], "where": owner["rule"]["where"], "matched": [],
                     "text": f"{why}; the grid of {owner['name']}, set by:\n{owner['rule']['text']}"}

"""Pass: decide every node's quantization once, into ``node.meta["fxqat"].qspec`` (annotate first, transform later).

    conv / add (quantizable kinds)      → NodeQSpec(weight, output) resolved from the QConfig's precedence order
    a value a quantized op reads        → on a grid too (the image input: the qconfig's ``input`` spec)
    cat / pool / resize / split         → NodeQSpec(shared=True): the output lies on its input's grid
    everything else (DFL, decode, attention math) → None: float

Sharing classes are the connected components (networkx) of "keeps the grid of" edges through grid-sharing ops,
computed here once: every member of a class records the class spec as its ``output`` and the name of the node that
owns the grid (the class's first producer) as its ``grid``. Insertion, INT8 lowering and the ONNX export read this
record and nothing else.

    conv ─► [grid c] ─┬────────────► cat ─► conv        class c = {conv, conv, cat}: one quantizer, one scale
    conv ─► [grid c] ─┘   (same c)
"""

from __future__ import annotations

from dataclasses import replace

import networkx as nx
import torch.fx as fx

from ..graph.meta import info
from ..graph.registry import KINDS, op_kind
from ..qconfig.config import QConfig
from ..quant.spec import NodeQSpec, QuantSpec
from .base import FxqatPass


def pick_spec(specs: list[QuantSpec], default: QuantSpec) -> QuantSpec:
    """Highest precision wins when producers of one sharing class ask for different specs."""
    return max(specs, key=lambda s: (s.bits, not s.symmetric)) if specs else default


def sharing_classes(nodes: list[fx.Node], kind: dict, qs: dict) -> list[list[fx.Node]]:
    """The grids of the graph: lists of nodes (in graph order) whose outputs share one quantizer."""
    shares = {n for n in nodes if KINDS[kind[n]].shares_grid}
    on_grid = {n for n in nodes if KINDS[kind[n]].quantizable and qs.get(n) is not None and qs[n].output is not None}
    for n in nodes:  # quantized consumers need quantized inputs
        q = qs.get(n)
        if q is not None and (q.weight is not None if kind[n] == "conv" else q.output is not None):
            on_grid.update(n.all_input_nodes)
    changed = True
    while changed:  # grids flow through grid-sharing ops in both directions
        changed = False
        for n in shares:
            if n in on_grid or any(i in on_grid for i in n.all_input_nodes):
                for v in (n, *n.all_input_nodes):
                    if v not in on_grid:
                        on_grid.add(v)
                        changed = True
    g = nx.Graph()
    g.add_nodes_from(on_grid)
    g.add_edges_from((n, i) for n in shares & on_grid for i in n.all_input_nodes)
    order = {n: k for k, n in enumerate(nodes)}
    classes = [sorted(c, key=order.__getitem__) for c in nx.connected_components(g)]
    return sorted(classes, key=lambda c: order[c[0]])


class AnnotateQConfig(FxqatPass):
    name = "annotate_qconfig"

    def __init__(self, qconfig: QConfig):
        super().__init__()
        self.qconfig = qconfig

    def ensures(self, gm: fx.GraphModule) -> None:
        by_name = {n.name: n for n in gm.graph.nodes}
        for n in gm.graph.nodes:
            q = info(n).qspec
            if isinstance(q, NodeQSpec) and q.grid is not None:
                owner = info(by_name[q.grid]).qspec
                assert owner.grid == q.grid and owner.output == q.output, f"{n.name}: grid {q.grid} disagrees"

    def run(self, gm: fx.GraphModule) -> bool:
        qc = self.qconfig
        nodes = list(gm.graph.nodes)
        kind = {n: op_kind(gm, n) for n in nodes}
        qs: dict[fx.Node, NodeQSpec | None] = {n: qc.resolve(n, kind[n]) if KINDS[kind[n]].quantizable else None
                                               for n in nodes}
        if qc.strict:  # every user rule must match a quantizable node: all unmatched ones in one error
            qc.check_rules([n for n in nodes if KINDS[kind[n]].quantizable])
        for members in sharing_classes(nodes, kind, qs):
            producers = [m for m in members if not KINDS[kind[m]].shares_grid]
            if any(p.op == "placeholder" for p in producers):
                spec = qc.input
            else:
                spec = pick_spec([qs[p].output for p in producers if qs[p] is not None and qs[p].output is not None],
                                 qc.activation)
            owner = producers[0].name
            for m in members:
                if m in producers:
                    base = qs[m] or NodeQSpec(source="input" if m.op == "placeholder" else "read by a quantized op")
                    qs[m] = replace(base, output=spec, grid=owner)
                else:
                    qs[m] = NodeQSpec(output=spec, shared=True, grid=owner, source="shares its input's grid")
        for n in nodes:
            info(n).qspec = qs[n]
        return True

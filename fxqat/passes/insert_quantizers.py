"""Pass: place fake-quantizers from the annotations, following the rules of fast INT8 YOLO.

* Weights: each quantized ConvBnAct gets its weight quantizer (symmetric per-channel INT8 by default).
* Activations are quantized once, where they are produced (conv output, residual-add output, the image input, or a
  float op whose output feeds a quantized op). Ops that keep values on their input's grid — Concat, MaxPool,
  nearest Upsample, chunk/split — get no quantizer of their own: they join their inputs' *sharing class*, and every
  tensor in one class uses ONE quantizer (one scale and zero-point). So every Concat's inputs share a scale, MaxPool
  out = in, C2f's split halves keep their producer's grid, and no DQ→Q pair with different scales appears on a path.

    conv ─► FQ[c] ─┬────────────► cat ─► conv          classes are connected components (networkx) of
    conv ─► FQ[c] ─┘   (same c)                        "shares the grid of" edges

Each node on a grid records its class in ``node.meta["fxqat"].extra["qclass"]`` (the quantizer's module path).
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

from ..graph.meta import NodeInfo, info
from ..graph.patterns import op_kind
from ..qconfig.config import QConfig
from ..quant.fake_quant import FakeQuant
from ..quant.spec import QuantSpec
from .annotate import SHARED_KINDS
from .base import FxqatPass

QCLASS = "qclass"


def _pick(specs: list[QuantSpec], default: QuantSpec) -> QuantSpec:
    """Highest precision wins when producers of one sharing class ask for different specs."""
    return max(specs, key=lambda s: (s.bits, not s.symmetric)) if specs else default


class InsertQuantizers(FxqatPass):
    name = "insert_quantizers"

    def __init__(self, qconfig: QConfig):
        super().__init__()
        self.qconfig = qconfig

    def requires(self, gm: fx.GraphModule) -> None:
        assert any(info(n).qspec is not None for n in gm.graph.nodes), "run AnnotateQConfig first"

    def ensures(self, gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:
            if op_kind(gm, n) == "cat" and QCLASS in info(n).extra:
                classes = {info(a).extra.get(QCLASS) for a in n.all_input_nodes}
                assert len(classes) == 1, f"{n.name}: concat inputs on different grids {classes}"

    def run(self, gm: fx.GraphModule) -> None:
        nodes = list(gm.graph.nodes)
        kind = {n: op_kind(gm, n) for n in nodes}
        qs = {n: info(n).qspec for n in nodes}
        shared = {n for n in nodes if kind[n] in SHARED_KINDS}

        for n in nodes:  # weights
            if kind[n] == "conv" and n.op == "call_module":
                m = gm.get_submodule(n.target)
                if hasattr(m, "set_weight_spec"):
                    m.set_weight_spec(qs[n].weight if qs[n] is not None else None)
                    m.set_preact_spec(*((qs[n].preact, qs[n].sigmoid) if qs[n] is not None else (None,)))

        on_grid = {n for n in nodes if kind[n] in ("conv", "add") and qs[n] is not None and qs[n].output is not None}
        for n in nodes:  # quantized consumers need quantized inputs
            q = qs[n]
            if (kind[n] == "conv" and q is not None and q.weight is not None) or \
                    (kind[n] == "add" and q is not None and q.output is not None):
                on_grid.update(n.all_input_nodes)
        changed = True
        while changed:  # grids flow through shared ops in both directions
            changed = False
            for n in shared:
                ins = n.all_input_nodes
                if n in on_grid or any(i in on_grid for i in ins):
                    for v in (n, *ins):
                        if v not in on_grid:
                            on_grid.add(v)
                            changed = True

        g = nx.Graph()
        g.add_nodes_from(n.name for n in on_grid)
        for n in shared & on_grid:
            for i in n.all_input_nodes:
                g.add_edge(n.name, i.name)
        by_name = {n.name: n for n in nodes}
        classes = []
        for comp in nx.connected_components(g):
            members = sorted((by_name[c] for c in comp), key=nodes.index)
            classes.append(members)
        classes.sort(key=lambda ms: nodes.index(ms[0]))

        report = {}
        for members in classes:
            producers = [m for m in members if m not in shared]
            if any(p.op == "placeholder" for p in producers):
                spec = self.qconfig.input
            else:
                spec = _pick([qs[p].output for p in producers if qs[p] is not None and qs[p].output is not None],
                             self.qconfig.activation)
            path = f"quant.{producers[0].name}"
            gm.add_submodule(path, FakeQuant(spec))
            for p in producers:
                with gm.graph.inserting_after(p):
                    fq = gm.graph.call_module(path, (p,))
                p.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)
                pi = info(p)
                fq.meta["fxqat"] = NodeInfo(layer=pi.layer, layer_type=pi.layer_type, module_path=path,
                                            scope=pi.scope, role="quant", qspec=spec, extra={QCLASS: path})
                pi.extra["quantizer"] = path
            for s in members:
                if s in shared:
                    info(s).extra[QCLASS] = path
            report[path] = {"spec": spec.label(), "producers": [p.name for p in producers],
                            "shared": [s.name for s in members if s in shared]}
        gm.meta["quantizers"] = report

"""Pass: place fake-quantizers exactly where the annotation says (``node.meta["fxqat"].qspec``), nothing more.

* Weights: each quantized ConvBnAct gets its weight quantizer (and, with ``preact`` / ``sigmoid``, its
  pre-activation and sigmoid quantizers).
* Activations: one ``FakeQuant`` per grid (``qspec.grid``, decided by ``AnnotateQConfig``), at ``quant.<owner>``,
  called after every producer on that grid. Grid-sharing ops (``qspec.shared``: Concat, MaxPool, nearest
  Upsample, chunk/split) get none: their output already lies on the grid. So every Concat's inputs share a scale,
  MaxPool out = in, and no DQ→Q pair with different scales appears on a path.
"""

from __future__ import annotations

import torch.fx as fx

from ..errors import QConfigError
from ..graph.meta import NodeInfo, info
from ..quant.fake_quant import FakeQuant
from ..quant.spec import NodeQSpec
from .base import FxqatPass


def quantizer_path(grid: str) -> str:
    """Module path of the activation quantizer owning grid ``grid`` (a node name)."""
    return f"quant.{grid}"


def grid_of(node: fx.Node) -> str | None:
    """Module path of the quantizer whose grid ``node``'s output lies on, or None (float), from the annotation."""
    if info(node).role == "quant":
        return node.target
    q = info(node).qspec
    return quantizer_path(q.grid) if isinstance(q, NodeQSpec) and q.grid is not None else None


class InsertQuantizers(FxqatPass):
    name = "insert_quantizers"

    def requires(self, gm: fx.GraphModule) -> None:
        assert any(isinstance(info(n).qspec, NodeQSpec) for n in gm.graph.nodes), "run AnnotateQConfig first"

    def ensures(self, gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:
            q = info(n).qspec
            if isinstance(q, NodeQSpec) and q.shared and q.grid is not None:
                grids = {grid_of(a) for a in n.all_input_nodes}
                assert grids == {grid_of(n)}, f"{n.name}: inputs on grids {grids}, output on {grid_of(n)}"

    def run(self, gm: fx.GraphModule) -> bool:
        nodes = list(gm.graph.nodes)
        for n in nodes:  # weights (and the pre-activation / sigmoid grids inside a fused conv)
            q = info(n).qspec
            m = gm.get_submodule(n.target) if n.op == "call_module" else None
            if hasattr(m, "set_weight_spec"):
                w = q.weight if q is not None else None
                if w is not None and w.per_channel is not None and w.per_channel >= m.conv.weight.dim():
                    raise QConfigError(f"{n.name} ({info(n).module_path}): weight per_channel axis {w.per_channel} "
                                       f"is outside its {m.conv.weight.dim()}-d weight (valid axes: 0 … "
                                       f"{m.conv.weight.dim() - 1}, or null); set by {q.source}")
                m.set_weight_spec(w)
                m.set_preact_spec(*((q.preact, q.sigmoid) if q is not None else (None,)))

        producers: dict[str, list[fx.Node]] = {}
        shared: dict[str, list[fx.Node]] = {}
        for n in nodes:
            q = info(n).qspec
            if isinstance(q, NodeQSpec) and q.grid is not None:
                (shared if q.shared else producers).setdefault(q.grid, []).append(n)
        report = {}
        for grid, ps in producers.items():
            spec = info(ps[0]).qspec.output
            path = quantizer_path(grid)
            gm.add_submodule(path, FakeQuant(spec))
            for p in ps:
                with gm.graph.inserting_after(p):
                    fq = gm.graph.call_module(path, (p,))
                p.replace_all_uses_with(fq, delete_user_cb=lambda u, fq=fq: u is not fq)
                pi = info(p)
                fq.meta["fxqat"] = NodeInfo(layer=pi.layer, layer_type=pi.layer_type, module_path=path,
                                            scope=pi.scope, role="quant", qspec=spec)
            report[path] = {"spec": spec.label(), "producers": [p.name for p in ps],
                            "shared": [s.name for s in shared.get(grid, [])]}
        gm.meta["quantizers"] = report
        return True

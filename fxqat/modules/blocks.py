"""The QAT replacements of Ultralytics blocks, as graph-mode objects.

In fxqat the model stays one flat ``torch.fx`` graph (so sharing classes can cross block boundaries, as a Concat in
the neck joins tensors from three layers). A block's *replacement* is its matched subgraph — fused ``ConvBnAct``
modules plus the quantizers the block's rules placed. These classes give that subgraph a handle:

* :class:`QATCSPLayer` — C2f / C3k2 (seed: "Cross Stage Partial layers");
* :class:`QATBottleneckCSP` — Bottleneck (residual add quantized once);
* :class:`QATSPPF` — SPPF (pools share the cv1 grid);
* :class:`QATDetectionHead` — Detect (per-level branches; DFL and decode float).

    for blk in fxqat.blocks(qat):
        print(blk)                       # kind, path, convs, quantizers
    head = fxqat.blocks(qat, "QATDetectionHead")[0]
    head.freeze_bn(); head.set_observers(False)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..graph.meta import info
from ..quant.fake_quant import FakeQuant
from .conv_bn_act import ConvBnAct


@dataclass
class QATBlock:
    gm: fx.GraphModule = field(repr=False)
    path: str
    nodes: dict[str, list[str]]  # role → node names

    def _nodes(self) -> list[fx.Node]:
        names = {n for ns in self.nodes.values() for n in ns}
        inside = [n for n in self.gm.graph.nodes if n.name in names or
                  (info(n).module_path == self.path or info(n).module_path.startswith(self.path + "."))]
        return inside

    def convs(self) -> dict[str, ConvBnAct]:
        """The block's fused Conv+BN(+SiLU) modules by module path."""
        out = {}
        for n in self._nodes():
            if n.op == "call_module":
                m = self.gm.get_submodule(n.target)
                if isinstance(m, ConvBnAct):
                    out[n.target] = m
        return out

    def quantizers(self) -> dict[str, FakeQuant]:
        """Activation quantizers on the block's grids plus its convs' weight quantizers."""
        out = {}
        for n in self._nodes():
            for u in (n, *n.users):
                if u.op == "call_module" and isinstance(self.gm.get_submodule(u.target), FakeQuant):
                    out[u.target] = self.gm.get_submodule(u.target)
        for p, m in self.convs().items():
            if m.weight_fq is not None:
                out[f"{p}.weight_fq"] = m.weight_fq
        return out

    def freeze_bn(self, frozen: bool = True) -> None:
        for m in self.convs().values():
            m.freeze_bn(frozen)

    def set_observers(self, enabled: bool) -> None:
        for q in self.quantizers().values():
            if q.spec.fixed is None:
                q.observe_enabled = enabled

    def nodes_with_role(self, role: str) -> list[fx.Node]:
        names = set(self.nodes.get(role, []))
        return [n for n in self.gm.graph.nodes if n.name in names]

    def grid(self, role: str) -> FakeQuant | None:
        """The activation quantizer whose grid the (first) node of ``role`` lies on (None: float)."""
        from ..passes.insert_quantizers import grid_of

        ns = self.nodes_with_role(role)
        path = grid_of(ns[0]) if ns else None
        return self.gm.get_submodule(path) if path else None

    def summary(self) -> str:
        """One line per node of the block that has a role: role, node, module path, precision and grid."""
        from ..graph.summary import precision_label
        from ..passes.insert_quantizers import grid_of

        rows = [f"{type(self).__name__} {self.path}"]
        for role in self.nodes:
            for n in self.nodes_with_role(role):
                rows.append(f"  {role:<18} {n.name:<22} {info(n).module_path:<20} {precision_label(n) or 'float':<12} "
                            f"{grid_of(n) or '-'}")
        return "\n".join(rows)

    def __str__(self) -> str:
        q = self.quantizers()
        acts = sorted({k for k, v in q.items() if v.ch_axis is None})
        return (f"{type(self).__name__}({self.path}: {len(self.convs())} convs, {len(acts)} activation grids "
                f"{acts}, roles {sorted(self.nodes)})")


class QATCSPLayer(QATBlock):
    """C2f / C3k2: cv1 → split → bottlenecks → concat (one grid for all its inputs) → cv2."""

    def concat_grid(self) -> FakeQuant | None:
        """The one quantizer every input of the block's concat uses."""
        return self.grid("c2f.concat")


class QATBottleneckCSP(QATBlock):
    """Bottleneck: cv1 → cv2 (→ + x, output quantized once)."""

    def add_grid(self) -> FakeQuant | None:
        """The residual add's output quantizer (None without a shortcut, or when the add stays float)."""
        return self.grid("bottleneck.add")


class QATSPPF(QATBlock):
    """SPPF: cv1 → 3 max-pools on cv1's grid → concat → cv2."""

    def pool_grid(self) -> FakeQuant | None:
        """The quantizer cv1's output, the three pools and the concat share."""
        return self.grid("sppf.pool")


class QATDetectionHead(QATBlock):
    """Detect: per-level box/class branches; last 1×1 convs INT8 weights, float out; DFL + decode float."""

    def last_convs(self) -> dict[str, ConvBnAct]:
        last = set(self.nodes.get("detect.box_last", []) + self.nodes.get("detect.cls_last", []))
        return {n.target: self.gm.get_submodule(n.target) for n in self._nodes() if n.name in last}


REPLACEMENTS = {"QATCSPLayer": QATCSPLayer, "QATBottleneckCSP": QATBottleneckCSP, "QATSPPF": QATSPPF,
                "QATDetectionHead": QATDetectionHead}


def blocks(gm: fx.GraphModule, kind: str | None = None) -> list[QATBlock]:
    """The QAT replacements found by the pattern matcher in a prepared graph (optionally of one ``kind``)."""
    out = []
    for m in gm.meta.get("patterns", []):
        cls = REPLACEMENTS.get(m.replacement)
        if cls is not None and (kind is None or cls.__name__ == kind):
            out.append(cls(gm, m.path, m.nodes))
    return out

"""``fxqat.summary``: one row per node — name, op, block, module path, output shape (from ShapeProp), precision."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from .meta import info


def _fmt_shape(meta) -> str:
    if meta is None:
        return ""
    if hasattr(meta, "shape"):
        return "x".join(str(int(d)) for d in meta.shape)
    if isinstance(meta, dict):
        return "{" + ", ".join(f"{k}: {_fmt_shape(v)}" for k, v in meta.items()) + "}"
    if isinstance(meta, (list, tuple)):
        return "(" + ", ".join(_fmt_shape(v) for v in meta) + ")"
    return ""


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def example_input(imgsz=320, batch: int = 1) -> torch.Tensor:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    return torch.zeros(batch, 3, h, w)


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record ``tensor_meta`` on every node by running ``example`` through ``gm`` in eval mode, state untouched."""
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example.to(next(iter(gm.parameters())).device))
    finally:
        for m, t in modes.items():
            m.training = t


def precision_label(node: fx.Node) -> str:
    """Short label of the quantization a node gets (empty before quantizers are placed)."""
    q = info(node).qspec
    if q is None:
        return ""
    return q.label() if hasattr(q, "label") else str(q)


@dataclass
class Row:
    name: str
    op: str
    target: str
    layer: str
    block: str
    module_path: str
    shape: str
    precision: str


class Summary:
    """A table of the graph's nodes. ``str(summary)`` renders it; ``rows`` holds the data."""

    COLUMNS = ("name", "op", "target", "layer", "block", "module_path", "shape", "precision")

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def to_text(self) -> str:
        cols = [c for c in self.COLUMNS if c != "precision" or any(r.precision for r in self.rows)]
        table = [cols] + [[str(getattr(r, c)) for c in cols] for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.op] = counts.get(r.op, 0) + 1
        lines.append(f"{len(self.rows)} nodes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return "\n".join(lines)

    __str__ = to_text

    def __repr__(self):
        return f"Summary({len(self.rows)} nodes)"


def summary(gm: fx.GraphModule, imgsz=320, example: torch.Tensor | None = None) -> Summary:
    """Table of ``gm``'s nodes with output shapes for an input of ``imgsz`` (int or (h, w)) or ``example``."""
    propagate_shapes(gm, example if example is not None else example_input(imgsz))
    rows = []
    for node in gm.graph.nodes:
        i = info(node)
        rows.append(Row(node.name, node.op, _target_name(node), "" if i.layer is None else str(i.layer),
                        i.block, i.module_path, _fmt_shape(node.meta.get("tensor_meta")), precision_label(node)))
    return Summary(rows)

"""The one ``node.meta`` key fxqat uses.

Every node of an fxqat graph carries ``node.meta["fxqat"]``, a :class:`NodeInfo`:

* where it came from (set by the tracer): the Ultralytics layer index, the module path, and the chain of
  Ultralytics blocks it sits in (``scope``) — so passes find C2f / SPPF / Detect subgraphs without reading node names;
* its pattern ``role`` (set by the matcher, e.g. ``c2f.concat``, ``sppf.pool``, ``detect.box_last``);
* its quantization spec ``qspec`` (set by the qconfig step, read by the quantizer-insertion pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

META_KEY = "fxqat"


@dataclass
class NodeInfo:
    layer: int | None = None  # Ultralytics layer index (``model.<layer>``), None for graph inputs/outputs
    layer_type: str = ""  # class name of ``model.<layer>`` (Conv, C2f, SPPF, Concat, Upsample, Detect, ...)
    module_path: str = ""  # innermost module path, e.g. ``model.4.m.0.cv1.conv``
    scope: tuple[tuple[str, str], ...] = ()  # Ultralytics blocks enclosing the node, outermost first: (path, type)
    role: str | None = None  # pattern role assigned by the matcher
    qspec: Any = None  # per-node quantization spec assigned by the qconfig step
    extra: dict = field(default_factory=dict)

    @property
    def block(self) -> str:
        """Innermost Ultralytics block type (Conv, Bottleneck, C2f, SPPF, Concat, Upsample, Detect, DFL, ...)."""
        return self.scope[-1][1] if self.scope else self.layer_type

    @property
    def block_path(self) -> str:
        return self.scope[-1][0] if self.scope else self.module_path

    def within(self, block_type: str) -> str | None:
        """Path of the innermost enclosing block of ``block_type``, or None."""
        for path, typ in reversed(self.scope):
            if typ == block_type:
                return path
        return None


def info(node: fx.Node) -> NodeInfo:
    """The node's :class:`NodeInfo`, created empty if absent (e.g. nodes added by a pass)."""
    meta = node.meta.get(META_KEY)
    if meta is None:
        meta = node.meta[META_KEY] = NodeInfo()
    return meta

"""Pass: match C2f / Bottleneck / SPPF / Detect / Concat / Upsample patterns and write node roles."""

from __future__ import annotations

import torch.fx as fx

from ..graph.patterns import PATTERNS, match_patterns
from .base import FxqatPass


class MatchPatterns(FxqatPass):
    name = "match_patterns"

    def __init__(self, patterns=PATTERNS):
        super().__init__()
        self.patterns = patterns

    def run(self, gm: fx.GraphModule) -> bool:
        gm.meta["patterns"] = match_patterns(gm, self.patterns)
        return False  # roles only: the graph is unchanged

    def ensures(self, gm: fx.GraphModule) -> None:
        found = {m.pattern for m in gm.meta["patterns"]}
        head = "classify" if getattr(gm, "meta", {}).get("task") == "classify" else "detect"
        assert head in found, f"no {head.capitalize()} head matched"

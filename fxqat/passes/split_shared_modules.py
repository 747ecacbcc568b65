"""Pass (trace stage): give each call of a parameter-free module its own module instance.

Ultralytics shares ONE ``nn.SiLU`` across every ``Conv`` (``Conv.default_act``) and SPPF calls one MaxPool three
times; a per-node setting must not leak through that sharing. The tracer records each call's site (the module
path as seen from its caller) in ``node.meta["fxqat"].extra["site"]``; this pass re-targets each call of a
stateless module to a copy at that path (``model.1.act``, ``model.9.m_1``, …). Modules with parameters stay
shared (tied weights) and only record the call site as their module path.
"""

from __future__ import annotations

import copy

import torch.fx as fx

from ..graph.meta import info
from .base import FxqatPass


class SplitSharedModules(FxqatPass):
    name = "split_shared_modules"

    def ensures(self, gm: fx.GraphModule) -> None:
        seen: dict[str, str] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module" and "site" in info(n).extra:
                m = gm.get_submodule(n.target)
                if not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()):
                    assert n.target not in seen, f"{n.name} and {seen[n.target]} share stateless module {n.target}"
                    seen[n.target] = n.name

    def run(self, gm: fx.GraphModule) -> bool:
        used: set[str] = set()
        for node in gm.graph.nodes:
            site = info(node).extra.pop("site", None) if node.op == "call_module" else None
            if site is None:
                continue
            module = gm.get_submodule(node.target)
            has_state = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
            if has_state:  # keep it shared (tied weights); record the call site only
                if site == node.target:
                    used.add(site)
                else:
                    info(node).module_path = site
                continue
            new, k = site, 0
            while new in used:
                k += 1
                new = f"{site}_{k}"
            used.add(new)
            if new != node.target:
                gm.add_submodule(new, copy.deepcopy(module))
                node.target = new
                node._rename(new.replace(".", "_"))
            info(node).module_path = new
        return True

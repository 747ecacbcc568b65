"""Pass contract (torch.fx ``PassBase``): ``requires`` → ``call`` → ``ensures``, each run once by ``PassBase.__call__``.

A pass implements :meth:`FxqatPass.run`: it mutates ``gm`` in place and returns whether it changed the graph (or
returns a new GraphModule, e.g. INT8 lowering). Only a pass that changed something pays for dead-code elimination,
``graph.lint()`` and ``recompile()``.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class FxqatPass(PassBase):
    name = "pass"

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def run(self, gm: fx.GraphModule) -> bool | fx.GraphModule:
        """Transform ``gm``; return True if it changed, False if not, or a new GraphModule."""
        raise NotImplementedError

    def call(self, gm: fx.GraphModule) -> PassResult:
        out = self.run(gm)
        if isinstance(out, fx.GraphModule):
            gm, modified = out, True
        else:
            modified = bool(out)
        if modified:
            gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
            gm.delete_all_unused_submodules()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)


class PassError(RuntimeError):
    """A pass failed: names the pass and its position in the list."""


def run_passes(gm: fx.GraphModule, passes: list[FxqatPass], stage: str = "prepare") -> fx.GraphModule:
    """Run ``passes`` in order (each one's requires → call → ensures once). An internal failure names the pass;
    fxqat's user-facing errors (``FxqatError``) pass through unchanged."""
    from ..errors import FxqatError

    for k, p in enumerate(passes):
        try:
            gm = p(gm).graph_module
        except FxqatError:
            raise
        except Exception as e:
            raise PassError(f"{stage} pass {k + 1}/{len(passes)} {p.name!r} ({type(p).__name__}) failed: "
                            f"{type(e).__name__}: {e}") from e
    return gm


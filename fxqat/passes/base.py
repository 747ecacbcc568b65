"""Pass contract (torch.fx ``PassBase``): ``requires`` → ``call`` → ``ensures``; every pass ends with lint + recompile."""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class FxqatPass(PassBase):
    """Subclasses implement :meth:`run` (mutate ``gm`` in place) and may check pre/post conditions."""

    name = "pass"

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        pass

    def run(self, gm: fx.GraphModule) -> None:
        raise NotImplementedError

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.run(gm)
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, True)


def replace_node_with_module(gm: fx.GraphModule, first: fx.Node, last: fx.Node, path: str, module,
                             args: tuple) -> fx.Node:
    """Insert ``call_module(path)(*args)`` before ``first`` and route ``last``'s users to it."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(first):
        new = gm.graph.call_module(path, args)
    last.replace_all_uses_with(new)
    return new

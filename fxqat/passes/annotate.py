"""Pass: write each node's quantization spec into ``node.meta["fxqat"].qspec`` (annotate first, transform later).

    conv (ConvBnAct)      → NodeQSpec(weight, output) resolved from the QConfig's precedence order
    residual add          → NodeQSpec(output)
    cat / pool / resize / split → NodeQSpec(shared=True): output on the input's grid
    everything else (DFL, decode, attention math) → None: float
"""

from __future__ import annotations

import torch.fx as fx

from ..errors import QConfigError
from ..graph.meta import info
from ..graph.patterns import op_kind
from ..qconfig.config import QConfig
from ..quant.spec import NodeQSpec
from .base import FxqatPass

SHARED_KINDS = ("cat", "pool", "resize", "split")


class AnnotateQConfig(FxqatPass):
    name = "annotate_qconfig"

    def __init__(self, qconfig: QConfig):
        super().__init__()
        self.qconfig = qconfig

    def run(self, gm: fx.GraphModule) -> None:
        qc = self.qconfig
        for node in gm.graph.nodes:
            kind = op_kind(gm, node)
            if kind in ("conv", "add"):
                info(node).qspec = qc.resolve(node, kind)
            elif kind in SHARED_KINDS:
                info(node).qspec = NodeQSpec(shared=True)
            else:
                info(node).qspec = None
        if qc.strict:
            quantizable = [n for n in gm.graph.nodes if op_kind(gm, n) in ("conv", "add")]
            for rule in qc.rules:
                if rule.where == "<default>":
                    continue
                if not any(rule.matches(n) for n in quantizable):
                    raise QConfigError(
                        f"{rule.where}: rule match {{{rule.level}: {rule.pattern}}} matches no quantizable node "
                        f"(convs and residual adds); see `fxqat trace MODEL` for node names, module paths and roles")

"""QConfig: a global default plus rules, resolved per node with ONE precedence order.

Precedence (lowest → highest): global < block type < role < module-path glob < node-name glob < exact node name;
within a level, a later rule wins. A rule sets ``weight`` and/or ``activation`` (field overrides merged onto what
lower levels resolved, or ``None`` = leave float) or ``skip: true`` (weights and output stay float).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch.fx as fx

from ..errors import QConfigError
from ..graph.meta import info
from ..quant.spec import ACT_UINT8, IMAGE_INPUT, WEIGHT_INT8, NodeQSpec, QuantSpec, short
from .schema import LEVELS, check_match, check_overrides

FLOAT = "float"  # marker: the rule sets this tensor to float


@dataclass(frozen=True)
class Rule:
    level: str  # one of LEVELS
    pattern: str
    weight: dict | str | None = None  # field overrides, FLOAT, or None (= not set by this rule)
    activation: dict | str | None = None
    skip: bool = False
    where: str = ""  # "file:line" for error messages

    def __post_init__(self):
        where = self.where or "rule"
        check_match(self.level, self.pattern, where)
        for name, base in (("weight", WEIGHT_INT8), ("activation", ACT_UINT8)):
            v = getattr(self, name)
            if isinstance(v, dict):
                check_overrides(v, name, base, lambda _k, w=where: w)
            elif v is not None and v != FLOAT:
                raise QConfigError(f"{where}: {name} must be a mapping of field overrides or 'float', not {short(v)}")
        if not isinstance(self.skip, bool):
            raise QConfigError(f"{where}: skip must be true or false")

    def describe(self) -> str:
        return f"{self.where}: rule match {{{self.level}: {self.pattern}}}"

    def matches(self, node: fx.Node) -> bool:
        i = info(node)
        if self.level == "block":
            return self.pattern == i.layer_type or any(self.pattern == t for _, t in i.scope)
        if self.level == "role":
            return i.role is not None and fnmatch.fnmatchcase(i.role, self.pattern)
        if self.level == "module":
            return bool(i.module_path) and fnmatch.fnmatchcase(i.module_path, self.pattern)
        if self.level == "name_glob":
            return fnmatch.fnmatchcase(node.name, self.pattern)
        return node.name == self.pattern


# Defaults decided by measurement (see README "Quantization defaults"): Detect's last 1×1 convs keep INT8
# per-channel weights but a float output, so box distances and class logits never pass an 8-bit grid; the same for
# the task heads' last 1×1 convs (mask coefficients, keypoints, angle logits), which feed their float decodes.
DEFAULT_RULES = (
    Rule("role", "detect.box_last", activation=FLOAT, where="<default>"),
    Rule("role", "detect.cls_last", activation=FLOAT, where="<default>"),
    Rule("role", "segment.mask_last", activation=FLOAT, where="<default>"),
    Rule("role", "pose.kpt_last", activation=FLOAT, where="<default>"),
    Rule("role", "obb.angle_last", activation=FLOAT, where="<default>"),
    Rule("role", "classify.linear", activation=FLOAT, where="<default>"),  # logits float: the softmax reads them
    Rule("role", "e2e.box_last", activation=FLOAT, where="<default>"),  # end-to-end heads' one-to-one branch
    Rule("role", "e2e.cls_last", activation=FLOAT, where="<default>"),
    Rule("role", "e2e.mask_last", activation=FLOAT, where="<default>"),  # YOLO26 task heads' one-to-one branch
    Rule("role", "e2e.kpt_last", activation=FLOAT, where="<default>"),
    Rule("role", "e2e.angle_last", activation=FLOAT, where="<default>"),
)


SIGMOID_NEEDS_PREACT = ("sigmoid quantization needs preact (the sigmoid reads the pre-activation grid); set preact "
                        "too, or remove sigmoid")


@dataclass(frozen=True)
class QConfig:
    weight: QuantSpec = WEIGHT_INT8
    activation: QuantSpec = ACT_UINT8
    input: QuantSpec = IMAGE_INPUT  # the image input, [0, 1]: fixed scale 1/255
    preact: QuantSpec | None = None  # also quantize conv outputs before SiLU (for ONNX Runtime's QLinearConv)
    sigmoid: QuantSpec | None = None  # with preact: SiLU as x * q(sigmoid(x)) (ONNX Runtime's QLinearSigmoid/Mul)
    rules: tuple[Rule, ...] = DEFAULT_RULES
    source: str = "<default>"
    strict: bool = True  # a rule that matches no node is an error

    def __post_init__(self):
        for name in ("weight", "activation", "input"):
            if not isinstance(getattr(self, name), QuantSpec):
                raise QConfigError(f"{self.source}: {name} must be a QuantSpec")
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise QConfigError(f"{self.source}: rules must be a tuple of Rule")
        if self.sigmoid is not None and self.preact is None:
            raise QConfigError(f"{self.source}: {SIGMOID_NEEDS_PREACT}")

    def unmatched_rules(self, nodes, kind_of=None) -> list[Rule]:
        """The user's rules (not fxqat's built-in ones) that match none of ``nodes``; ``kind_of(node)`` (optional)
        keeps only quantizable nodes ("conv", "add")."""
        nodes = [n for n in nodes if kind_of is None or kind_of(n) in ("conv", "add")]
        return [r for r in self.rules if r.where != "<default>" and not any(r.matches(n) for n in nodes)]

    def check_rules(self, nodes, kind_of=None) -> None:
        """ONE QConfigError listing EVERY rule that matches no quantizable node (file:line each)."""
        bad = self.unmatched_rules(nodes, kind_of)
        if bad:
            lines = "\n".join(f"  {r.describe()} matches no quantizable node" for r in bad)
            raise QConfigError(f"{self.source}: {len(bad)} rule(s) match no quantizable node (convs and residual "
                               f"adds); see `fxqat trace MODEL` for node names, module paths and roles:\n{lines}")

    def resolve(self, node: fx.Node, kind: str) -> NodeQSpec:
        """The NodeQSpec of a quantizable node (``kind``: "conv" or "add")."""
        w: QuantSpec | None = self.weight if kind == "conv" else None
        a: QuantSpec | None = self.activation
        src = "global"
        for level in LEVELS:
            for rule in self.rules:
                if rule.level != level or not rule.matches(node):
                    continue
                src = rule.where or f"{level}:{rule.pattern}"
                if rule.skip:
                    w = a = None
                    continue
                if kind == "conv" and rule.weight is not None:
                    w = None if rule.weight == FLOAT else (w or self.weight).with_(**rule.weight)
                if rule.activation is not None:
                    a = None if rule.activation == FLOAT else (a or self.activation).with_(**rule.activation)
        pre = self.preact if (kind == "conv" and w is not None and a is not None) else None
        return NodeQSpec(weight=w, output=a, source=src, preact=pre, sigmoid=self.sigmoid if pre is not None else None)

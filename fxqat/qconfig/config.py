"""QConfig: a global default plus rules, resolved per node with ONE precedence order.

Precedence (lowest → highest): global < block type < role < module-path glob < node-name glob < exact node name;
within a level, a later rule wins. A rule sets ``weight`` and/or ``activation`` (field overrides merged onto what
lower levels resolved, or ``None`` = leave float) or ``skip: true`` (weights and output stay float).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields

import torch.fx as fx

from ..errors import QConfigError
from ..graph.meta import info
from ..quant.spec import ACT_UINT8, IMAGE_INPUT, WEIGHT_INT8, NodeQSpec, QuantSpec

LEVELS = ("block", "role", "module", "name_glob", "name")
SPEC_KEYS = tuple(f.name for f in fields(QuantSpec) if f.name != "fixed")
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
        if self.level not in LEVELS:
            raise QConfigError(f"{self.where or 'rule'}: match level {self.level!r}; valid choices: {', '.join(LEVELS)}")
        for name in ("weight", "activation"):
            v = getattr(self, name)
            if isinstance(v, dict):
                bad = [k for k in v if k not in SPEC_KEYS]
                if bad:
                    raise QConfigError(f"{self.where or 'rule'}: unknown {name} key {bad[0]!r}; valid: "
                                       f"{', '.join(SPEC_KEYS)}")
                QuantSpec(**{**WEIGHT_INT8.__dict__, "fixed": None, **v})  # validates values
            elif v not in (None, FLOAT):
                raise QConfigError(f"{self.where or 'rule'}: {name} must be a mapping of "
                                   f"{', '.join(SPEC_KEYS)} or 'float'")
        if not isinstance(self.skip, bool):
            raise QConfigError(f"{self.where or 'rule'}: skip must be true or false")

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
        if self.sigmoid is not None and self.preact is None:
            raise QConfigError(f"{self.source}: {SIGMOID_NEEDS_PREACT}")

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


@dataclass
class Resolution:
    """Which rules matched which nodes (for validation and reports)."""

    hits: dict[int, list[str]] = field(default_factory=dict)


def from_dict(d: dict, source: str = "<dict>") -> QConfig:
    """QConfig from a plain dict ``{weight: {...}, activation: {...}, rules: [{role: ..., activation: ...}]}``."""
    from .io import qconfig_from_mapping

    return qconfig_from_mapping(d, source)

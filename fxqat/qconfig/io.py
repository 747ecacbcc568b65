"""YAML qconfig files: load, validate (file and line in every error), dump.

    version: 1
    weight:     {bits: 8, symmetric: true, per_channel: 0, observer: minmax}
    activation: {bits: 8, symmetric: false, observer: moving_average}
    default_rules: true          # keep fxqat's defaults (Detect's last 1×1 convs: float output)
    rules:
      - match: {role: detect.cls_last}
        activation: {bits: 16}
      - match: {module: "model.2.*"}
        weight: {bits: 4}
      - match: {name: model_9_cv1}
        skip: true

Match keys (one per rule): block, role, module, name_glob, name.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import QConfigError
from ..quant.spec import ACT_UINT8, IMAGE_INPUT, SIGMOID_UINT8, WEIGHT_INT8, QuantSpec, sigmoid_grid
from .config import DEFAULT_RULES, FLOAT, LEVELS, SIGMOID_NEEDS_PREACT, SPEC_KEYS, QConfig, Rule

TOP_KEYS = ("version", "weight", "activation", "input", "preact", "sigmoid", "default_rules", "rules", "description")
RULE_KEYS = ("match", "weight", "activation", "skip", "note")
VERSIONS = (1,)


class _Lines(dict):
    """dict that remembers the source line of each key."""

    lines: dict


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    out = _Lines()
    out.lines = {}
    out.line = node.start_mark.line + 1
    for k, v in node.value:
        key = loader.construct_object(k, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise QConfigError(f"line {k.start_mark.line + 1}: a mapping key must be a plain value") from None
        if key in out:
            raise QConfigError(f"line {k.start_mark.line + 1}: duplicate key {key!r}")
        out[key] = loader.construct_object(v, deep=True)
        out.lines[key] = k.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line(obj, key=None) -> int | None:
    if key is not None and isinstance(obj, _Lines):
        return obj.lines.get(key)
    return getattr(obj, "line", None)


def _where(source: str, obj=None, key=None) -> str:
    line = _line(obj, key)
    return f"{source}:{line}" if line else source


def _spec(d, base: QuantSpec, source: str, name: str) -> QuantSpec:
    if not isinstance(d, dict):
        raise QConfigError(f"{_where(source)}: {name} must be a mapping of {', '.join(SPEC_KEYS)}")
    for k in d:
        if k not in SPEC_KEYS:
            raise QConfigError(f"{_where(source, d, k)}: unknown {name} key {k!r}; valid: {', '.join(SPEC_KEYS)}")
    for k, v in d.items():  # locate the offending key first, for its line
        try:
            base.with_(**{k: v})
        except (QConfigError, TypeError) as e:
            raise QConfigError(f"{_where(source, d, k)}: {name}: {e}") from None
    try:
        return base.with_(**dict(d))
    except (QConfigError, TypeError) as e:
        raise QConfigError(f"{_where(source, d)}: {name}: {e}") from None


def _optional_spec(d: dict, key: str, base: QuantSpec, source: str) -> QuantSpec | None:
    """``key: null/false/float`` → None, ``key: true`` → ``base``, a mapping → ``base`` with those fields."""
    v = d.get(key)
    if v is None or v is False or v == FLOAT:
        return None
    return base if v is True else _spec(v, base, source, key)


def _tensor_rule(v, source, rule, key):
    if v is None or v is False or v == FLOAT:
        return FLOAT
    if not isinstance(v, dict):
        raise QConfigError(f"{_where(source, rule, key)}: {key} must be a mapping of {', '.join(SPEC_KEYS)} or "
                           f"'float'")
    for k in v:
        if k not in SPEC_KEYS:
            raise QConfigError(f"{_where(source, v, k)}: unknown {key} key {k!r}; valid: {', '.join(SPEC_KEYS)}")
    return dict(v)


def _rule(r, source: str, index: int) -> Rule:
    if not isinstance(r, dict):
        raise QConfigError(f"{source}: rules[{index}] must be a mapping with 'match' and settings")
    where = _where(source, r)
    for k in r:
        if k not in RULE_KEYS:
            raise QConfigError(f"{_where(source, r, k)}: unknown rule key {k!r}; valid: {', '.join(RULE_KEYS)}")
    match = r.get("match")
    if not isinstance(match, dict) or len(match) != 1:
        raise QConfigError(f"{where}: rule needs 'match' with exactly one of {', '.join(LEVELS)}")
    (level, pattern), = match.items()
    if level not in LEVELS:
        raise QConfigError(f"{_where(source, match, level)}: unknown match key {level!r}; valid: {', '.join(LEVELS)}")
    if not isinstance(pattern, str) or not pattern:
        raise QConfigError(f"{_where(source, match, level)}: match {level} must be a non-empty string")
    if not any(k in r for k in ("weight", "activation", "skip")):
        raise QConfigError(f"{where}: rule sets nothing; give weight, activation or skip")
    skip = r.get("skip", False)
    if not isinstance(skip, bool):
        raise QConfigError(f"{_where(source, r, 'skip')}: skip must be true or false")
    if skip and ("weight" in r or "activation" in r):
        raise QConfigError(f"{where}: conflicting rule: skip: true with weight/activation settings")
    w = _tensor_rule(r["weight"], source, r, "weight") if "weight" in r else None
    a = _tensor_rule(r["activation"], source, r, "activation") if "activation" in r else None
    try:
        return Rule(level, pattern, weight=w, activation=a, skip=skip, where=where)
    except QConfigError as e:
        raise QConfigError(f"{where}: {e}") from None


def qconfig_from_mapping(d, source: str = "<dict>") -> QConfig:
    if not isinstance(d, dict):
        raise QConfigError(f"{source}: a qconfig is a mapping with keys {', '.join(TOP_KEYS)}")
    for k in d:
        if k not in TOP_KEYS:
            raise QConfigError(f"{_where(source, d, k)}: unknown key {k!r}; valid: {', '.join(TOP_KEYS)}")
    version = d.get("version", 1 if source == "<dict>" else None)
    if version not in VERSIONS:
        raise QConfigError(f"{_where(source, d, 'version')}: version {version!r}; supported: "
                           f"{', '.join(map(str, VERSIONS))}")
    weight = _spec(d["weight"], WEIGHT_INT8, source, "weight") if "weight" in d else WEIGHT_INT8
    act = _spec(d["activation"], ACT_UINT8, source, "activation") if "activation" in d else ACT_UINT8
    inp = _spec(d["input"], IMAGE_INPUT, source, "input") if "input" in d else IMAGE_INPUT
    pre = _optional_spec(d, "preact", ACT_UINT8, source)
    sig = _optional_spec(d, "sigmoid", SIGMOID_UINT8, source)
    sig = sigmoid_grid(sig) if sig is not None else None
    if sig is not None and pre is None:
        raise QConfigError(f"{_where(source, d, 'sigmoid')}: {SIGMOID_NEEDS_PREACT}")
    rules_raw = d.get("rules") or []
    if not isinstance(rules_raw, list):
        raise QConfigError(f"{_where(source, d, 'rules')}: rules must be a list")
    defaults = d.get("default_rules", True)
    if not isinstance(defaults, bool):
        raise QConfigError(f"{_where(source, d, 'default_rules')}: default_rules must be true or false")
    rules = (DEFAULT_RULES if defaults else ()) + tuple(_rule(r, source, i) for i, r in enumerate(rules_raw))
    return QConfig(weight=weight, activation=act, input=inp, preact=pre, sigmoid=sig, rules=rules, source=source)


def load_qconfig(path_or_text) -> QConfig:
    """Load and validate a YAML qconfig (a path, or YAML text). Raises :class:`fxqat.QConfigError`."""
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and "\n" not in path_or_text
                                          and path_or_text.endswith((".yaml", ".yml"))):
        path = Path(path_or_text)
        if not path.is_file():
            builtin = Path(__file__).resolve().parents[2] / "qconfigs" / path.name
            if not path.is_absolute() and builtin.is_file():
                path = builtin
            else:
                raise QConfigError(f"{path}: qconfig file not found")
        text, source = path.read_text(), str(path)
    else:
        text, source = str(path_or_text), "<string>"
    try:
        data = yaml.load(text, Loader=_Loader)
    except QConfigError as e:
        raise QConfigError(f"{source}:{str(e).removeprefix('line ')}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise QConfigError(f"{source}{line}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        raise QConfigError(f"{source}: empty qconfig; it needs at least 'version: 1'")
    return qconfig_from_mapping(data, source)


def dump_qconfig(qc: QConfig, extra_rules: list[dict] | None = None, header: str = "") -> str:
    """YAML text for ``qc`` (its non-default rules) plus ``extra_rules`` (already in YAML form)."""
    def spec(s: QuantSpec) -> dict:
        return {k: getattr(s, k) for k in SPEC_KEYS}

    rules = []
    for r in qc.rules:
        if r in DEFAULT_RULES:
            continue
        item: dict = {"match": {r.level: r.pattern}}
        if r.skip:
            item["skip"] = True
        for k in ("weight", "activation"):
            v = getattr(r, k)
            if v is not None:
                item[k] = v
        rules.append(item)
    doc = {"version": 1, "weight": spec(qc.weight), "activation": spec(qc.activation), "input": spec(qc.input),
           "preact": spec(qc.preact) if qc.preact is not None else None,
           "sigmoid": spec(qc.sigmoid) if qc.sigmoid is not None else None,
           "default_rules": any(r in DEFAULT_RULES for r in qc.rules), "rules": rules + list(extra_rules or [])}
    return header + yaml.safe_dump(doc, sort_keys=False)


__all__ = ["load_qconfig", "dump_qconfig", "qconfig_from_mapping", "IMAGE_INPUT"]

"""THE qconfig schema: which keys each section takes, their values, and the names ``match:`` may use.

Built from the :class:`QuantSpec` dataclass fields, the pattern registry's roles and the Ultralytics block types, and
used by every way in: YAML files, plain dicts and the torch.ao bridge. Each check takes ``where(key)``, a function
giving the "file:line" of a key, so every error names its place.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import fields

from ..errors import QConfigError
from ..quant.spec import QuantSpec, short

SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(QuantSpec))

# Keys each tensor section takes: a weight grid is never fixed; an activation is quantized per tensor; the image
# input may have a fixed grid; a sigmoid output's grid is fixed over (0, 1) by its bits and signedness.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "weight": tuple(k for k in SPEC_FIELDS if k != "fixed"),
    "activation": tuple(k for k in SPEC_FIELDS if k not in ("fixed", "per_channel")),
    "input": tuple(k for k in SPEC_FIELDS if k != "per_channel"),
    "preact": tuple(k for k in SPEC_FIELDS if k not in ("fixed", "per_channel")),
    "sigmoid": ("bits", "symmetric"),
}
SPEC_KEYS: tuple[str, ...] = tuple(k for k in SPEC_FIELDS if any(k in v for v in SECTION_KEYS.values()))
REFUSED = {  # keys a section refuses with a reason rather than "unknown"
    "per_channel": "activations are quantized per tensor (one scale for the whole tensor); per_channel is for weights",
    "fixed": "a fixed grid is for the image input (input: {fixed: [scale, zero_point]}); observers set this one",
}
SIGMOID_REFUSED = "the sigmoid output's grid is fixed over (0, 1) by bits and symmetric; only those two are set"

LEVELS = ("block", "role", "module", "name_glob", "name")


def _known_blocks() -> tuple[str, ...]:
    from ..graph.patterns import PATTERNS

    names = {b for p in PATTERNS for b in p.blocks}
    try:
        import ultralytics.nn.modules as um

        names |= set(getattr(um, "__all__", ()))
    except ImportError:  # pragma: no cover - ultralytics is a dependency
        pass
    return tuple(sorted(names))


def role_names() -> tuple[str, ...]:
    from ..graph.patterns import ROLES

    return tuple(ROLES)


def block_names() -> tuple[str, ...]:
    global _BLOCKS
    if _BLOCKS is None:
        _BLOCKS = _known_blocks()
    return _BLOCKS


_BLOCKS: tuple[str, ...] | None = None
Where = Callable[[object], str]


def _suggest(value: str, choices) -> str:
    same_case = [c for c in choices if c.lower() == str(value).lower()]
    close = same_case or difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_match(level: str, pattern, where: str) -> None:
    """A rule's ``match: {level: pattern}``: the level exists; a role or block names a known one (globs for roles
    must match at least one role)."""
    if level not in LEVELS:
        raise QConfigError(f"{where}: unknown match key {short(level)}{_suggest(str(level), LEVELS)}; valid: "
                           f"{', '.join(LEVELS)}")
    if not isinstance(pattern, str) or not pattern:
        raise QConfigError(f"{where}: match {level} must be a non-empty string, not {short(pattern)}")
    if level == "role":
        roles = role_names()
        if not any(fnmatch.fnmatchcase(r, pattern) for r in roles):
            raise QConfigError(f"{where}: unknown role {short(pattern)}{_suggest(pattern, roles)}; valid roles: "
                               f"{', '.join(roles)}")
    elif level == "block":
        blocks = block_names()
        if pattern not in blocks:
            raise QConfigError(f"{where}: unknown block type {short(pattern)}{_suggest(pattern, blocks)}; valid: "
                               f"Ultralytics block class names, e.g. {', '.join(b for b in blocks if b in _COMMON)}")


_COMMON = ("Conv", "C2f", "C3k2", "SPPF", "Concat", "Upsample", "Detect", "Bottleneck", "C2PSA")


def check_keys(d: dict, section: str, where: Where) -> None:
    """Every key of ``d`` is one the ``section`` (weight, activation, input, preact, sigmoid) takes."""
    allowed = SECTION_KEYS[section]
    for k in d:
        if k in allowed:
            continue
        if section == "sigmoid" and k in SPEC_FIELDS:
            raise QConfigError(f"{where(k)}: sigmoid key {short(k)}: {SIGMOID_REFUSED}")
        if k in REFUSED and k in SPEC_FIELDS:
            raise QConfigError(f"{where(k)}: {section}: {k}: {REFUSED[k]}")
        raise QConfigError(f"{where(k)}: unknown {section} key {short(k)}{_suggest(str(k), allowed)}; valid: "
                           f"{', '.join(allowed)}")


def _value(k, v):
    if k == "fixed" and isinstance(v, list):
        return tuple(v)
    return v


def check_overrides(d, section: str, base: QuantSpec, where: Where, what: str | None = None) -> dict:
    """Validate field overrides ``d`` for ``section`` onto ``base``; returns them as a plain dict."""
    what = what or section
    if not isinstance(d, dict):
        raise QConfigError(f"{where(None)}: {what} must be a mapping of {', '.join(SECTION_KEYS[section])}, "
                           f"not {short(d)}")
    check_keys(d, section, where)
    out = {k: _value(k, v) for k, v in d.items()}
    for k, v in out.items():  # locate the offending key first, for its line
        try:
            base.with_(**{k: v})
        except (QConfigError, TypeError, ValueError) as e:
            raise QConfigError(f"{where(k)}: {what}: {e}") from None
    try:
        spec = base.with_(**out)
    except (QConfigError, TypeError, ValueError) as e:
        raise QConfigError(f"{where(None)}: {what}: {e}") from None
    if "percentile" in out and "observer" in out and spec.observer != "percentile":
        raise QConfigError(f"{where('percentile')}: {what}: percentile is used by observer 'percentile' only; "
                           f"this one is {short(spec.observer)}")
    return out


def build_spec(d, section: str, base: QuantSpec, where: Where, what: str | None = None) -> QuantSpec:
    """A QuantSpec for a top-level section: ``base`` with the fields of ``d``."""
    out = check_overrides(d, section, base, where, what)
    spec = base.with_(**out)
    if "percentile" in out and spec.observer != "percentile":
        raise QConfigError(f"{where('percentile')}: {what or section}: percentile is used by observer 'percentile' "
                           f"only; this one is {short(spec.observer)}")
    return spec


__all__ = ["SPEC_FIELDS", "SPEC_KEYS", "SECTION_KEYS", "LEVELS", "check_match", "check_keys", "check_overrides",
           "build_spec", "role_names", "block_names"]

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

Match keys (one per rule): block, role, module, name_glob, name; roles and block types are checked at load time.
Keys and values follow the one schema in ``schema.py``. A qconfig is given as a YAML file, a built-in preset's name
(``fxqat/qconfigs/<name>.yaml``, package data read through importlib.resources; a file on disk of that name wins) or
YAML text. Documents are bounded (MAX_BYTES, and aliases may not expand past MAX_NODES nodes).
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path

import yaml

from ..errors import QConfigError
from ..quant.spec import ACT_UINT8, IMAGE_INPUT, SIGMOID_UINT8, WEIGHT_INT8, QuantSpec, image_grid, short, sigmoid_grid
from .config import DEFAULT_RULES, FLOAT, SIGMOID_NEEDS_PREACT, QConfig, Rule
from .schema import LEVELS, SECTION_KEYS, build_spec, check_match, check_overrides

TOP_KEYS = ("version", "weight", "activation", "input", "preact", "sigmoid", "default_rules", "rules", "description")
RULE_KEYS = ("match", "weight", "activation", "skip", "note")
VERSIONS = (1,)
# A qconfig is a few hundred bytes: these bounds refuse YAML bombs (aliases expanding exponentially) early.
MAX_BYTES = 1_000_000  # document size
MAX_NODES = 100_000  # nodes after expanding every alias
MAX_ALIASES = 1_000  # alias uses


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
            raise QConfigError(f"line {k.start_mark.line + 1}: duplicate key {short(key)}")
        out[key] = loader.construct_object(v, deep=True)
        out.lines[key] = k.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse documents whose aliases expand past MAX_NODES nodes, use more than MAX_ALIASES aliases, or recurse.

    The composer shares an aliased node instead of copying it, so this walk sees each distinct node once and adds up
    the expanded size (a billion-laughs document is refused after a few hundred node visits)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    aliases = 0

    def size(n) -> int:
        nonlocal aliases
        if id(n) in sizes:
            aliases += 1
            if aliases > MAX_ALIASES:
                raise QConfigError(f"{source}: more than {MAX_ALIASES} YAML aliases; a qconfig needs a few at most")
            return sizes[id(n)]
        if id(n) in open_:
            raise QConfigError(f"{source}:{n.start_mark.line + 1}: recursive YAML alias")
        open_.add(id(n))
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        open_.discard(id(n))
        if total > MAX_NODES:
            raise QConfigError(f"{source}: the document expands to more than {MAX_NODES} YAML nodes (aliases); "
                               "a qconfig is a few dozen")
        sizes[id(n)] = total
        return total

    size(root)


def _parse(text: str, source: str):
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise QConfigError(f"{source}: {len(text.encode('utf-8', 'replace'))} bytes; a qconfig is at most "
                           f"{MAX_BYTES} bytes")
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except QConfigError as e:
        msg = str(e)
        raise QConfigError(f"{source}:{msg.removeprefix('line ')}" if msg.startswith("line ") else msg) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise QConfigError(f"{source}{line}: YAML syntax error: {short(getattr(e, 'problem', None) or e, 200)}") \
            from None
    except RecursionError:
        raise QConfigError(f"{source}: YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _line(obj, key=None) -> int | None:
    if key is not None and isinstance(obj, _Lines):
        return obj.lines.get(key)
    return getattr(obj, "line", None)


def _where(source: str, obj=None, key=None) -> str:
    line = _line(obj, key)
    return f"{source}:{line}" if line else source


def _at(source: str, d):
    """``where(key)`` for the schema checks: the key's line, or the mapping's own line for None."""
    return lambda k: _where(source, d, k) if k is not None else _where(source, d)


def _suggest(value, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _spec(d, base: QuantSpec, source: str, name: str, section: str | None = None) -> QuantSpec:
    return build_spec(d, section or name, base, _at(source, d), name)


def _optional_spec(d: dict, key: str, base: QuantSpec, source: str) -> QuantSpec | None:
    """``key: null/false/float`` → None, ``key: true`` → ``base``, a mapping → ``base`` with those fields."""
    v = d.get(key)
    if v is None or v is False or v == FLOAT:
        return None
    if v is True:
        return base
    if not isinstance(v, dict):
        raise QConfigError(f"{_where(source, d, key)}: {key} must be true, false or a mapping of "
                           f"{', '.join(SECTION_KEYS[key])}, not {short(v)}")
    return _spec(v, base, source, key)


def _tensor_rule(v, source, rule, key, base: QuantSpec):
    if v is None or v is False or v == FLOAT:
        return FLOAT
    if not isinstance(v, dict):
        raise QConfigError(f"{_where(source, rule, key)}: {key} must be a mapping of {', '.join(SECTION_KEYS[key])} "
                           f"or 'float', not {short(v)}")
    return check_overrides(v, key, base, _at(source, v))


def _rule(r, source: str, index: int) -> Rule:
    if not isinstance(r, dict):
        raise QConfigError(f"{source}: rules[{index}] must be a mapping with 'match' and settings, not {short(r)}")
    where = _where(source, r)
    for k in r:
        if k not in RULE_KEYS:
            raise QConfigError(f"{_where(source, r, k)}: unknown rule key {short(k)}{_suggest(k, RULE_KEYS)}; "
                               f"valid: {', '.join(RULE_KEYS)}")
    match = r.get("match")
    if not isinstance(match, dict) or len(match) != 1:
        raise QConfigError(f"{where}: rule needs 'match' with exactly one of {', '.join(LEVELS)}")
    (level, pattern), = match.items()
    check_match(level, pattern, _where(source, match, level))
    if not any(k in r for k in ("weight", "activation", "skip")):
        raise QConfigError(f"{where}: rule sets nothing; give weight, activation or skip")
    skip = r.get("skip", False)
    if not isinstance(skip, bool):
        raise QConfigError(f"{_where(source, r, 'skip')}: skip must be true or false, not {short(skip)}")
    if skip and ("weight" in r or "activation" in r):
        raise QConfigError(f"{where}: conflicting rule: skip: true with weight/activation settings")
    w = _tensor_rule(r["weight"], source, r, "weight", WEIGHT_INT8) if "weight" in r else None
    a = _tensor_rule(r["activation"], source, r, "activation", ACT_UINT8) if "activation" in r else None
    try:
        return Rule(level, pattern, weight=w, activation=a, skip=skip, where=where)
    except QConfigError as e:
        raise QConfigError(f"{where}: {e}") from None


def qconfig_from_mapping(d, source: str = "<dict>") -> QConfig:
    if not isinstance(d, dict):
        raise QConfigError(f"{source}: a qconfig is a mapping with keys {', '.join(TOP_KEYS)}, not {short(d)}")
    for k in d:
        if k not in TOP_KEYS:
            raise QConfigError(f"{_where(source, d, k)}: unknown key {short(k)}{_suggest(k, TOP_KEYS)}; valid: "
                               f"{', '.join(TOP_KEYS)}")
    version = d.get("version", 1 if source == "<dict>" else None)
    if isinstance(version, bool) or version not in VERSIONS:
        raise QConfigError(f"{_where(source, d, 'version')}: version {short(version)}; supported: "
                           f"{', '.join(map(str, VERSIONS))}")
    weight = _spec(d["weight"], WEIGHT_INT8, source, "weight") if "weight" in d else WEIGHT_INT8
    act = _spec(d["activation"], ACT_UINT8, source, "activation") if "activation" in d else ACT_UINT8
    inp = _spec(d["input"], IMAGE_INPUT, source, "input") if "input" in d else IMAGE_INPUT
    if "input" in d and "fixed" not in d["input"] and inp.fixed is not None:
        inp = image_grid(inp)  # bits/signedness changed: [0, 1] images onto the new grid (scale 1/qmax, zp 0)
    pre = _optional_spec(d, "preact", ACT_UINT8, source)
    sig = _optional_spec(d, "sigmoid", SIGMOID_UINT8, source)
    sig = sigmoid_grid(sig) if sig is not None else None
    if sig is not None and pre is None:
        raise QConfigError(f"{_where(source, d, 'sigmoid')}: {SIGMOID_NEEDS_PREACT}")
    rules_raw = d.get("rules") or []
    if not isinstance(rules_raw, list):
        raise QConfigError(f"{_where(source, d, 'rules')}: rules must be a list, not {short(rules_raw)}")
    defaults = d.get("default_rules", True)
    if not isinstance(defaults, bool):
        raise QConfigError(f"{_where(source, d, 'default_rules')}: default_rules must be true or false, not "
                           f"{short(defaults)}")
    rules = (DEFAULT_RULES if defaults else ()) + tuple(_rule(r, source, i) for i, r in enumerate(rules_raw))
    return QConfig(weight=weight, activation=act, input=inp, preact=pre, sigmoid=sig, rules=rules, source=source)


# ------------------------------------------------------------------------------------------ built-in presets
PRESET_DIR = "qconfigs"  # package data: fxqat/qconfigs/*.yaml


def _preset_root():
    return resources.files("fxqat").joinpath(PRESET_DIR)


def preset_names() -> tuple[str, ...]:
    """Names of the built-in presets (``fxqat/qconfigs/<name>.yaml``, loaded through importlib.resources)."""
    return tuple(sorted(p.name[:-5] for p in _preset_root().iterdir() if p.name.endswith(".yaml")))


def preset_text(name: str) -> str:
    """The YAML text of built-in preset ``name`` ("tensorrt" or "tensorrt.yaml")."""
    stem = re.sub(r"\.ya?ml$", "", name)
    if stem not in preset_names():
        raise QConfigError(f"{short(name)}: no built-in qconfig preset of that name; presets: "
                           f"{', '.join(preset_names())}")
    return _preset_root().joinpath(f"{stem}.yaml").read_text(encoding="utf-8")


_REF = re.compile(r"(?:[A-Za-z]:)?[\w.~/\\ -]+")  # a file path or preset name, not YAML text


def _read_ref(ref: str) -> tuple[str, str]:
    """(text, source) of a file path that exists, else of the built-in preset a bare name names."""
    path = Path(ref).expanduser()
    if path.is_file():
        try:
            if path.stat().st_size > MAX_BYTES:
                raise QConfigError(f"{path}: {path.stat().st_size} bytes; a qconfig is at most {MAX_BYTES} bytes")
            return path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise QConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise QConfigError(f"{path}: cannot read: {e.strerror}") from None
    if path.exists():
        raise QConfigError(f"{path}: not a file; give a qconfig YAML file or a preset name")
    names = preset_names()
    stem = re.sub(r"\.ya?ml$", "", path.name)
    bare = str(path.parent) == "." and not ref.startswith((".", "/", "~"))
    if bare and stem in names:
        return preset_text(stem), f"fxqat/{PRESET_DIR}/{stem}.yaml"
    what = f"no such qconfig file or built-in preset{_suggest(stem, names)}" if bare else "no such qconfig file"
    raise QConfigError(f"{short(ref)}: {what}; built-in presets load by name (e.g. qconfig=\"tensorrt\"): "
                       f"{', '.join(names)}")


def load_qconfig(path_or_text) -> QConfig:
    """Load and validate a qconfig: a path to a YAML file (a file on disk wins), a built-in preset's name
    ("tensorrt" or "tensorrt.yaml", see :func:`preset_names`), or YAML text. Raises :class:`fxqat.QConfigError`."""
    if isinstance(path_or_text, Path):
        text, source = _read_ref(str(path_or_text))
    elif isinstance(path_or_text, str):
        if len(path_or_text) < 4096 and "\n" not in path_or_text and _REF.fullmatch(path_or_text.strip()):
            text, source = _read_ref(path_or_text.strip())
        else:
            text, source = path_or_text, "<string>"
    else:
        raise QConfigError(f"qconfig {short(path_or_text)}: give a YAML path, a preset name or YAML text")
    data = _parse(text, source)
    if data is None:
        raise QConfigError(f"{source}: empty qconfig; it needs at least 'version: 1'")
    return qconfig_from_mapping(data, source)


def dump_qconfig(qc: QConfig, extra_rules: list[dict] | None = None, header: str = "") -> str:
    """YAML text for ``qc`` (its non-default rules) plus ``extra_rules`` (already in YAML form)."""
    def spec(s: QuantSpec, section: str) -> dict:
        out = {k: getattr(s, k) for k in SECTION_KEYS[section] if k != "percentile" or s.observer == "percentile"}
        if out.get("fixed") is not None:
            out["fixed"] = list(out["fixed"])
        return out

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
    doc = {"version": 1, "weight": spec(qc.weight, "weight"), "activation": spec(qc.activation, "activation"),
           "input": spec(qc.input, "input"), "preact": spec(qc.preact, "preact") if qc.preact is not None else None,
           "sigmoid": spec(qc.sigmoid, "sigmoid") if qc.sigmoid is not None else None,
           "default_rules": any(r in DEFAULT_RULES for r in qc.rules), "rules": rules + list(extra_rules or [])}
    return header + yaml.safe_dump(doc, sort_keys=False)


__all__ = ["load_qconfig", "dump_qconfig", "qconfig_from_mapping", "preset_names", "preset_text", "IMAGE_INPUT"]

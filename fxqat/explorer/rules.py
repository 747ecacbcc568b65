"""Which qconfig rule set a node (file:line and the rule's text), and the qconfig YAML the page downloads.

``rule_info`` replays :meth:`QConfig.resolve`'s precedence order to list every rule that matched a node, the last one
being the rule that set it (``NodeQSpec.source``). fxqat's built-in rules point at their line in
``fxqat/qconfig/config.py``; the global sections at their ``weight:`` / ``activation:`` lines.

``selection_yaml`` is the Python twin of the page's ``qconfigYaml`` (explorer.js): the base qconfig as
:func:`fxqat.qconfig.dump_qconfig` writes it, plus one ``match: {name: ...}`` rule per selected node. The two build
the same text from the same two pieces (``yaml_parts``), and a test compares them in a browser.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from ..errors import FxqatError
from ..qconfig.config import QConfig, Rule
from ..qconfig.schema import LEVELS

# what a selected node becomes: the YAML lines of its rule (after "- match: {name: ...}")
ACTIONS = {
    "a16": ["  activation: {bits: 16, observer: minmax}"],
    "float16": ["  weight: float", "  activation: {bits: 16, observer: minmax}"],
    "skip": ["  skip: true"],
}
# (no 16-bit weights: fxqat's per-channel weight observers are torch.ao's, which take at most 8 bits)
ACTION_HELP = {
    "a16": "a 16-bit output grid (weights as they are)",
    "float16": "float weights and a 16-bit output grid (what fxqat analyze writes)",
    "skip": "skip: weights and output float (quantized only where quantized consumers need it)",
}
_BUILTIN = {"weight": "WEIGHT_INT8", "activation": "ACT_UINT8", "input": "IMAGE_INPUT"}
_LOC = re.compile(r"^(?P<file>.+):(?P<line>\d+)$")


def _config_lines() -> list[str]:
    from ..qconfig import config

    return inspect.getsource(config).splitlines()


def _default_rule_location(rule: Rule) -> str:
    """``fxqat/qconfig/config.py:LINE`` of a built-in rule (its ``Rule(...)`` line in DEFAULT_RULES)."""
    needle = f'Rule("{rule.level}", "{rule.pattern}"'
    for k, line in enumerate(_config_lines(), 1):
        if needle in line:
            return f"fxqat/qconfig/config.py:{k}"
    return "fxqat/qconfig/config.py"  # pragma: no cover - the rule is defined there


def source_lines(source: str, qconfig_text: str | None = None) -> list[str] | None:
    """The text lines of a qconfig ``source`` (a file, a built-in preset, or the given YAML text)."""
    if source in ("<string>", "<checkpoint>") and qconfig_text is not None:
        return qconfig_text.splitlines()
    p = Path(source)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
    if source.startswith("fxqat/qconfigs/"):
        from ..qconfig.io import preset_text

        return preset_text(Path(source).stem).splitlines()
    return None


def rule_text(lines: list[str] | None, line: int) -> str:
    """The rule starting at 1-based ``line``: that line and the following lines indented deeper."""
    if not lines or not 0 < line <= len(lines):
        return ""
    first = lines[line - 1]
    indent = len(first) - len(first.lstrip(" -"))
    out = [first]
    for text in lines[line:line + 8]:
        if not text.strip() or len(text) - len(text.lstrip(" ")) < indent or text.lstrip().startswith("- "):
            break
        out.append(text)
    return "\n".join(out)


def _describe(rule: Rule) -> str:
    parts = [f"match {{{rule.level}: {rule.pattern}}}"]
    if rule.skip:
        parts.append("skip")
    for k in ("weight", "activation"):
        v = getattr(rule, k)
        if v is not None:
            parts.append(f"{k}: {v}")
    return ", ".join(parts)


def _matching_rules(node, kind: str, qc: QConfig) -> list[Rule]:
    """Every rule matching ``node``, in the order :meth:`QConfig.resolve` applies them (the last one wins)."""
    return [r for level in LEVELS for r in qc.rules if r.level == level and r.matches(node)]


def _top_key_line(lines: list[str] | None, key: str) -> int | None:
    for k, text in enumerate(lines or [], 1):
        if text.startswith(f"{key}:"):
            return k
    return None


def _builtin(names: list[str]) -> tuple[str, str]:
    """(file:line list, their text) of fxqat's built-in specs ``names`` in fxqat/quant/spec.py."""
    from ..quant import spec

    lines = inspect.getsource(spec).splitlines()
    hits = [next((k for k, t in enumerate(lines, 1) if t.startswith(f"{n} = ")), None) for n in names]
    return (", ".join(f"fxqat/quant/spec.py:{k}" for k in hits if k), "\n".join(lines[k - 1] for k in hits if k))


def _where(rule: Rule) -> str:
    return _default_rule_location(rule) if rule.where == "<default>" else rule.where


def rule_info(node, kind: str, q, qc: QConfig | None, qconfig_text: str | None = None) -> dict:
    """``{"source", "where", "text", "matched"}``: what set the node's NodeQSpec, as file:line where one exists."""
    src = q.source
    out = {"source": src, "where": None, "text": "", "matched": []}
    if qc is None:
        return out
    if kind in ("conv", "add"):
        rules = _matching_rules(node, kind, qc)
        out["matched"] = [{"where": _where(r), "rule": _describe(r)} for r in rules]
        if rules:
            last = rules[-1]
            out["where"] = _where(last)
            if last.where == "<default>":
                m = _LOC.match(out["where"])
                out["text"] = _config_lines()[int(m["line"]) - 1].strip() if m else _describe(last)
            else:
                m = _LOC.match(last.where)
                lines = source_lines(m["file"], qconfig_text) if m else None
                out["text"] = rule_text(lines, int(m["line"])) if m else ""
                out["text"] = out["text"] or _describe(last)
            return out
    if src == "global":  # each section's line in the qconfig file, else fxqat's built-in spec
        lines = source_lines(qc.source, qconfig_text)
        found = []
        for key in (["weight", "activation"] if kind == "conv" else ["activation"]):
            k = _top_key_line(lines, key)
            found.append((f"{qc.source}:{k}", lines[k - 1]) if k else _builtin([_BUILTIN[key]]))
        out["where"] = ", ".join(w for w, _ in found)
        out["text"] = "\n".join(t for _, t in found) + "\n(no rule matched this node: the global specs apply)"
    elif src == "input":
        lines = source_lines(qc.source, qconfig_text)
        k = _top_key_line(lines, "input")
        if k:
            out["where"], out["text"] = f"{qc.source}:{k}", lines[k - 1]
        else:
            out["where"], out["text"] = _builtin(["IMAGE_INPUT"])
        out["text"] += "\n(the image input's grid)"
    else:
        out["text"] = {"read by a quantized op": "not quantizable itself: put on a grid because a quantized op "
                       "reads it", "shares its input's grid": "shares its input's grid (concat / pool / resize / "
                       "split have no quantizer of their own)"}.get(src, src)
    return out


# ------------------------------------------------------------------------------------------- downloaded YAML
def yaml_parts(qc: QConfig) -> dict:
    """The base qconfig as dump_qconfig writes it, cut in two: everything before ``rules:``, and its rules' items."""
    from ..qconfig.io import dump_qconfig

    text = dump_qconfig(qc)
    head, sep, rest = text.partition("\nrules:")
    if not sep:  # pragma: no cover - dump_qconfig always writes rules
        raise FxqatError("dump_qconfig wrote no 'rules:' key")
    rest = rest.strip("\n")
    items = "" if rest.strip() == "[]" else rest + "\n"
    return {"head": head + "\n", "items": items, "source": qc.source}


def selection_yaml(parts: dict, selected: list[dict], action: str) -> str:
    """The qconfig YAML raising or skipping ``selected`` (node records: name, module_path, role). The page's
    ``qconfigYaml`` (explorer.js) writes the same text."""
    if action not in ACTIONS:
        raise FxqatError(f"action={action!r}: valid choices are {', '.join(ACTIONS)}")
    lines = [f"# fxqat explore: {len(selected)} node(s) set to {action}: {ACTION_HELP[action]}",
             f"# base qconfig: {parts['source']}"]
    lines += [f"#   {s['name']} ({s['module_path'] or '-'}, {s['role'] or '-'})" for s in selected]
    rules = parts["items"]
    for s in selected:
        rules += "\n".join([f'- match: {{name: "{s["name"]}"}}'] + ACTIONS[action]) + "\n"
    return "\n".join(lines) + "\n" + parts["head"] + "rules:" + ("\n" + rules if rules else " []\n")


__all__ = ["ACTIONS", "ACTION_HELP", "rule_info", "yaml_parts", "selection_yaml"]

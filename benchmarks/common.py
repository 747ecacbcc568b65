"""Shared helpers: machine description, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    cpu, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu.strip():
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "vnni", "fma"))]
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "flags": flags, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def interleaved_medians(fns, x, rounds, engines=None):
    """Median ms per row over interleaved rounds (fxqat's own helper)."""
    from fxqat.bench import interleaved_medians as _im

    return _im(fns, x, rounds, engines)


def save(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    return path


def markdown(rows: list[dict], cols: list[str], head: list[str] | None = None, fmt: dict | None = None) -> str:
    """A markdown table of ``cols`` (titled ``head``); ``fmt``: column → format string; booleans as yes / no, missing
    values empty."""
    fmt = fmt or {}

    def cell(v, c):
        if v is None or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        return fmt[c].format(v) if c in fmt else str(v)

    lines = ["| " + " | ".join(head or cols) + " |", "|" + " --- |" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c), c) for c in cols) + " |" for r in rows])


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"  # not measured for this row (no file, no child process)
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [cols] + [[_cell(r.get(c)) for c in cols] for r in rows]
    w = [max(len(x[i]) for x in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(k) for v, k in zip(row, w)) for row in cells)

"""The self-contained HTML page: the template files (package data) with the data inlined as JSON. No network."""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

TEMPLATE_DIR = "template"  # fxqat/explorer/template/: explorer.html, explorer.css and the scripts
JS_FILES = ("layout.js", "graph.js", "explorer.js")  # inlined in this order


def _read(name: str) -> str:
    return resources.files("fxqat.explorer").joinpath(TEMPLATE_DIR, name).read_text(encoding="utf-8")


def render(data: dict) -> str:
    """The page for ``data`` (see :func:`fxqat.explorer.build.collect`)."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    page = _read("explorer.html")
    for key, value in (("{{TITLE}}", html.escape(data.get("title") or "fxqat explore")), ("{{CSS}}", _read("explorer.css")),
                       ("{{DATA}}", blob), ("{{JS}}", "\n".join(_read(f) for f in JS_FILES))):
        page = page.replace(key, value)
    return page


def write(data: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    return path


def embedded_data(page: str) -> dict:
    """The JSON a page embeds (for tests and tools)."""
    start = page.index('<script type="application/json" id="fxqat-data">') + len(
        '<script type="application/json" id="fxqat-data">')
    end = page.index("</script>", start)
    return json.loads(page[start:end].replace("<\\/", "</"))

"""Regenerate docs/explore.png: the explorer page of the shipped fxqat-signs-yolov8n with the mixed_w4 preset (imgsz 256,
4 generated sign images) in
headless Chromium, with layer 4 open, a 4-bit conv's details shown and two nodes in the qconfig selection.

    python docs/explore_screenshot.py [PAGE.html]      # needs chromium and websocket-client

A PAGE.html given is re-rendered with the current templates from the data it embeds (no model run).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.explore.cdp import Browser  # noqa: E402


def main(page=None):
    if page is None:
        import fxqat

        page = fxqat.explore("fxqat-signs-yolov8n", out=ROOT / "runs" / "explore" / "shipped.html", imgsz=256, images=4,
                             qconfig="mixed_w4")
    else:
        from fxqat.explorer import embedded_data, render

        fresh = ROOT / "runs" / "explore" / "rerendered.html"
        fresh.parent.mkdir(parents=True, exist_ok=True)
        fresh.write_text(render(embedded_data(Path(page).read_text())))
        page = fresh
    with Browser(1600, 1000) as b:
        b.open(page)
        for layer in ("model.4", "model.4.m.0"):
            b.click_selector(f'svg .node[data-key="g:{layer}"]')
        b.click_selector('svg .node[data-name="model_4_m_0_cv2"]')
        b.click_selector('svg .node[data-name="model_4_cv1"]', modifiers=2)
        b.click_selector('svg .node[data-name="add_1"]', modifiers=2)
        b.js("fxqatExplorer.center('n:' + fxqatExplorer.data.nodes.find(n => n.name === 'model_4_m_0_cv2').id, 0.8)")
        out = b.screenshot(ROOT / "docs" / "explore.png")
    print(f"screenshot: {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

"""The page in a real browser (headless Chromium over the DevTools protocol): click a block open, click a node, and
read the details panel: its rule (file:line) and its scale, as the model has them. Ctrl-click builds a qconfig
selection whose YAML is the Python twin's, byte for byte, and loads with fxqat's loader.

Needs Debian's ``chromium`` and ``websocket-client``; skipped (with the reason) without them."""

import json

import pytest

import fxqat
from fxqat.explorer.rules import ACTIONS, selection_yaml

from .cdp import find_browser
from .conftest import QCONFIG, line_of

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(find_browser() is None, reason="Chromium not installed (apt-get install -y chromium)")]
CTRL = 2


@pytest.fixture(scope="module")
def browser(explored):
    pytest.importorskip("websocket", reason="websocket-client not installed (pip install websocket-client)")
    from .cdp import Browser

    _, _, page, _ = explored
    with Browser() as b:
        b.open(page)
        yield b


def _text(b, selector):
    return b.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || null")


def test_click_node_shows_rule_and_scale(browser, explored):
    gm, data, _, qfile = explored
    b = browser
    assert b.js('document.querySelector("svg .node[data-name=model_2_cv1]")') is None  # layer 2 starts collapsed
    b.click_selector('svg .node[data-key="g:model.2"]')
    b.click_selector('svg .node[data-name="model_2_cv1"]')
    assert _text(b, "#d-name") == "model_2_cv1"
    assert f"{qfile}:{line_of(QCONFIG, 'name: model_2_cv1')}" in _text(b, "#d-rule")
    scale = float(_text(b, "#d-scale"))
    assert scale == pytest.approx(float(gm.get_submodule("quant.model_2_cv1").scale), rel=1e-5)  # 6 digits shown
    assert int(_text(b, "#d-zp")) == int(gm.get_submodule("quant.model_2_cv1").zero_point)
    painted = b.js("(() => { const c = document.getElementById('c-act'); const d = c.getContext('2d')"
                   ".getImageData(0, 0, c.width, c.height).data; let k = 0; for (let i = 3; i < d.length; i += 4)"
                   " k += d[i] > 0; return k; })()")
    assert painted > 1000  # the histogram is drawn
    b.click_selector('svg .group .ghead')  # the open block's header closes it again
    assert b.js('document.querySelector("svg .node[data-name=model_2_cv1]")') is None


def test_ctrl_click_selection_downloads_the_python_yaml(browser, explored):
    _, data, _, _ = explored
    b = browser
    b.click_selector('svg .node[data-key="g:model.6"]')
    b.click_selector('svg .node[data-name="model_6_cv1"]', modifiers=CTRL)
    b.click_selector('svg .node[data-name="quant_model_6_cv2"]', modifiers=CTRL)  # a quantizer: its grid's owner
    text = _text(b, "#yaml")
    recs = {n["name"]: n for n in data["nodes"]}
    assert text == selection_yaml(data["yaml"], [recs["model_6_cv1"], recs["model_6_cv2"]], "a16")
    qc = fxqat.load_qconfig(text)
    assert [r.pattern for r in qc.rules if r.level == "name"][-2:] == ["model_6_cv1", "model_6_cv2"]
    for action in ACTIONS:  # the JS twin writes the same text for every action
        names = ["model_0", "add", "model_21_m_0_cv2"]
        js = b.js(f"fxqatExplorer.qconfigYaml({json.dumps(names)}, {json.dumps(action)})")
        assert js == selection_yaml(data["yaml"], [recs[n] for n in names], action)


def test_search_reveals_a_node(browser):
    b = browser
    b.js("(() => { const s = document.getElementById('search'); s.value = 'model.9.m';"
         " s.dispatchEvent(new Event('input')); s.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'})); })()")
    assert _text(b, "#d-name") == "model_9_m"
    assert b.js('!!document.querySelector("svg .node.sel[data-name=model_9_m]")')  # layer 9 opened, node marked

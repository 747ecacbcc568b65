import shutil
import xml.etree.ElementTree as ET

import pytest

import fxqat
from fxqat.errors import FxqatError

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")


def test_dot_collapsed_and_expanded(v8n_graph, tmp_path):
    collapsed = fxqat.draw(v8n_graph, tmp_path / "g.dot").read_text()
    assert "22: Detect" in collapsed and "9: SPPF" in collapsed
    assert "model_2_m_0_cv1_conv" not in collapsed  # layers collapsed by default
    expanded = fxqat.draw(v8n_graph, tmp_path / "e.dot", expand=[2]).read_text()
    assert "model_2_m_0_cv1_conv" in expanded and "cluster_2" in expanded
    assert "model_4_m_0_cv1_conv" not in expanded
    full = fxqat.draw(v8n_graph, tmp_path / "a.dot", expand="all").read_text()
    assert full.count("->") > collapsed.count("->") > 20


@needs_dot
def test_svg_png_html(v8n_graph, tmp_path):
    svg = fxqat.draw(v8n_graph, tmp_path / "g.svg")
    ET.parse(svg)  # well-formed XML
    png = fxqat.draw(v8n_graph, tmp_path / "g.png", expand=["model.9"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = fxqat.draw(v8n_graph, tmp_path / "g.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "http" not in page.split("<svg")[0]


def test_bad_arguments(v8n_graph, tmp_path):
    with pytest.raises(FxqatError, match="valid choices: .svg"):
        fxqat.draw(v8n_graph, tmp_path / "g.jpg")
    with pytest.raises(FxqatError, match="matches no layer"):
        fxqat.draw(v8n_graph, tmp_path / "g.dot", expand=["model.99"])
    with pytest.raises(FxqatError, match="valid choices are 'op'"):
        fxqat.draw(v8n_graph, tmp_path / "g.dot", color_by="rainbow")

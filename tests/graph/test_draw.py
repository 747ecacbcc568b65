import re
import shutil
import xml.etree.ElementTree as ET

import pytest

import fxqat
from fxqat.errors import FxqatError
from fxqat.graph.draw import OP_COLORS, PRECISION_COLORS

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
    page = fxqat.draw(v8n_graph, tmp_path / "g.html").read_text()  # the explorer page (tests/explore)
    assert page.startswith("<!DOCTYPE html>") and '<svg id="graph"' in page and "model_2_m_0_cv1" in page


def test_bad_arguments(v8n_graph, tmp_path):
    with pytest.raises(FxqatError, match="valid choices: .svg"):
        fxqat.draw(v8n_graph, tmp_path / "g.jpg")
    with pytest.raises(FxqatError, match="matches no layer"):
        fxqat.draw(v8n_graph, tmp_path / "g.dot", expand=["model.99"])
    with pytest.raises(FxqatError, match="valid choices are 'op'"):
        fxqat.draw(v8n_graph, tmp_path / "g.dot", color_by="rainbow")


def _fills(dot_text: str) -> dict[str, str]:
    """node id → fill colour in a .dot file written by fxqat.draw."""
    return dict(re.findall(r'^\t+(\w+) \[label=".*?" fillcolor="(#[0-9a-f]{6})"', dot_text, re.M | re.S))


def test_op_colours_of_specific_nodes(v8n_graph, tmp_path):
    fills = _fills(fxqat.draw(v8n_graph, tmp_path / "o.dot", expand="all").read_text())
    assert fills["model_0_conv"] == OP_COLORS["conv"] and fills["model_0_bn"] == OP_COLORS["bn"]
    assert fills["model_0_act"] == OP_COLORS["act"] and fills["cat"] == OP_COLORS["concat"]
    assert fills["model_9_m"] == OP_COLORS["pool"] and fills["model_10"] == OP_COLORS["resize"]
    assert fills["x"] == OP_COLORS["io"]
    collapsed = _fills(fxqat.draw(v8n_graph, tmp_path / "c.dot").read_text())
    assert collapsed["layer2"] == OP_COLORS["layer"]


def test_precision_colours_of_specific_nodes(tmp_path):
    gm = fxqat.prepare_qat("yolov8n.yaml", "mixed_w4")
    fills = _fills(fxqat.draw(gm, tmp_path / "p.dot", color_by="precision", expand="all").read_text())
    C = PRECISION_COLORS
    assert fills["model_2_cv1"] == fills["quant_model_2_cv1"] == C["int8"]  # INT8 conv and its quantizer
    assert fills["model_4_cv1"] == fills["model_6_m_0_cv2"] == C["int4"]  # mixed_w4: 4-bit weights in layers 4-6
    assert fills["cat"] == fills["chunk"] == C["int8"]  # C2f's split and concat lie on cv1's uint8 grid
    assert fills["cat_13"] == fills["cat_14"] == C["float"]  # Detect's concats lie on no grid: float
    assert fills["x"] == fills["quant_x"] == C["int8"]  # the image is annotated with the grid it is quantized to
    assert fills["model_22_cv2_0_2"] == C["int8"]  # box_last: INT8 weights, float output
    collapsed = _fills(fxqat.draw(gm, tmp_path / "c.dot", color_by="precision").read_text())
    assert collapsed["layer0"] == C["int8"] and collapsed["layer4"] == collapsed["layer22"] == C["mixed"]

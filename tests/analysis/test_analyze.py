import json
import re

import torch

import fxqat
from fxqat.graph.draw import PRECISION_COLORS, _sens_color
from fxqat.models import load_model

from ..conftest_helpers import liven, signs_like_images


def _fills(dot_text: str) -> dict[str, str]:
    """node id → fill colour in a .dot file written by fxqat.draw."""
    return dict(re.findall(r'^\t+(\w+) \[label=".*?" fillcolor="(#[0-9a-f]{6})"', dot_text, re.M | re.S))


def test_analyze_writes_report_and_usable_qconfig(tmp_path):
    torch.manual_seed(0)  # the model's initial weights: not whatever the tests before left in the global generator
    model = liven(load_model("yolov8n.yaml", nc=10))
    with torch.no_grad():  # an outlier channel: model.4.cv1's channel 0 reaches ~100 while the others stay ~3, so
        bn = model.model[4].cv1.bn  # its per-tensor output grid crushes every other channel of that tensor
        bn.weight[0], bn.bias[0] = 30.0, 40.0
    rep = fxqat.analyze(model, signs_like_images(8, 160), imgsz=160, images=8, out=tmp_path, topk=3, progress=False)
    assert rep.summary["units"] == 63 and rep.summary["images"] == 8
    ranking = rep.ranking()
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    assert ranking[0]["name"] == "model_4_cv1"  # the layer made sensitive ranks first
    assert ranking[0]["score"] > 2 * ranking[1]["score"]
    for r in rep.layers:
        assert r["weight_sqnr"] > 10  # INT8 per-channel weights: tens of dB
        assert 0 <= r["alone_nsr"] < 1
    data = json.loads((tmp_path / "sensitivity.json").read_text())
    assert len(data["layers"]) == 63
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    qc = fxqat.load_qconfig(tmp_path / "critical_qconfig.yaml")
    raised = [r.pattern for r in qc.rules if r.where != "<default>"]
    assert raised == rep.critical(3)
    gm = fxqat.prepare_qat(model, qc)  # the generated file feeds back into prepare_qat
    for name in raised:
        node = next(n for n in gm.graph.nodes if n.name == name)
        assert gm.get_submodule(node.target).weight_fq is None
        fq = next(u for u in node.users if u.op == "call_module" and u.target.startswith("quant."))
        assert gm.get_submodule(fq.target).spec.bits == 16
    # raising the critical layers improves the head-output SQNR (measured on the same images)
    assert rep.summary["head_sqnr_db_critical_raised"] > rep.summary["head_sqnr_db"]
    dot = fxqat.draw(gm, tmp_path / "s.dot", color_by="sensitivity", sensitivity=tmp_path / "sensitivity.json",
                     expand="all")
    fills = _fills(dot.read_text())
    top, low = ranking[0], ranking[-1]
    assert fills[top["name"]] == _sens_color(top["score"], top["score"])  # the hottest colour
    assert fills[low["name"]] == _sens_color(low["score"], top["score"]) != fills[top["name"]]
    assert "first_conv" in {r["role"] for r in rep.layers}


def test_draw_by_precision(tmp_path):
    gm = fxqat.prepare_qat("yolov8n.yaml", "head_float")
    fills = _fills(fxqat.draw(gm, tmp_path / "p.dot", color_by="precision").read_text())  # one box per layer
    assert fills["layer22"] == PRECISION_COLORS["float"]  # the whole Detect head is float
    assert fills["layer21"] == fills["layer0"] == PRECISION_COLORS["int8"]  # convs and their quantizers INT8
    fills = _fills(fxqat.draw(gm, tmp_path / "e.dot", color_by="precision", expand=[22]).read_text())
    assert fills["model_22_cv2_0_0"] == fills["cat_13"] == PRECISION_COLORS["float"]

"""fxqat.explore / the CLI / fxqat.draw(..., "x.html"): arguments, checkpoints, analysis results, no network."""

import json
import re
import subprocess
import sys

import pytest

import fxqat
from fxqat.cli import main
from fxqat.errors import FxqatError
from fxqat.explorer import embedded_data


def test_cli_bad_arguments_exit_2():
    r = subprocess.run([sys.executable, "-m", "fxqat.cli", "explore", "yolov8n.yaml", "imgsz=100"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "imgsz=100: must be a positive multiple of 32" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert main(["explore", "yolov8n.yaml", "colour=red"]) == 2
    assert main(["explore", "yolov8n.yaml", "color_by=rainbow"]) == 2
    assert main(["explore", "yolov8n.yaml", "images=0"]) == 2
    assert main(["explore"]) == 2


def test_cli_writes_the_page(tmp_path, capsys):
    out = tmp_path / "p.html"
    assert main(["explore", "yolov8n.yaml", "imgsz=64", "images=1", f"out={out}", "qconfig=head_float"]) == 0
    assert "explorer page written" in capsys.readouterr().out
    data = embedded_data(out.read_text())
    assert data["images_note"].startswith("calibrated on 1 images from fxqat's built-in traffic-sign generator")
    box = next(n for n in data["nodes"] if n["name"] == "model_22_cv2_0_0")
    assert box["label"] == "float" and box["rule"]["where"].startswith("fxqat/qconfigs/head_float.yaml:")
    assert main(["explore", "nope.yaml", f"out={out}"]) == 1


def test_page_needs_no_network(explored):
    _, _, page, _ = explored
    text = page.read_text()
    assert set(re.findall(r"https?://[^\s\"'<>)]+", text)) == {"http://www.w3.org/2000/svg"}  # SVG's namespace only
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", text)
    assert page.stat().st_size < 3_000_000


def test_analysis_results_rank_nodes(explored, tmp_path):
    gm, _, _, _ = explored
    rep = {"summary": {"head_sqnr_db": 20.0, "units": 2},
           "layers": [{"name": "model_0", "score": 0.2, "gain": 0.1, "alone_nsr": 0.01, "weight_sqnr": 40.0,
                       "act_sqnr": 30.0}, {"name": "model_3", "score": 0.5, "gain": 0.4, "alone_nsr": 0.02}]}
    (tmp_path / "sensitivity.json").write_text(json.dumps(rep))
    page = fxqat.explore(gm, out=tmp_path / "a.html", imgsz=64, images=1, analysis=tmp_path, color_by="sensitivity",
                         progress=False)
    data = embedded_data(page.read_text())
    by = {n["name"]: n for n in data["nodes"]}
    assert by["model_3"]["analysis"]["rank"] == 1 and by["model_0"]["analysis"]["rank"] == 2
    assert by["model_0"]["analysis"]["act_sqnr"] == 30.0 and "analysis" not in by["model_1"]
    assert data["color_by"] == "sensitivity" and data["analysis_summary"]["head_sqnr_db"] == 20.0
    (tmp_path / "other.json").write_text(json.dumps({"layers": [{"name": "conv_of_another_model", "score": 1.0}]}))
    with pytest.raises(FxqatError, match="none of its 1 layers"):
        fxqat.explore(gm, out=tmp_path / "b.html", imgsz=64, images=1, analysis=tmp_path / "other.json")
    with pytest.raises(FxqatError, match="analysis=.*no such file"):
        fxqat.explore(gm, out=tmp_path / "b.html", imgsz=64, images=1, analysis=tmp_path / "missing")
    with pytest.raises(FxqatError, match="color_by='sensitivity' needs analysis="):
        fxqat.explore(gm, out=tmp_path / "b.html", color_by="sensitivity")


def test_checkpoint_ranges_are_shown_as_stored(explored, tmp_path):
    from fxqat.checkpoint import save_checkpoint

    gm, _, _, _ = explored
    ckpt = save_checkpoint(tmp_path / "q.pt", gm)
    page = fxqat.explore(ckpt, out=tmp_path / "c.html", imgsz=64, images=1, progress=False)
    data = embedded_data(page.read_text())
    assert data["images_note"].startswith("ranges as stored in the checkpoint")
    q = next(n for n in data["nodes"] if n["name"] == "model_2_cv1")
    assert q["quantizer"]["scale"] == pytest.approx(float(gm.get_submodule("quant.model_2_cv1").scale), rel=1e-6)
    assert re.fullmatch(r"q\.pt\[qconfig\]:\d+", q["rule"]["where"])  # a line of the checkpoint's own qconfig
    line = int(q["rule"]["where"].rsplit(":", 1)[1])
    assert data["qconfig"]["text"].splitlines()[line - 1].startswith("- match:") and "model_2_cv1" in q["rule"]["text"]
    with pytest.raises(FxqatError, match="checkpoint with its own qconfig"):
        fxqat.explore(ckpt, out=tmp_path / "d.html", qconfig="tensorrt")


def test_draw_html_is_the_explorer(v8n_graph, tmp_path):
    page = fxqat.draw(v8n_graph, tmp_path / "g.html", expand=[2], color_by="op")
    data = embedded_data(page.read_text())
    assert data["expand"] == ["model.2"] and data["color_by"] == "op" and not data["has_stats"]
    assert {"model.2", "model.22"} <= set(data["groups"]) and len(data["nodes"]) == len(v8n_graph.graph.nodes)
    page = fxqat.draw(v8n_graph, tmp_path / "s.html", color_by="sensitivity", sensitivity={"model_0_conv": 1.0})
    assert next(n for n in embedded_data(page.read_text())["nodes"] if n["name"] == "model_0_conv")["analysis"]["rank"] == 1
    with pytest.raises(FxqatError, match="valid choices are precision, sensitivity, sqnr, op"):
        fxqat.draw(v8n_graph, tmp_path / "r.html", color_by="rainbow")


def test_images_from_a_data_yaml(explored, tiny_data, tmp_path):
    gm, _, _, _ = explored
    page = fxqat.explore(gm, out=tmp_path / "d.html", data=tiny_data, imgsz=64, images=3, progress=False)
    data = embedded_data(page.read_text())
    assert data["images_note"] == f"ranges as stored; histograms from 3 images from {tiny_data}"
    act = next(n for n in data["nodes"] if n["name"] == "model_0")["stats"]["act"]
    assert act["n"] == 3 * 16 * 32 * 32  # 3 images of 64 px: model.0's 16 x 32 x 32 output each
    with pytest.raises(FxqatError, match="image folder not found"):
        fxqat.explore(gm, out=tmp_path / "e.html", data=tmp_path / "nowhere", imgsz=64)

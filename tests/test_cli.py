import subprocess
import sys

from fxqat.cli import main


def test_trace_command_prints_summary(tmp_path, capsys):
    out = tmp_path / "s.txt"
    assert main(["trace", "yolov8n.yaml", "imgsz=320", f"out={out}", f"draw={tmp_path / 'g.dot'}"]) == 0
    text = capsys.readouterr().out
    assert "model.0.conv" in text and "1x16x160x160" in text
    assert out.read_text().startswith("name")
    assert (tmp_path / "g.dot").exists()


def test_dash_dash_style(capsys):
    assert main(["trace", "yolov8n.yaml", "--mode", "train", "--imgsz", "256"]) == 0
    assert "1x16x128x128" in capsys.readouterr().out


def test_user_errors_are_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "fxqat.cli", "trace", "nope.yaml"], capture_output=True, text=True)
    assert r.returncode == 1
    assert "nope.yaml" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "fxqat.cli", "trace", "yolov8n.yaml", "colour=red"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument 'colour'" in r.stderr and "imgsz" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fxqat.cli", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "valid: demo, data, trace" in r.stderr


def test_eval_and_export_commands(tiny_qat_run, tiny_data, tmp_path, capsys):
    _, best = tiny_qat_run
    assert main(["eval", str(best), f"data={tiny_data}", "imgsz=128", "batch=8", f"out={tmp_path / 'r.json'}"]) == 0
    out = capsys.readouterr().out
    for label in ("QAT fake-quant", "INT8 torch", "QDQ ONNX (ORT)"):
        assert label in out
    assert main(["export", str(best), "imgsz=128", f"out={tmp_path / 'm.onnx'}"]) == 0
    out = capsys.readouterr().out
    assert "scale changes around Concat/MaxPool/Resize/Split: none" in out
    assert (tmp_path / "m.onnx").exists()


def test_data_command(tmp_path, capsys):
    assert main(["data", "signs", str(tmp_path / "d"), "train=2", "val=1", "imgsz=64"]) == 0
    assert (tmp_path / "d" / "data.yaml").exists()
    assert main(["data", "signs", str(tmp_path / "e"), "imgsz=100"]) == 1


def test_demo_quick(tmp_path, capsys):
    import json

    assert main(["demo", "--quick", f"project={tmp_path / 'demo'}"]) == 0
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert rep["model"] == "fxqat-signs-yolov8n" and isinstance(rep["qat_kept_ptq_start"], bool)
    rows = {r["model"]: r for r in rep["rows"]}
    assert list(rows) == ["FP32", "PTQ INT8", "QAT INT8", "QAT INT8 QDQ", "PTQ INT8 QDQ"]
    assert "ONNX Runtime" in rows["PTQ INT8 QDQ"]["runtime"]  # OpenVINO: 7-bit weights where its kernels saturate
    assert rows["QAT INT8 QDQ"]["runtime"] == "OpenVINO" + ("" if rep["machine"]["vnni"] else ", 7-bit weights (no VNNI)")
    for r in rows.values():  # every form was evaluated and timed in this run
        assert 0 <= r["mAP50-95"] <= r["mAP50"] <= 1 and r["latency_ms"] > 0 and r["size_mb"] > 0
    assert rows["QAT INT8"]["size_mb"] < 0.3 * rows["FP32"]["size_mb"]
    assert rep["interval"] == 100 and "delta_ci" not in rows["FP32"]  # each form's Δ with its bootstrap interval
    for k, r in rows.items():
        if k != "FP32":
            lo, hi = r["delta_ci"]
            assert lo <= hi and -1 <= lo and hi <= 1
    for f in ("report.md", "report.html", "qat_graph.svg", "predictions.png", "qat_int8.onnx"):
        assert (tmp_path / "demo" / f).exists(), f
    assert "in brackets its 95 % interval" in (tmp_path / "demo" / "report.md").read_text()
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "data:image/png;base64," in page and "<svg" in page and "src=\"http" not in page  # self-contained
    assert "| QAT INT8 | torch (oneDNN) |" in capsys.readouterr().out


def test_qat_passes_only_given_arguments(monkeypatch, capsys):
    """Values not on the command line reach train_qat as None, so a resume can tell them from explicit ones."""
    import fxqat.training as T

    seen = {}

    def fake(model, data, **kw):
        seen.update(kw, model=model, data=data)
        return None, "best.pt"

    monkeypatch.setattr(T, "train_qat", fake)
    assert main(["qat", "yolov8n.yaml", "data=d.yaml", "imgsz=64"]) == 0
    assert seen["imgsz"] == 64 and seen["epochs"] is None and seen["batch"] is None and seen["workers"] == 2
    seen.clear()
    assert main(["qat", "resume=last.pt", "batch=4"]) == 0  # no MODEL, no data=: both come from the checkpoint
    assert seen["model"] is None and seen["data"] is None and seen["resume"] == "last.pt" and seen["batch"] == 4
    assert "workers" not in seen


def test_train_passes_mosaic_only_when_given(monkeypatch, capsys):
    """mosaic= reaches Ultralytics' trainer arguments; left out, Ultralytics' own default applies; out of range: refused."""
    import fxqat.training_fp32 as T

    seen = {}

    def fake(model, data, **kw):
        seen.clear()
        seen.update(kw)
        return "best.pt"

    monkeypatch.setattr(T, "train_fp32", fake)
    assert main(["train", "yolov8n.yaml", "data=d.yaml", "mosaic=0"]) == 0
    assert seen["mosaic"] == 0.0
    assert main(["train", "yolov8n.yaml", "data=d.yaml"]) == 0
    assert "mosaic" not in seen
    assert main(["train", "yolov8n.yaml", "data=d.yaml", "mosaic=1.5"]) == 2
    assert "mosaic=1.5: must be between 0 and 1" in capsys.readouterr().err
    assert main(["train", "yolov8n-seg.yaml", "data=d.yaml", "pretrained=fxqat-signs-yolov8n"]) == 0
    assert seen["pretrained"] == "fxqat-signs-yolov8n"  # reaches train_fp32 (tests/test_train.py: what it does)

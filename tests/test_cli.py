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
    assert r.returncode == 2 and "valid: trace" in r.stderr

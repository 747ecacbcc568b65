"""Random ``key=value`` tokens for every subcommand: exit code 0/1/2, never a traceback.

Cheap by construction: model positionals come from specs that fail at load (missing file, wrong task, unknown
type), data paths do not exist, and ``data`` / ``demo`` (which would start real work with valid values) always get
one invalid value last.
"""

import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxqat.cli import COMMANDS, main

VALUES = ["-1", "0", "1", "2", "abc", "", "1.5", "nan", "inf", "-inf", "true", "false", "maybe", "31", "33", "64",
          "320", "32,48", "x", "1,2,3", "/nonexistent/data.yaml", "missing.pt", "a=b", "--", "é"]
MODELS = ["missing.pt", "nope.yaml", "yolo26n-depth.yaml", "model.onnx", "/nonexistent/last.pt", "weights.bin"]
FORCED_BAD = {"data": "train=0", "demo": "seed=abc"}


@st.composite
def argv(draw):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    cmd = COMMANDS[name]
    tokens = []
    for pos in cmd.positionals:
        if draw(st.booleans()) or pos != "model":
            tokens.append(draw(st.sampled_from(["signs", "other"] if pos == "kind" else
                                               ["/dev/null", "/nonexistent/out"] if pos == "out" else MODELS)))
    keys = list(cmd.args) + ["colour", "imgsz"]
    for _ in range(draw(st.integers(0, 4))):
        key, val = draw(st.sampled_from(keys)), draw(st.sampled_from(VALUES))
        form = draw(st.sampled_from(["kv", "dashdash", "dashdash-eq"]))
        tokens += [f"{key}={val}"] if form == "kv" else [f"--{key}", val] if form == "dashdash" else \
            [f"--{key}={val}"]
    if draw(st.booleans()):
        tokens.append(draw(st.sampled_from(["extra", "--quick", "--onnx", "-x"])))
    if name in FORCED_BAD:
        tokens.append(FORCED_BAD[name])
    return [name] + tokens


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=argv())
def test_random_cli_tokens_never_traceback(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc in (0, 1, 2), (args, rc, err)
    assert "Traceback" not in err, (args, err)
    if rc:
        assert err.strip() and len(err.strip().splitlines()) == 1, (args, err)


def test_validated_values_name_the_argument(capsys):
    cases = [(["trace", "yolov8n.yaml", "imgsz=100"], "multiple of 32"),
             (["trace", "yolov8n.yaml", "imgsz=0"], "multiple of 32"),
             (["trace", "yolov8n.yaml", "mode=fast"], "valid choices: train, eval"),
             (["trace", "yolov8n.yaml", "nc=0"], "at least 1"),
             (["qat", "yolov8n.yaml", "data=d.yaml", "batch=0"], "batch=0: must be at least 1"),
             (["qat", "yolov8n.yaml", "data=d.yaml", "epochs=-2"], "epochs=-2: must be at least 1"),
             (["qat", "yolov8n.yaml", "data=d.yaml", "lr0=nan"], "positive finite"),
             (["analyze", "yolov8n.yaml", "data=d.yaml", "images=0"], "images=0: must be at least 1"),
             (["analyze", "yolov8n.yaml", "data=d.yaml", "topk=0"], "topk=0: must be at least 1"),
             (["analyze", "yolov8n.yaml", "data=d.yaml", "metric=f1"], "valid choices: sqnr, map"),
             (["export", "x.pt", "format=tflite"], "valid choices: onnx, openvino"),
             (["qat", "yolov8n.yaml"], "missing data="),
             (["eval", "x.pt"], "missing data="),
             (["trace", "--out"], "needs a value")]
    for args, fragment in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, (args, err)


def test_data_out_must_not_be_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["data", "signs", str(f), "train=1", "val=1", "imgsz=64"]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err


def test_subprocess_usage_errors_are_one_line():
    for args, rc in ((["trace", "yolov8n.yaml", "imgsz=33"], 2), (["eval", "missing.pt", "data=/nonexistent/d.yaml"], 1)):
        r = subprocess.run([sys.executable, "-m", "fxqat.cli", *args], capture_output=True, text=True)
        assert r.returncode == rc and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

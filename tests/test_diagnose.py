"""fxqat.diagnose: the placement diagnosis finds a layer left in float on purpose, and only then.

A small YOLO-style detector (Conv, C2f, SPPF, Detect; random init, 128 px) is exported twice with the ONNX Runtime
preset: as is, and with layer ``model.3`` (a Conv block) skipped by a qconfig rule. Both runtimes must list
``/model.3/Conv`` among the float layers between dequantize and quantize in the second export and not in the first.
No timings are asserted (only that shares are fractions that add up).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.checkpoint import save_checkpoint
from fxqat.cli import COMMANDS, UsageError, main, parse_args
from fxqat.diagnose import KINDS, _region, compare, diagnose
from fxqat.errors import FxqatError

IMGSZ = 128
TINY = {"nc": 2, "scales": {"n": [0.25, 0.25, 1024]}, "scale": "n",
        "backbone": [[-1, 1, "Conv", [32, 3, 2]], [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "C2f", [64, True]],
                     [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "C2f", [128, True]], [-1, 1, "Conv", [256, 3, 2]],
                     [-1, 1, "SPPF", [256, 5]]],
        "head": [[[4, 6], 1, "Detect", ["nc"]]]}
# fxqat/qconfigs/onnxruntime.yaml plus one rule: layer model.3 stays float
SKIP3 = {"version": 1, "weight": {"bits": 8, "symmetric": True, "per_channel": 0, "observer": "minmax"},
         "activation": {"bits": 8, "symmetric": False, "observer": "moving_average"},
         "preact": {"bits": 8, "symmetric": False, "observer": "moving_average"}, "sigmoid": True,
         "default_rules": False, "rules": [{"match": {"module": "model.3*"}, "skip": True}]}
RUNTIMES = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(TINY, verbose=False).eval()
    out = tmp_path_factory.mktemp("diag")
    paths = {}
    for name, qc in (("plain", "onnxruntime.yaml"), ("skip3", SKIP3)):
        x = torch.rand(1, 3, IMGSZ, IMGSZ)
        qat = fxqat.prepare_qat(model, qc, example_inputs=(x,))
        paths[name] = fxqat.export_onnx(qat.eval(), out / f"{name}.onnx", imgsz=IMGSZ)
        paths[f"{name}_ckpt"] = save_checkpoint(out / f"{name}.pt", qat)
        if name == "plain":  # the OpenVINO form: no requantization after Concat / MaxPool / Resize / Split
            paths["plain_noreq"] = fxqat.export_onnx(qat, out / "plain_noreq.onnx", imgsz=IMGSZ,
                                                     requantize_shared=False)
    return paths


def _float_names(d):
    return [r.name for r in d.rows if r.kind == "float"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_diagnosis_finds_the_skipped_layer(exports, runtime):
    plain = diagnose(exports["plain"], runtime, runs=2, label="plain")
    skip = diagnose(exports["skip3"], runtime, runs=2, label="skip3")
    assert any("/model.3/Conv" in n for n in _float_names(skip)), skip.format()
    assert not any("/model.3/" in n for n in _float_names(plain)), plain.format()
    for d in (plain, skip):
        assert {r.kind for r in d.rows} <= set(KINDS)
        assert abs(sum(r.share for r in d.rows) - 1.0) < 1e-6 and all(0 <= r.share <= 1 for r in d.rows)
        assert sum(1 for r in d.rows if r.kind == "int8") > 10  # the rest of the network runs integer kernels
        assert "float layers between dequantize and quantize" in d.format()
    text = compare(plain, skip)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("float Conv"))
    assert line.split()[2] == "-" and "1×" in line, text  # plain: no float conv; skip3: the one


def test_diagnosis_refusals(exports, tmp_path):
    with pytest.raises(FxqatError, match="valid choices are openvino, onnxruntime"):
        diagnose(exports["plain"], "tensorrt")
    with pytest.raises(FxqatError, match="no such model file"):
        diagnose(tmp_path / "missing.onnx", "onnxruntime")
    with pytest.raises(FxqatError, match="at least 1"):
        diagnose(exports["plain"], "onnxruntime", runs=0)
    if "openvino" in RUNTIMES:
        a = diagnose(exports["plain"], "onnxruntime", runs=1)
        b = diagnose(exports["plain"], "openvino", runs=1)
        with pytest.raises(FxqatError, match="compare one runtime"):
            compare(a, b)


def test_region_is_float_between_dequantize_and_quantize():
    # dq -> conv(float) -> silu(float) -> q -> int_conv -> tail(float): conv and silu are inside, tail is not
    chain = ["dq", "conv", "silu", "q", "int_conv", "tail"]
    inputs = {b: [a] for a, b in zip(chain, chain[1:])}
    consumers = {a: [b] for a, b in zip(chain, chain[1:])}
    fl = {"conv", "silu", "tail"}
    r = _region(chain, inputs, consumers, fl.__contains__, fl.__contains__, lambda n: n in ("dq", "int_conv"),
                lambda n: n in ("q", "int_conv"))
    assert r == {"conv": True, "silu": True, "tail": False}


@pytest.mark.parametrize("value,expected", [("true", "true"), ("1", "true"), ("False", "false"), ("qdq", "qdq"),
                                            ("openvino", "openvino"), ("ONNXRuntime", "onnxruntime")])
def test_export_report_argument(value, expected):
    assert parse_args(["m.pt", f"report={value}"], COMMANDS["export"], "export")["report"] == expected
    assert parse_args(["m.pt"], COMMANDS["export"], "export")["report"] == "qdq"


def test_export_report_argument_refused():
    with pytest.raises(UsageError, match="valid choices: false, qdq, true, openvino, onnxruntime"):
        parse_args(["m.pt", "report=tensorrt"], COMMANDS["export"], "export")


def test_export_report_true_runs_the_diagnosis(exports, tmp_path, capsys):
    out = tmp_path / "skip3.onnx"
    assert main(["export", str(exports["skip3_ckpt"]), f"imgsz={IMGSZ}", f"out={out}", "report=true"]) == 0
    text = capsys.readouterr().out
    assert "scale changes around Concat/MaxPool/Resize/Split" in text  # the structure report is still there
    assert "skip3 on onnxruntime:" in text
    floats = text.split("float layers between dequantize and quantize: ")[1].split("Q/DQ nodes")[0]
    assert "/model.3/Conv" in floats and "/model.1/" not in floats and "/model.5/" not in floats


def test_openvino_form_leaves_out_the_shared_requantization(exports):
    import numpy as np

    from fxqat.checkpoint import load_checkpoint
    from fxqat.export import export_graph, qdq_report

    shared = ("Concat→Q", "MaxPool→Q", "Slice→Q", "Split→Q", "Resize→Q")
    full, noreq = qdq_report(exports["plain"])["by_op"], qdq_report(exports["plain_noreq"])["by_op"]
    assert full.get("Slice→Q", 0) + full.get("Split→Q", 0) > 0 and full.get("MaxPool→Q", 0) > 0
    assert not any(noreq.get(k) for k in shared), noreq
    # the same values: the requantization is an identity (the exported graphs in torch agree bit for bit)
    qat = load_checkpoint(exports["plain_ckpt"])
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(export_graph(qat)(x), export_graph(qat, requantize_shared=False)(x))
    if "openvino" in RUNTIMES:
        import openvino as ov

        xn = x.numpy()
        a, b = (ov.Core().compile_model(str(exports[k]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({0: xn})[0]
                for k in ("plain", "plain_noreq"))
        np.testing.assert_allclose(a, b, atol=1e-3)  # float round-off in the decode only
        req = [diagnose(exports[k], "openvino", runs=1).issues(("qdq",)) for k in ("plain", "plain_noreq")]
        assert sum(r.op == "requantize" for r in req[0]) > 0  # OpenVINO runs these as separate nodes ...
        assert sum(r.op == "requantize" for r in req[1]) == 0  # ... and folds the DQ through the ops without them


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(lambda s: "=" not in s and not s.startswith("-") and s.strip() == s))
def test_export_report_argument_any_text(value):
    ok = {"1": "true", "true": "true", "yes": "true", "on": "true", "0": "false", "false": "false", "no": "false",
          "off": "false", "qdq": "qdq", "openvino": "openvino", "onnxruntime": "onnxruntime"}
    if value.lower() in ok:
        assert parse_args(["m.pt", f"report={value}"], COMMANDS["export"], "export")["report"] == ok[value.lower()]
    else:
        with pytest.raises(UsageError, match="valid choices"):
            parse_args(["m.pt", f"report={value}"], COMMANDS["export"], "export")

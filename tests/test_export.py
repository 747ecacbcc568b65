import importlib.util
from collections import Counter

import onnx
import pytest
import torch

import fxqat
from fxqat.evaluate import OnnxRunner
from fxqat.export import format_report, qdq_report
from fxqat.models import load_model

from .conftest_helpers import liven, signs_like_images


def _calibrated(name):
    torch.manual_seed(0)  # the random-init weights: the same model whatever ran before in the session
    gm = fxqat.prepare_qat(liven(load_model(name, nc=10)))
    fxqat.calibrate(gm, [signs_like_images(2, 320, seed=s) for s in range(2)], progress=False)
    return gm.eval()


@pytest.fixture(scope="module", params=["yolov8n.yaml", "yolo11n.yaml"])
def exported(request, tmp_path_factory):
    gm = _calibrated(request.param)
    path = fxqat.export_onnx(gm, tmp_path_factory.mktemp("onnx") / "m.onnx", imgsz=320)
    return gm, path


def test_checker_and_qdq_structure(exported):
    _, path = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    r = qdq_report(path)
    assert r["scale_changes"] == []  # no DQ→Q with different scales around Concat / MaxPool / Resize / Split
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    quantized = [c for c in convs if producers.get(c.input[1]) is not None
                 and producers[c.input[1]].op_type == "DequantizeLinear"]
    assert len(quantized) == len(convs)  # every conv reads int8 weights (DFL's fixed 0..15 projection is a MatMul)
    inits = {i.name: i for i in model.graph.initializer}
    for c in quantized:
        w_dq = producers[c.input[1]]
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8  # weights stored as int8
        x_dq = producers[c.input[0]]
        assert x_dq.op_type == "DequantizeLinear"  # every quantized conv input comes from Q/DQ
    gm = exported[0]
    first = gm.get_submodule("model.0")  # the same int8 codes as the QAT model's weight quantizer
    w_init = next(inits[producers[c.input[1]].input[0]] for c in quantized if c.name.startswith("/model.0/"))
    codes = first.weight_fq.codes(first.folded()[0].detach())
    assert torch.equal(torch.from_numpy(onnx.numpy_helper.to_array(w_init).astype("int32")), codes)
    n_q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    n_dq = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    assert (r["quantize_linear"], r["dequantize_linear"]) == (n_q, n_dq) and n_q > len(convs) // 2
    assert r["by_op"]["DQ→Conv"] == 2 * len(convs)  # each conv: a dequantized input and dequantized weights
    assert sum(v for k, v in r["by_op"].items() if k.endswith("→Q")) == n_q
    text = format_report(r).splitlines()
    assert text[0] == f"QuantizeLinear {n_q}, DequantizeLinear {n_dq}"
    assert f"  {'DQ→Conv':<28} {2 * len(convs)}" in text
    assert "scale changes around Concat/MaxPool/Resize/Split: none" in text


def test_onnx_runtime_matches_fake_quant(exported):
    gm, path = exported
    run = OnnxRunner(path, threads=2)
    for x in (signs_like_images(1, 320, seed=5), torch.rand(1, 3, 320, 320)):
        with torch.no_grad():
            ref = gm(x)[0]
        out = run(x)
        # tolerance: ORT's integer kernels may round ties differently: scores within one uint8 step of [0, 1]
        # and boxes within 1 px for >= 99.9 % of values
        assert ((ref[:, 4:] - out[:, 4:]).abs() <= 1 / 255).float().mean() >= 0.999
        assert ((ref[:, :4] - out[:, :4]).abs() <= 1.0).float().mean() >= 0.999


def test_dynamic_batch(tmp_path):
    gm = _calibrated("yolov8n.yaml")
    path = fxqat.export_onnx(gm, tmp_path / "dyn.onnx", imgsz=320, dynamic=True)
    run = OnnxRunner(path)
    for b in (1, 4):
        x = signs_like_images(b, 320, seed=b)
        out = run(x)
        with torch.no_grad():
            ref = gm(x)[0]
        assert out.shape == ref.shape == (b, 14, 2100)
        assert ((ref[:, :4] - out[:, :4]).abs() <= 1.0).float().mean() >= 0.999


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed (optional extra)")
def test_openvino_parity(exported):
    import openvino as ov

    gm, path = exported
    # f32 for the float parts (decode): on bf16-capable CPUs OpenVINO would otherwise round boxes to bf16
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = signs_like_images(1, 320, seed=9)
    out = torch.from_numpy(compiled(x.numpy())[0])
    with torch.no_grad():
        ref = gm(x)[0]
    assert ((ref[:, 4:] - out[:, 4:]).abs() <= 1 / 255).float().mean() >= 0.999
    assert ((ref[:, :4] - out[:, :4]).abs() <= 1.0).float().mean() >= 0.999


def test_onnxruntime_preset_quantizes_conv_outputs(tmp_path):
    gm = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10)), "onnxruntime.yaml")
    fxqat.calibrate(gm, [signs_like_images(2, 320, seed=s) for s in range(2)], progress=False)
    gm.eval()
    path = fxqat.export_onnx(gm, tmp_path / "ort.onnx", imgsz=320)
    r = qdq_report(path)
    assert r["by_op"]["Conv→Q"] == 63  # DQ → Conv → Q: ONNX Runtime's QLinearConv pattern
    assert r["by_op"]["Sigmoid→Q"] == 57  # SiLU = x * q(sigmoid(x))
    # what ONNX Runtime's own optimizer makes of it: every conv block and residual add runs on integer kernels
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "ort_opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    # 63 convs (Detect's last 1x1 convs output uint8 in this preset), 57 SiLUs, 6 residual adds
    assert (ops["QLinearConv"], ops["QLinearSigmoid"], ops["QLinearMul"], ops["QLinearAdd"]) == (63, 57, 57, 6), ops
    assert ops["Sigmoid"] == 1 and ops["Conv"] == 0  # only the class sigmoid of the decode stays float
    x = signs_like_images(1, 320, seed=3)
    with torch.no_grad():
        ref = gm(x)[0]
    for out in (OnnxRunner(path)(x), fxqat.convert(gm)(x)):
        assert ((ref[:, 4:] - out[:, 4:]).abs() <= 1 / 255).float().mean() >= 0.999
        assert ((ref[:, :4] - out[:, :4]).abs() <= 1.0).float().mean() >= 0.999


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed (optional extra)")
def test_openvino_ir(exported, tmp_path):
    import openvino as ov

    from fxqat.deploy import to_openvino

    gm, path = exported
    xml = to_openvino(path, tmp_path / "m.xml")
    assert xml.exists() and xml.with_suffix(".bin").exists()
    compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = signs_like_images(1, 320, seed=4)
    out = torch.from_numpy(compiled(x.numpy())[0])
    with torch.no_grad():
        ref = gm(x)[0]
    assert ((ref[:, :4] - out[:, :4]).abs() <= 1.0).float().mean() >= 0.999

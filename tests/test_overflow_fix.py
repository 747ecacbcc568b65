"""``export_onnx(overflow_fix=...)``: NNCF's overflow fix for int8 runtimes on CPUs without VNNI (OpenVINO's AVX2
kernels add u8 × s8 product pairs in saturating int16). The weights of the fixed layers are rounded again on a grid
of twice their scale, codes within ±64, so no pair sum (≤ 255·64·2 = 32 640) overflows."""

import importlib.util

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fxqat
from fxqat.errors import ConvertError
from fxqat.export import SAFE_WEIGHT_CODE, resolve_overflow_fix
from fxqat.models import load_model

from .conftest_helpers import liven, signs_like_images

IMGSZ = 64


@pytest.fixture(scope="module")
def model():
    """yolov8n with a first conv whose weights are all positive: bright pixels in adjacent input channels then
    overflow an int16 pair sum (as in trained models, where the first layer saturates most)."""
    m = liven(load_model("yolov8n.yaml", nc=10))
    with torch.no_grad():
        m.model[0].conv.weight.abs_()
    gm = fxqat.prepare_qat(m)
    fxqat.calibrate(gm, [signs_like_images(2, IMGSZ, seed=s) for s in range(2)], progress=False)
    return gm.eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ovf")
    return {fix: fxqat.export_onnx(model, out / f"{fix}.onnx", imgsz=IMGSZ, requantize_shared=False,
                                   overflow_fix=fix) for fix in ("disable", "first_layer", "enable")}


def _weights(path):
    """Conv weight codes and scales in graph order: [(codes, scales)]."""
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    return [(inits[n.input[0]], inits[n.input[1]]) for n in g.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]


def test_enable_puts_every_weight_within_64_codes_at_twice_the_scale(exports):
    base, fixed = _weights(exports["disable"]), _weights(exports["enable"])
    assert len(base) == len(fixed) == 63
    assert min(int(np.abs(c).max()) for c, _ in base) >= 127  # every layer uses the 8-bit grid: [-128, 127]
    for (c8, s8), (c7, s7) in zip(base, fixed):
        assert int(np.abs(c7).max()) <= SAFE_WEIGHT_CODE
        np.testing.assert_array_equal(s7, 2 * s8)
        # one rounding from the float weights: within half a 7-bit step of them, i.e. one 8-bit code of c8 / 2
        assert np.abs(c7.astype(np.float32) - c8 / 2).max() <= 1.0


def test_first_layer_fixes_only_the_conv_reading_the_image(exports):
    base, first = _weights(exports["disable"]), _weights(exports["first_layer"])
    assert int(np.abs(first[0][0]).max()) <= SAFE_WEIGHT_CODE
    np.testing.assert_array_equal(first[0][1], 2 * base[0][1])
    for (c8, s8), (c, s) in zip(base[1:], first[1:]):
        np.testing.assert_array_equal(c, c8)
        np.testing.assert_array_equal(s, s8)


def test_mode_is_recorded_in_the_metadata(exports):
    for fix, path in exports.items():
        md = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert md["fxqat_overflow_fix"] == fix


def test_auto_follows_the_cpu(monkeypatch):
    import fxqat.modules.int8 as int8

    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: False)
    mode, why = resolve_overflow_fix("auto")
    assert mode == "enable" and "no VNNI" in why
    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: True)
    assert resolve_overflow_fix("auto")[0] == "disable"


def test_narrow_weights_are_left_alone(tmp_path):
    """mixed_w4: the 4-bit layers' codes (within ±8) do not overflow, so their grid is kept."""
    q = fxqat.prepare_qat("yolov8n.yaml", "mixed_w4")
    fxqat.calibrate(q, [torch.rand(1, 3, IMGSZ, IMGSZ)], progress=False)
    a = _weights(fxqat.export_onnx(q.eval(), tmp_path / "a.onnx", imgsz=IMGSZ))
    b = _weights(fxqat.export_onnx(q, tmp_path / "b.onnx", imgsz=IMGSZ, overflow_fix="enable"))
    narrow = [i for i, (c, _) in enumerate(a) if np.abs(c).max() <= 8]
    assert narrow and all((b[i][1] == a[i][1]).all() for i in narrow)
    assert all(int(np.abs(c).max()) <= SAFE_WEIGHT_CODE for c, _ in b)


def test_unknown_mode_is_refused(model, tmp_path):
    with pytest.raises(ConvertError, match="overflow_fix='all': valid choices are auto, enable, first_layer, disable"):
        fxqat.export_onnx(model, tmp_path / "x.onnx", imgsz=IMGSZ, overflow_fix="all")


def _with_first_activation(path, dst):
    """A copy of the model with the first conv's quantized output (its first activation DequantizeLinear after the
    image's) as a second graph output; returns that output's scale."""
    from onnx import helper

    m = onnx.load(str(path))
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    consts.update({n.output[0]: consts[n.input[0]] for n in g.node if n.op_type == "Identity" and n.input[0] in consts})
    producer = {o: n for n in g.node for o in n.output}
    acts = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in producer
            and producer[n.input[0]].op_type == "QuantizeLinear"]
    dq = acts[1]  # acts[0]: the image's
    assert "model.0" in producer[producer[dq.input[0]].input[0]].name
    g.output.append(helper.make_tensor_value_info(dq.output[0], onnx.TensorProto.FLOAT, None))
    onnx.save(m, str(dst))
    return float(np.ravel(consts[dq.input[1]])[0])


def _run_both(path, x):
    """(OpenVINO, reference) outputs: the reference is the QDQ model's own arithmetic, ONNX Runtime with graph
    optimizations off (float DQ → op → Q)."""
    import onnxruntime as ort
    import openvino as ov

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    c = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = [c(xi[None]) for xi in x.numpy()]
    got = [np.concatenate([r[c.outputs[k]] for r in got]) for k in range(len(c.outputs))]
    ref = [s.run(None, {s.get_inputs()[0].name: xi[None]}) for xi in x.numpy()]
    ref = [np.concatenate([r[k] for r in ref]) for k in range(len(ref[0]))]
    return got, ref


def test_openvino_runs_the_fixed_model_without_overflow(exports, tmp_path):
    """OpenVINO against the model's own arithmetic. With the fix: the first conv's output codes equal for
    >= 99.9 % (float sums and rounding ties may flip single codes, by at most one) and boxes within 0.25 px
    (measured: codes all equal, boxes 0.065 px; unfixed: 0.69 px).
    Without it, on a CPU without VNNI, the first conv (all-positive weights, bright pixels) saturates: more than
    5 % of its codes differ (measured: 33 %)."""
    pytest.importorskip("openvino")
    from fxqat.modules.int8 import cpu_has_vnni

    x = signs_like_images(4, IMGSZ, seed=11)

    def errors(fix):
        scale = _with_first_activation(exports[fix], tmp_path / f"{fix}.onnx")
        (y, act), (y_ref, act_ref) = _run_both(tmp_path / f"{fix}.onnx", x)
        codes = np.abs(act - act_ref) / scale
        return (codes > 0.5).mean(), codes.max(), np.abs(y - y_ref)[:, :4].max()

    off, worst, box = errors("enable")
    assert off <= 1e-3 and worst <= 1.0 + 1e-3 and box <= 0.25
    if not cpu_has_vnni():  # the 8-bit export saturates only here: the fix must be what removes the error
        assert errors("disable")[0] > 0.05


def test_openvino_avx2_preset_trains_and_exports_7_bit_weights(tmp_path):
    """The preset's weights lie on a 7-bit grid in the QAT model already: codes within [-64, 63] in the export
    without any overflow fix."""
    q = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10)), "openvino_avx2")
    fxqat.calibrate(q, [signs_like_images(1, IMGSZ, seed=3)], progress=False)
    codes = [c for c, _ in _weights(fxqat.export_onnx(q.eval(), tmp_path / "w7.onnx", imgsz=IMGSZ))]
    assert len(codes) == 63 and min(int(c.min()) for c in codes) >= -64 and max(int(c.max()) for c in codes) <= 63


def _no_vnni(monkeypatch):
    import fxqat.modules.int8 as int8

    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: False)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_export_openvino_warns_about_8_bit_weights_without_vnni(exports, tmp_path, monkeypatch, capsys):
    from fxqat.deploy import export_openvino

    _no_vnni(monkeypatch)
    export_openvino(exports["disable"], tmp_path / "a_openvino_model")
    assert "warning: this model's 8-bit weights lose accuracy in OpenVINO on this CPU" in capsys.readouterr().out
    folder = export_openvino(exports["enable"], tmp_path / "b_openvino_model")
    assert "warning" not in capsys.readouterr().out
    assert "fxqat_overflow_fix: enable" in (folder / "metadata.yaml").read_text()


@pytest.mark.slow  # two CLI exports from a checkpoint
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")
def test_export_command_applies_and_says_the_fix(model, tmp_path, monkeypatch, capsys):
    from fxqat.checkpoint import save_checkpoint
    from fxqat.cli import main

    _no_vnni(monkeypatch)
    ckpt = save_checkpoint(tmp_path / "best.pt", model)
    assert main(["export", str(ckpt), "format=openvino", f"imgsz={IMGSZ}", "report=false"]) == 0
    assert "overflow_fix=auto: this CPU has no VNNI" in capsys.readouterr().out
    assert "fxqat_overflow_fix: enable" in (tmp_path / "best_int8_openvino_model" / "metadata.yaml").read_text()
    onnx_out = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), f"imgsz={IMGSZ}", "report=false", f"out={onnx_out}"]) == 0  # ONNX: off
    assert {p.key: p.value for p in onnx.load(str(onnx_out)).metadata_props}["fxqat_overflow_fix"] == "disable"
    assert main(["export", str(ckpt), "overflow_fix=all"]) == 2  # a usage error
    assert "valid choices: auto, enable, first_layer, disable" in capsys.readouterr().err

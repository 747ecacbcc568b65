"""W4A8 (the ``w4a8`` preset) and learnable (LSQ) scales from a YAML qconfig, end to end: prepare → calibrate →
train → INT8 torch and QDQ ONNX."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fxqat
from fxqat.evaluate import OnnxRunner
from fxqat.models import load_model
from fxqat.modules.int8 import Int8ConvBnAct
from fxqat.qconfig import load_qconfig
from fxqat.qconfig.io import preset_text
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import assert_int8_matches_fake_quant, liven, signs_like_images

EIGHT_BIT = {"model.0", "model.22.cv2.0.2", "model.22.cv2.1.2", "model.22.cv2.2.2", "model.22.cv3.0.2",
             "model.22.cv3.1.2", "model.22.cv3.2.2"}  # the first conv and Detect's last conv of each branch


def _weight_fqs(gm):
    return {p.removesuffix(".weight_fq"): m for p, m in gm.named_modules()
            if isinstance(m, FakeQuant) and p.endswith(".weight_fq")}


@pytest.fixture(scope="module")
def w4a8():
    torch.manual_seed(0)
    gm = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10)), "w4a8")
    fxqat.calibrate(gm, [signs_like_images(2, 160, seed=s) for s in range(2)], progress=False)
    return gm.eval()


def test_w4a8_has_4_bit_weights_except_the_first_conv_and_the_head_outputs(w4a8):
    w = _weight_fqs(w4a8)
    assert len(w) == 63
    four = {p for p, m in w.items() if m.spec.bits == 4}
    eight = {p for p, m in w.items() if m.spec.bits == 8}
    assert len(four) == 56 and eight == EIGHT_BIT
    assert all(m.spec.symmetric and m.ch_axis == 0 and (m.qmin, m.qmax) == (-8, 7) for p, m in w.items() if p in four)
    assert all(m.spec.learnable for m in w.values())  # LSQ scales (measured to win at W4A8)
    acts = [m for p, m in w4a8.named_modules() if isinstance(m, FakeQuant) and p.startswith("quant.")]
    assert acts and all(m.spec.bits == 8 for m in acts)  # activations: 8-bit as default.yaml


def test_w4a8_is_overridable_as_any_yaml(tmp_path):
    """The preset text without its two Detect rules: every conv but the first gets 4-bit weights."""
    text = preset_text("w4a8").replace("  - match: {role: detect.box_last}\n    weight: {bits: 8}\n", "")
    text = text.replace("  - match: {role: detect.cls_last}\n    weight: {bits: 8}\n", "")
    (tmp_path / "w4.yaml").write_text(text)
    w = _weight_fqs(fxqat.prepare_qat("yolov8n.yaml", str(tmp_path / "w4.yaml")))
    assert {p for p, m in w.items() if m.spec.bits == 8} == {"model.0"}
    assert load_qconfig("w4a8").weight.bits == 4


def test_w4a8_int8_torch_matches_fake_quant_and_codes_lie_in_4_bits(w4a8):
    q = fxqat.convert(w4a8)
    for x in (signs_like_images(2, 160, seed=11), torch.rand(2, 3, 160, 160)):
        assert_int8_matches_fake_quant(w4a8, q, x)
    convs = {p.replace("_", "."): m for p, m in q.named_modules() if isinstance(m, Int8ConvBnAct)}
    assert len(convs) == 63  # the 4-bit convs run on the int8 kernels too, none left simulating in float
    for p, m in convs.items():
        lo, hi = int(m.w_int8.min()), int(m.w_int8.max())
        if p in EIGHT_BIT:
            assert m.w_int8.dtype == torch.int8 and max(-lo, hi) > 8, p
        else:  # the 4-bit grid, in int8 tensors; extreme codes used (min/max observer per channel)
            assert m.w_int8.dtype == torch.int8 and -8 <= lo and hi <= 7 and (lo == -8 or hi == 7), p
            assert not m._splits((1, m.w_int8.shape[1] * m.groups, 8, 8))  # |w| <= 8: never split on AVX2


def test_w4a8_qdq_onnx_stores_at_most_16_values_per_channel(w4a8, tmp_path):
    path = fxqat.export_onnx(w4a8, tmp_path / "w4a8.onnx", imgsz=160)
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    weights = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4:
            weights[n.input[1].removesuffix(".weight_fq.scale")] = (inits[n.input[0]], inits[n.input[1]])
    assert len(weights) == 63
    fqs = _weight_fqs(w4a8)
    for p, (codes, scale) in weights.items():
        distinct = max(len(np.unique(codes[c])) for c in range(codes.shape[0]))
        assert codes.dtype == np.int8 and np.allclose(scale, fqs[p].qparams()[0].numpy()), p
        assert (distinct > 16) if p in EIGHT_BIT else (distinct <= 16 and codes.min() >= -8 and codes.max() <= 7), p
    x = signs_like_images(1, 160, seed=3)
    with torch.no_grad():
        ref = w4a8(x)[0]
    assert (OnnxRunner(path)(x) - ref).abs().max() <= 1e-3 * ref.abs().max()  # tolerance: float rounding of decode


LSQ_YAML = preset_text("w4a8")  # learnable scales on weights and activations


@pytest.mark.slow  # ~50 s on the loaded 2-core CI machine; the w4a8 tests above cover LSQ through convert / export
def test_learnable_scales_from_yaml_train_and_reach_int8_and_onnx(tmp_path):
    """``learnable: true`` in a YAML file: the scales are parameters initialized by calibration, one optimizer step
    moves them, and the INT8 model and the QDQ ONNX export use the learned (positive) values."""
    qc = load_qconfig(LSQ_YAML)
    assert qc.weight.learnable and qc.activation.learnable and not qc.input.learnable
    (tmp_path / "lsq.yaml").write_text(LSQ_YAML)
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    torch.manual_seed(0)
    det = liven(load_model("yolov8n.yaml", nc=10))
    det.args = get_cfg()
    crit = v8DetectionLoss(det)
    gm = fxqat.prepare_qat(det, str(tmp_path / "lsq.yaml"))
    fxqat.calibrate(gm, [signs_like_images(2, 160, seed=s) for s in range(2)], progress=False)
    fqs = {p: m for p, m in gm.named_modules() if isinstance(m, FakeQuant) and m.spec.fixed is None}
    assert len(fqs) > 100 and all(m.spec.learnable and isinstance(m.scale, torch.nn.Parameter) for m in fqs.values())
    calibrated = {p: m.scale.detach().clone() for p, m in fqs.items()}
    gm.train()
    x = signs_like_images(2, 160, seed=5)  # one training step on Ultralytics' detection loss, weights and scales
    sizes = [0.1, 0.3, 0.8]
    batch = {"batch_idx": torch.tensor([float(i) for i in range(2) for _ in sizes]),
             "cls": torch.tensor([[float(k)] for _ in range(2) for k in range(len(sizes))]),
             "bboxes": torch.tensor([[0.5, 0.5, s, s] for _ in range(2) for s in sizes])}
    crit(gm(x), batch)[0].sum().backward()
    torch.optim.SGD(gm.parameters(), lr=1e-3).step()
    moved = {p for p, m in fqs.items() if not torch.equal(m.scale.detach(), calibrated[p])}
    # only the gradient moves them; all but the box branches of levels without positive anchors in this batch
    live = {p for p, m in fqs.items() if m.scale.grad is not None and bool((m.scale.grad != 0).any())}
    assert moved <= live and len(moved) >= 100, sorted(set(fqs) - moved)
    stepped = {p: m.scale.detach().clone() for p, m in fqs.items()}
    gm(x)  # another training forward: the observers leave the learned scales alone
    assert all(torch.equal(m.scale.detach(), stepped[p]) for p, m in fqs.items())
    w0 = fqs["model.2.cv1.weight_fq"]
    with torch.no_grad():
        w0.scale[0] = -w0.scale[0]  # an optimizer step overshot: the forward uses |s|
    gm.eval()
    q = fxqat.convert(gm)
    for p, m in q.named_modules():
        if isinstance(m, Int8ConvBnAct):
            learned = fqs[p.replace("_", ".") + ".weight_fq"].scale.detach().abs()
            torch.testing.assert_close(m.w_scale, learned, rtol=0, atol=0)
    assert float(q.get_submodule("model_2_cv1").w_scale[0]) > 0
    assert_int8_matches_fake_quant(gm, q, signs_like_images(2, 160, seed=11))
    path = fxqat.export_onnx(gm, tmp_path / "lsq.onnx", imgsz=160)
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(n.input[1] in inits and (inits[n.input[1]] > 0).all() for n in qdq)  # constant, positive
    weight_scales = {n.input[1].removesuffix(".weight_fq.scale"): inits[n.input[1]] for n in qdq
                     if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}
    assert len(weight_scales) == 63
    for p, s in weight_scales.items():  # the learned |s| itself
        assert np.array_equal(s, fqs[p + ".weight_fq"].scale.detach().abs().numpy()), p
    with torch.no_grad():
        ref = gm(x)[0]
    assert (OnnxRunner(path)(x) - ref).abs().max() <= 1e-3 * ref.abs().max()  # tolerance: float rounding of decode

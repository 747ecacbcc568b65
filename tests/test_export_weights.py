"""``export_onnx(weights="uint8")``: the same weight values as uint8 codes + 128 with zero point 128, which ONNX Runtime
runs with its U8U8 kernels (exact on CPUs without VNNI, where its u8×s8 kernels saturate int16 pair sums)."""

import onnx
import pytest
import torch
from onnx import numpy_helper

import fxqat
from fxqat.errors import ConvertError
from fxqat.evaluate import OnnxRunner
from fxqat.models import load_model

from .conftest_helpers import liven, signs_like_images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    gm = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10)))
    fxqat.calibrate(gm, [signs_like_images(2, 160, seed=s) for s in range(2)], progress=False)
    out = tmp_path_factory.mktemp("w")
    return gm.eval(), {w: fxqat.export_onnx(gm, out / f"{w}.onnx", imgsz=160, weights=w) for w in ("int8", "uint8")}


def _conv_weights(path):
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4:
            w, s, zp = (inits.get(i) for i in n.input[:3])
            out[n.output[0]] = (w, s, zp)
    return out


def test_uint8_form_stores_the_same_values_shifted_by_128(exported):
    _, paths = exported
    a, b = _conv_weights(paths["int8"]), _conv_weights(paths["uint8"])
    assert len(a) == len(b) == 63
    for k, (w8, s8, z8) in a.items():
        wu, su, zu = b[k]
        assert w8.dtype.name == "int8" and wu.dtype.name == "uint8" and zu.dtype.name == "uint8"
        assert zu.shape == su.shape and (zu == 128).all() and (z8 is None or (z8 == 0).all()) and (su == s8).all()
        assert ((wu.astype("int16") - 128) == w8).all()  # dequantized weights identical, bit for bit


def test_uint8_form_in_onnx_runtime_matches_fake_quant(exported):
    gm, paths = exported
    x = signs_like_images(2, 160, seed=7)
    with torch.no_grad():
        ref = gm(x)[0]
    err = {w: (OnnxRunner(p)(x) - ref).abs() for w, p in paths.items()}
    scores = {w: e[:, 4:] for w, e in err.items()}
    # class scores lie in [0, 1]: within one 8-bit step (1/255) for >= 99.9 % of them (float32 sums and rounding
    # ties may flip single codes), and never further from the fake-quant model than the int8 form
    assert (scores["uint8"] <= 1 / 255 + 1e-6).float().mean() >= 0.999
    assert scores["uint8"].max() <= scores["int8"].max() + 1e-6


def test_unknown_weight_form_is_refused(exported, tmp_path):
    gm, _ = exported
    with pytest.raises(ConvertError, match="weights='int4': valid choices are int8, uint8"):
        fxqat.export_onnx(gm, tmp_path / "x.onnx", imgsz=160, weights="int4")


def test_sub_8_bit_weights_export_on_their_grid_in_int8_containers(tmp_path):
    """mixed_w4 (4-bit weights in layers 4-6): ONNX Q/DQ has no 4-bit range before opset 21, so the weights are
    stored on their 4-bit grid in int8 containers with the same scale; ONNX Runtime matches fake-quant."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    import fxqat
    from fxqat.evaluate import OnnxRunner

    q = fxqat.prepare_qat("yolov8n.yaml", "mixed_w4")
    x = torch.rand(1, 3, 64, 64)
    fxqat.calibrate(q, [x, torch.rand(1, 3, 64, 64)], progress=False)
    q.eval()
    path = fxqat.export_onnx(q, tmp_path / "w4.onnx", imgsz=64)
    with torch.no_grad():
        ref = q(x)
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    y = OnnxRunner(path)(x)
    assert (ref - y).abs().max() <= 1e-3 * ref.abs().max()  # tolerance: float rounding of the decode
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    codes = [v for k, v in inits.items() if v.dtype == np.int8 and v.ndim == 4]
    assert min(int(c.min()) for c in codes) >= -128 and any(int(np.abs(c).max()) <= 8 for c in codes)  # 4-bit layers


def test_sixteen_bit_weights_export_as_float_constants_on_their_grid(tmp_path):
    """A 16-bit-weight conv (what a size budget may choose): ONNX Q/DQ has no int16 weight range that the runtimes'
    conv kernels take, so its weights are written as float constants already on their 16-bit grid (62 DQ'd conv
    weights instead of 63); ONNX Runtime matches fake-quant. Before: torch.onnx's range error."""
    rules = {"version": 1, "rules": [{"match": {"name": "model_4_m_0_cv1"}, "weight": {"bits": 16}}]}
    q = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10)), rules)
    x = signs_like_images(1, 64, seed=0)
    fxqat.calibrate(q, [x, signs_like_images(1, 64, seed=1)], progress=False)
    q.eval()
    path = fxqat.export_onnx(q, tmp_path / "w16.onnx", imgsz=64)
    assert len(_conv_weights(path)) == 62
    with torch.no_grad():
        ref = q(x)[0]
    y = OnnxRunner(path)(x)
    assert (ref - y).abs().max() <= 1e-3 * ref.abs().max()  # tolerance: float rounding of the decode

"""End-to-end heads (YOLO26, YOLOv10) through prepare → calibrate → convert (INT8 torch) → export (QDQ ONNX), 320 px.

Tolerances (as for Detect, tests/test_tasks_quant.py): the INT8 model and ONNX Runtime may round a tie differently
from the fake-quant model, so for >= 99.9 % of values class scores are within one uint8 step of [0, 1] (1/255) and
boxes within 1 px. The one-to-one output is a float top-k of those predictions: its sorted scores move by at most the
scores' own error (>= 99.9 % within 1/255), and each selected row must be one of the reference's predictions (same
class, score within 1/255, box within 1 px) for >= 99 % of rows (near-ties at the k-th place may pick another anchor).
"""

import pytest
import torch

import fxqat
from fxqat.graph.meta import info
from fxqat.graph.registry import op_kind
from fxqat.modules.e2e import set_end2end
from fxqat.modules.int8 import Int8ConvBnAct
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import prepared_and_calibrated, signs_like_images

NC = 10
WITHIN = 0.999
ANCHORS = 40 * 40 + 20 * 20 + 10 * 10


def _prepared(name):
    return prepared_and_calibrated(name, NC, end2end=True)


@pytest.fixture(scope="module")
def y26():
    return _prepared("yolo26n.yaml")


def _fq(gm, n):
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    return m if isinstance(m, FakeQuant) else None


def _frac(a, b, tol):
    return ((a - b).abs() <= tol).float().mean().item()


def _decode_inputs(g, x):
    """(decoded one-to-one predictions before top-k (B, 4 + nc, A), the model's output), read at the decode."""
    path = next(n.target for n in g.graph.nodes if op_kind(g, n) == "decode")
    dec, cap = g.get_submodule(path), {}
    h = dec.register_forward_hook(lambda mod, args, out: cap.update(args=args))
    with torch.no_grad():
        out = g(x)
    h.remove()
    _, _, feats, boxes, scores = cap["args"]
    return dec.decode(boxes, scores, feats), out


def _check_pre_topk(y, yq):
    assert yq.shape == y.shape == (1, 4 + NC, ANCHORS)
    assert _frac(y[:, 4:], yq[:, 4:], 1 / 255) >= WITHIN
    assert _frac(y[:, :4], yq[:, :4], 1.0) >= WITHIN


def _check_topk(pre, ref, out):
    """``out`` (1, k, 6) against the reference top-k ``ref`` and the reference's predictions ``pre`` (1, 4+nc, A)."""
    assert out.shape == ref.shape == (1, 300, 6)
    assert _frac(ref[..., 4], out[..., 4], 1 / 255) >= WITHIN  # sorted scores
    o, p = out[0], pre[0]
    cls = o[:, 5].long()
    score_ok = (p[4 + cls] - o[:, 4:5]).abs() <= 1 / 255  # (k, A): that class's score at every anchor
    box_ok = ((p[:4].T[None] - o[:, None, :4]).abs() <= 1.0).all(-1)
    assert (score_ok & box_ok).any(1).float().mean().item() >= 0.99


def test_e2e_prepared_golden_and_roles(y26, golden):
    gm, text = y26
    golden("yolo26n_prepared_summary.txt", text)
    nodes = list(gm.graph.nodes)
    for role in ("e2e.box_last", "e2e.cls_last", "detect.box_last", "detect.cls_last"):  # INT8 weights, float out
        hits = [n for n in nodes if info(n).role == role]
        assert len(hits) == 3, role
        for n in hits:
            assert gm.get_submodule(n.target).weight_fq is not None
            assert not any(_fq(gm, u) for u in n.users), n.name
    detach = [n for n in nodes if info(n).role == "e2e.detach"]
    assert len(detach) == 3 and all(info(n).qspec.shared for n in detach)  # the feature map's grid, no requantizing
    assert not any(_fq(gm, u) for n in detach for u in n.users)
    dw = [n for n in nodes if info(n).role == "e2e.cls" and gm.get_submodule(n.target).conv.groups > 1]
    assert len(dw) == 6 and all(gm.get_submodule(n.target).weight_fq is not None for n in dw)  # depthwise INT8
    for role in ("attention.matmul", "attention.softmax"):  # float attention math
        hits = [n for n in nodes if info(n).role == role]
        assert hits and all(info(n).qspec is None and not any(_fq(gm, u) for u in n.users) for n in hits), role
    qkv = next(n for n in nodes if info(n).role == "attention.qkv")
    assert any(_fq(gm, u) for u in qkv.users)  # the qkv conv's output is on a uint8 grid (dequantized once)


def test_e2e_int8_matches_fake_quant_both_paths(y26):
    gm, _ = y26
    q = fxqat.convert(gm)
    assert q.meta["end2end"] is True
    convs = [n for n in q.graph.nodes if n.op == "call_module" and isinstance(q.get_submodule(n.target),
                                                                               Int8ConvBnAct)]
    assert {n.target.split("_")[2] for n in convs if n.target.startswith("model_23_")} == {"one2one"}  # o2m pruned
    for x in (signs_like_images(1, 320, seed=11), torch.rand(1, 3, 320, 320)):
        pre, (ref, _) = _decode_inputs(gm, x)
        preq, out = _decode_inputs(q, x)
        _check_pre_topk(pre, preq)
        _check_topk(pre, ref, out)
    o2m = set_end2end(gm, False)
    try:
        q2 = fxqat.convert(o2m)
        assert not any("one2one" in n.target for n in q2.graph.nodes if n.op == "call_module")  # o2o pruned
        x = signs_like_images(1, 320, seed=3)
        with torch.no_grad():
            y, yq = gm(x)[0], q2(x)
        _check_pre_topk(y, yq)  # one-to-many: (B, 4 + nc, A) xywh, like Detect
    finally:
        set_end2end(gm, True)


def test_e2e_onnx_matches_fake_quant(y26, tmp_path):
    import onnx
    import onnxruntime as ort

    gm, _ = y26
    path = fxqat.export_onnx(gm, tmp_path / "y26.onnx", imgsz=320)
    from fxqat.deploy import read_onnx_metadata
    from fxqat.evaluate import as_predictor

    assert read_onnx_metadata(path)["end2end"] is True and as_predictor(path).end2end  # validated without NMS
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    assert convs == sum(op_kind(gm, n) == "conv" for n in gm.graph.nodes) - 24  # no one-to-many branch (24 convs)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (signs_like_images(1, 320, seed=5), torch.rand(1, 3, 320, 320)):
        pre, (ref, _) = _decode_inputs(gm, x)
        out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        _check_topk(pre, ref, out)


@pytest.mark.parametrize("name", ["yolov10n.yaml", pytest.param("yolo26s.yaml", marks=pytest.mark.slow),
                                  pytest.param("yolov10s.yaml", marks=pytest.mark.slow)])
def test_e2e_other_models_int8_and_onnx(name, tmp_path, golden):
    import onnxruntime as ort

    gm, text = _prepared(name)
    if name == "yolov10n.yaml":
        golden("yolov10n_prepared_summary.txt", text)
    q = fxqat.convert(gm)
    sess = ort.InferenceSession(str(fxqat.export_onnx(gm, tmp_path / "m.onnx", imgsz=320)),
                                providers=["CPUExecutionProvider"])
    x = signs_like_images(1, 320, seed=11)
    pre, (ref, _) = _decode_inputs(gm, x)
    preq, out = _decode_inputs(q, x)
    _check_pre_topk(pre, preq)
    _check_topk(pre, ref, out)
    _check_topk(pre, ref, torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]))

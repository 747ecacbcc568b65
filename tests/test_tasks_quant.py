"""Segment / Pose / OBB through prepare → calibrate → convert (INT8 torch) → export (QDQ ONNX), on 320 px n models.

Tolerances (as for Detect in tests/passes/test_pipeline.py and tests/test_export.py): the INT8 model and ONNX Runtime
may round a tie differently from the fake-quant model, flipping one code in an intermediate layer; so for >= 99.9 % of
values: class scores and mask probabilities within one uint8 step of [0, 1] (1/255), boxes and keypoint xy within
1 px, prototypes within one step of their own grid, angles within 1/255 of the angle range π.
"""

import pytest
import torch

import fxqat
from fxqat.graph.meta import info
from fxqat.graph.registry import op_kind
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import prepared_and_calibrated, signs_like_images

NC = 10
WITHIN = 0.999


def _prepared(name):
    return prepared_and_calibrated(name, NC)


@pytest.fixture(scope="module")
def seg():
    return _prepared("yolov8n-seg.yaml")


@pytest.fixture(scope="module", params=["yolov8n-pose.yaml", pytest.param("yolov8n-obb.yaml", marks=pytest.mark.slow)])
def pose_obb(request):
    return request.param.split("-")[1].split(".")[0], _prepared(request.param)[0]


def _fq(gm, n):
    m = gm.get_submodule(n.target) if n.op == "call_module" else None
    return m if isinstance(m, FakeQuant) else None


def _frac_within(a, b, tol):
    return ((a - b).abs() <= tol).float().mean().item()


def _masks(y, proto, k=50):
    """Mask probabilities sigmoid(coefficients · prototypes) of the k best-scoring anchors (chosen on ``y``)."""
    idx = y[:, 4:4 + NC].amax(1).topk(k, dim=1).indices
    mc = torch.gather(y[:, 4 + NC:], 2, idx[:, None].expand(-1, proto.shape[1], -1))
    return torch.einsum("bck,bchw->bkhw", mc, proto).sigmoid(), idx


def _check_seg(ref, out, proto_step):
    (y, p), (yq, pq) = ref, out
    assert yq.shape == y.shape and pq.shape == p.shape
    assert _frac_within(y[:, 4:4 + NC], yq[:, 4:4 + NC], 1 / 255) >= WITHIN
    assert _frac_within(y[:, :4], yq[:, :4], 1.0) >= WITHIN
    assert _frac_within(p, pq, proto_step * 1.001) >= WITHIN  # 1.001: float rounding of the step itself
    m, idx = _masks(y, p)
    mq = torch.einsum("bck,bchw->bkhw", torch.gather(yq[:, 4 + NC:], 2, idx[:, None].expand(-1, pq.shape[1], -1)),
                      pq).sigmoid()
    assert _frac_within(m, mq, 1 / 255) >= WITHIN


def _check_task(task, y, yq):
    assert yq.shape == y.shape
    assert _frac_within(y[:, 4:4 + NC], yq[:, 4:4 + NC], 1 / 255) >= WITHIN
    assert _frac_within(y[:, :4], yq[:, :4], 1.0) >= WITHIN
    extra, extra_q = y[:, 4 + NC:], yq[:, 4 + NC:]
    if task == "pose":  # (x, y, visibility) per keypoint
        xy = torch.ones(extra.shape[1], dtype=torch.bool)
        xy[2::3] = False
        assert _frac_within(extra[:, xy], extra_q[:, xy], 1.0) >= WITHIN
        assert _frac_within(extra[:, ~xy], extra_q[:, ~xy], 1 / 255) >= WITHIN
    else:
        assert extra.shape[1] == 1 and _frac_within(extra, extra_q, torch.pi / 255) >= WITHIN


def test_seg_prepared_golden_and_head_quantization(seg, golden):
    gm, text = seg
    golden("yolov8n-seg_prepared_summary.txt", text)
    nodes = {n.name: n for n in gm.graph.nodes}
    for role in ("segment.mask_last", "detect.box_last", "detect.cls_last"):  # INT8 weights, float output
        hits = [n for n in nodes.values() if info(n).role == role]
        assert len(hits) == 3, role
        for n in hits:
            assert gm.get_submodule(n.target).weight_fq is not None
            assert not any(_fq(gm, u) for u in n.users), n.name
    up = next(n for n in nodes.values() if info(n).role == "segment.upsample")
    assert isinstance(gm.get_submodule(up.target), torch.nn.ConvTranspose2d)  # float weights (see module doc)
    assert any(_fq(gm, u) for u in up.users)  # its output is requantized for proto.cv2's INT8 input
    last = next(n for n in nodes.values() if info(n).role == "segment.proto_last")
    assert any(_fq(gm, u) for u in last.users)  # prototypes on a uint8 grid (measured: report in the README)
    dec = next(n for n in nodes.values() if info(n).role == "detect.decode")
    boxes, scores, _, coefficients, proto = dec.args
    assert all(_fq(gm, a) is None for a in (boxes, scores, coefficients))  # float into the decode
    assert _fq(gm, proto) is not None
    assert all(bool(m.initialized) for m in gm.modules() if isinstance(m, FakeQuant))  # calibrated


def _proto_step(gm):
    last = next(n for n in gm.graph.nodes if info(n).role == "segment.proto_last")
    return float(next(_fq(gm, u) for u in last.users).scale)


def test_seg_int8_matches_fake_quant(seg):
    gm, _ = seg
    q = fxqat.convert(gm)
    dec = next(n for n in q.graph.nodes if op_kind(q, n) == "decode")
    assert not q.get_submodule(dec.target).bins_last  # BinsLastHead is Detect-only
    for x in (signs_like_images(2, 320, seed=11), torch.rand(2, 3, 320, 320)):
        with torch.no_grad():
            ref, out = gm(x)[0], q(x)
        _check_seg(ref, out, _proto_step(gm))


def test_seg_onnx_runtime_matches_fake_quant(seg, tmp_path):
    import onnxruntime as ort

    gm, _ = seg
    path = fxqat.export_onnx(gm, tmp_path / "seg.onnx", imgsz=320)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (signs_like_images(1, 320, seed=5), torch.rand(1, 3, 320, 320)):
        with torch.no_grad():
            ref = gm(x)[0]
        out = tuple(torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()}))
        assert len(out) == 2  # (predictions, prototypes) like Ultralytics' export
        _check_seg(ref, out, _proto_step(gm))


def test_pose_obb_int8_and_onnx_match_fake_quant(pose_obb, tmp_path):
    import onnxruntime as ort

    task, gm = pose_obb
    q = fxqat.convert(gm)
    path = fxqat.export_onnx(gm, tmp_path / f"{task}.onnx", imgsz=320)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (signs_like_images(1, 320, seed=11), torch.rand(1, 3, 320, 320)):
        with torch.no_grad():
            ref, out = gm(x)[0], q(x)
        assert ref.shape == (1, 4 + NC + (51 if task == "pose" else 1), 2100)
        _check_task(task, ref, out)
        _check_task(task, ref, torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolo11n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-obb.yaml"])
def test_yolo11_task_heads_int8_and_onnx_match_fake_quant(name, tmp_path):
    import onnxruntime as ort

    task = name.split("-")[1].split(".")[0]
    gm, _ = _prepared(name)
    q = fxqat.convert(gm)
    sess = ort.InferenceSession(str(fxqat.export_onnx(gm, tmp_path / "m.onnx", imgsz=320)),
                                providers=["CPUExecutionProvider"])
    x = signs_like_images(1, 320, seed=11)
    with torch.no_grad():
        ref, out = gm(x)[0], q(x)
    ort_out = tuple(torch.from_numpy(o) for o in sess.run(None, {"images": x.numpy()}))
    if task == "seg":
        _check_seg(ref, out, _proto_step(gm))
        _check_seg(ref, ort_out, _proto_step(gm))
    else:
        _check_task(task, ref, out)
        _check_task(task, ref, ort_out[0])

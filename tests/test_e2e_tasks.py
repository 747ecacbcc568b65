"""YOLO26's end-to-end task heads (Segment26, Pose26, OBB26): trace parity with eager Ultralytics on both inference
paths, roles, and prepare → calibrate → convert (INT8 torch) → export (QDQ ONNX) parity at 320 px.

Tolerances as for the YOLOv8 task heads (tests/test_tasks_quant.py) on the deployed branch's predictions before the
top-k (read at the decode): >= 99.9 % of class scores within 1/255, boxes and keypoint xy within 1 px, visibility
within 1/255, raw angle logits within π/255, prototypes within one step of their grid and masks (after the
prototype product) within 1/255. The top-k rows (float selection of those predictions): each row is one of the
reference's predictions (same class, score within 1/255, box within 1 px) for >= 99 % of rows.
"""

import copy

import pytest
import torch

import fxqat
from fxqat.graph.meta import info
from fxqat.graph.registry import op_kind
from fxqat.models import load_model
from fxqat.modules.e2e import set_end2end
from fxqat.modules.e2e_tasks import EndToEndTaskDecode
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import (assert_bit_exact, assert_traced_matches_in_both_modes, liven, prepared_and_calibrated,
                               signs_like_images)
from .test_tasks_quant import NC, _check_seg, _check_task, _proto_step

SIZES = [(96, 96), (128, 192)]  # 189 anchors < max_det 300 (k = all anchors); 504 > 300 (top-k selects), non-square
TASKS = {"seg": "segment", "pose": "pose", "obb": "obb"}


def _decode_node(gm):
    return next(n for n in gm.graph.nodes if op_kind(gm, n) == "decode")


@pytest.mark.parametrize("name", ["yolo26n-pose.yaml", *(pytest.param(f"yolo26{s}-{t}.yaml", marks=pytest.mark.slow)
                                                          for s in "nsmlx" for t in ("seg", "pose", "obb")
                                                          if f"{s}-{t}" != "n-pose")])
def test_yolo26_task_heads_bit_identical_both_paths(name):
    torch.manual_seed(0)
    model = liven(load_model(name, nc=3))
    task = TASKS[name.split("-")[1].split(".")[0]]
    gm = fxqat.trace(model, "train")
    assert gm.meta["task"] == task and gm.meta["end2end"] is False  # Ultralytics' default path
    assert isinstance(gm.get_submodule(_decode_node(gm).target), EndToEndTaskDecode)
    for one2one in (False, True):
        model.end2end = one2one
        set_end2end(gm, one2one)
        assert_traced_matches_in_both_modes(model, gm, SIZES)  # training dicts (sigma, semantic logits) included
    raw = copy.deepcopy(gm).train()(torch.rand(1, 3, 96, 96))  # a copy: its BN statistics move, the model's not
    extra = {"segment": {"mask_coefficient", "proto"}, "pose": {"kpts", "kpts_sigma"}, "obb": {"angle"}}[task]
    assert set(raw["one2one"]) == {"boxes", "scores", "feats"} | extra
    # export mode (the deployed form): the head's own flag in eager, the decode's option in the graph
    node = _decode_node(gm)
    gm.add_submodule(node.target, gm.get_submodule(node.target).with_options(export=True))
    model.model[-1].export = True
    model.eval()
    x = torch.rand(1, 3, 128, 192)
    assert_bit_exact(model, gm.eval(), x)
    with torch.no_grad():
        y = gm(x)
    y = y[0] if task == "segment" else y
    head = model.model[-1]
    assert y.shape == (1, 300, 6 + {"segment": getattr(head, "nm", 0), "pose": getattr(head, "nk", 0), "obb": 1}[task])


def test_training_only_parts_train_and_are_dropped_when_deployed():
    """Pose26's sigma heads and flow model and Segment26's semantic branch are parameters of the QAT graph (the
    optimizer trains them: the loss reaches them), and the deployed decode has none of them."""
    gm = fxqat.trace(load_model("yolo26n-pose.yaml", nc=2), "train")
    dec = gm.get_submodule(_decode_node(gm).target)
    names = [k for k, _ in gm.named_parameters()]
    assert any(".decode.cv4_sigma." in k for k in names) and any(".decode.one2one_cv4_sigma." in k for k in names)
    assert any(".decode.flow_model." in k for k in names)
    raw = gm(torch.rand(1, 3, 96, 96))
    (raw["one2many"]["kpts_sigma"].sum() + raw["one2one"]["kpts_sigma"].sum()).backward()
    assert dec.cv4_sigma[0].weight.grad.abs().sum() > 0 and dec.one2one_cv4_sigma[0].weight.grad.abs().sum() > 0
    deployed = dec.with_options(export=True)
    assert deployed.cv4_sigma is None and deployed.flow_model is None
    assert not any("sigma" in k or "flow" in k for k in deployed.state_dict())

    seg = fxqat.trace(load_model("yolo26n-seg.yaml", nc=2), "train")
    proto, semantic = seg(torch.rand(1, 3, 96, 96))["one2many"]["proto"]
    assert semantic.shape == (1, 2, 12, 12)  # nc semantic logits on P3
    semantic.sum().backward()
    sdec = seg.get_submodule(_decode_node(seg).target)
    assert sdec.semseg[0].conv.weight.grad.abs().sum() > 0
    assert sdec.with_options(export=True).semseg is None


def test_pose26_loss_uses_the_graphs_flow_model():
    """The trainer's loss (PoseLoss26 through E2ELoss) reads the flow model of the QAT graph, not a copy."""
    from ultralytics.cfg import get_cfg

    from fxqat.training import QATDetectionModel

    gm = fxqat.trace(load_model("yolo26n-pose.yaml", nc=2), "train")
    model = QATDetectionModel(gm)
    model.args = get_cfg()
    crit = model.init_criterion()
    assert crit.one2many.flow_model is gm.get_submodule(_decode_node(gm).target).flow_model
    assert crit.one2many.rle_loss is not None


def _prepared(name):
    return prepared_and_calibrated(name, NC, end2end=True)


@pytest.fixture(scope="module", params=["yolo26n-seg.yaml", "yolo26n-pose.yaml",
                                        pytest.param("yolo26n-obb.yaml", marks=pytest.mark.slow)])
def y26_task(request):
    return (TASKS[request.param.split("-")[1].split(".")[0]], *_prepared(request.param))


def _at_decode(g, x):
    """(the one-to-one branch's predictions before top-k (B, 4 + nc + extra, A), prototypes or None, the output)."""
    node = _decode_node(g)
    dec, cap = g.get_submodule(node.target), {}
    h = dec.register_forward_hook(lambda mod, args, out: cap.update(args=args))
    with torch.no_grad():
        out = g(x)
    h.remove()
    a = cap["args"]
    return dec.predictions(a[3], a[4], a[2], a[6]), (a[7] if len(a) > 7 else None), out


def _check_topk(pre, out):
    """Each top-k row of ``out`` (1, k, 6 + extra) is one of the predictions ``pre`` (1, 4 + nc + extra, A)."""
    o, p = out[0], pre[0]
    cls = o[:, 5].long()
    score_ok = (p[4 + cls] - o[:, 4:5]).abs() <= 1 / 255
    box_ok = ((p[:4].T[None] - o[:, None, :4]).abs() <= 1.0).all(-1)
    assert (score_ok & box_ok).any(1).float().mean().item() >= 0.99


def test_yolo26_task_heads_roles_int8_and_onnx(y26_task, tmp_path, golden):
    import onnxruntime as ort

    task, gm, text = y26_task
    golden(f"yolo26n-{task}_prepared_summary.txt", text)
    nodes = list(gm.graph.nodes)
    last = {"segment": "e2e.mask_last", "pose": "e2e.kpt_last", "obb": "e2e.angle_last"}[task]
    for role in (last, "e2e.box_last", "e2e.cls_last"):  # INT8 weights, float output, as the one-to-many branch's
        hits = [n for n in nodes if info(n).role == role]
        assert len(hits) == 3, role
        for n in hits:
            assert gm.get_submodule(n.target).weight_fq is not None
            assert not any(isinstance(gm.get_submodule(u.target), FakeQuant) for u in n.users if u.op == "call_module")
    from fxqat.analysis.sensitivity import head_groups

    extra = {"segment": {"e2e.mask_last", "segment.proto_last"}, "pose": {"e2e.kpt_last"}, "obb": {"e2e.angle_last"}}
    assert set(head_groups(gm)) == {"detect"} | extra[task]  # fxqat analyze measures the one-to-one outputs
    if task == "segment":  # Proto26's P4 / P5 upsamples are resizes on their input's grid
        ups = [n for n in nodes if ".proto.fxqat_up." in str(n.target)]
        assert len(ups) == 2 and all(op_kind(gm, n) == "resize" and info(n).qspec.shared for n in ups)
    q = fxqat.convert(gm)
    mods = [n.target for n in q.graph.nodes if n.op == "call_module"]
    assert not any(t.startswith("model_23_cv") or "sigma" in t or "semseg" in t for t in mods)  # o2m, training-only
    sess = ort.InferenceSession(str(fxqat.export_onnx(gm, tmp_path / f"{task}.onnx", imgsz=320)),
                                providers=["CPUExecutionProvider"])
    for x in (signs_like_images(1, 320, seed=11), torch.rand(1, 3, 320, 320)):
        pre, proto, out = _at_decode(gm, x)
        preq, protoq, outq = _at_decode(q, x)
        if task == "segment":
            _check_seg((pre, proto), (preq, protoq), _proto_step(gm))
            ref, outq = out[0][0], outq[0]
        else:
            _check_task(task, pre, preq)
            ref = out[0]
        assert outq.shape == ref.shape
        _check_topk(pre, outq)
        onnx_out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        _check_topk(pre, onnx_out)


def test_converted_yolo26_pose_drops_the_other_branch_and_training_only_inputs():
    """A small, fast convert (64 px): the INT8 graph computes neither the one-to-many branch nor what only training
    reads (the keypoint features the sigma heads would take), and returns the top-k rows with decoded keypoints."""
    model = load_model("yolo26n-pose.yaml", nc=2)
    model.end2end = True
    gm = fxqat.prepare_qat(model, example_inputs=(torch.rand(1, 3, 64, 64),))
    fxqat.calibrate(gm, [torch.rand(2, 3, 64, 64)], progress=False)
    q = fxqat.convert(gm.eval())
    node = _decode_node(q)
    assert all(node.args[i] is None for i in (0, 1, 5, 8, 9))  # one-to-many inputs, training-only inputs
    mods = [n.target for n in q.graph.nodes if n.op == "call_module"]
    assert not any(t.startswith(("model_23_cv", "model_23_one2one_cv4_sigma")) for t in mods)
    with torch.no_grad():
        y = q(torch.rand(1, 3, 64, 64))
    assert y.shape == (1, 84, 6 + 17 * 3)  # 84 anchors < max_det: k = all

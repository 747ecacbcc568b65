import io
import operator

import pytest
import torch
import torch.nn as nn

import fxqat
from fxqat.graph.meta import info
from fxqat.graph.registry import op_kind
from fxqat.modules.int8 import Dequantize
from fxqat.quant.fake_quant import FakeQuant

from ..conftest_helpers import assert_int8_matches_fake_quant, liven, signs_like_images


@pytest.fixture(scope="module")
def calibrated():
    from fxqat.models import load_model

    model = liven(load_model("yolov8n.yaml", nc=10))
    gm = fxqat.prepare_qat(model)
    fxqat.calibrate(gm, [signs_like_images(2, 320, seed=s) for s in range(3)], progress=False)
    return gm


def _fq(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" and isinstance(
        gm.get_submodule(node.target), FakeQuant) else None


def _grid_of(gm, node):
    """The quantizer whose grid ``node``'s value lies on (walking back through shared ops)."""
    while True:
        fq = _fq(gm, node)
        if fq is not None:
            return fq
        if op_kind(gm, node) in ("cat", "pool", "resize", "split"):
            node = node.all_input_nodes[0]
            continue
        return None


def test_concat_inputs_share_one_scale(calibrated):
    gm = calibrated
    cats = [n for n in gm.graph.nodes if op_kind(gm, n) == "cat" and info(n).block != "Detect"]
    assert len(cats) == 13  # 8 C2f + SPPF + 4 neck Concat
    for n in cats:
        grids = {id(_grid_of(gm, a)) for a in n.all_input_nodes}
        assert len(grids) == 1 and None not in {_grid_of(gm, a) for a in n.all_input_nodes}, n.name
        scales = {float(_grid_of(gm, a).scale) for a in n.all_input_nodes}
        zps = {int(_grid_of(gm, a).zero_point) for a in n.all_input_nodes}
        assert len(scales) == 1 and len(zps) == 1  # exact equality, read from the model


def test_maxpool_shares_and_head_tail_is_float(calibrated):
    gm = calibrated
    pools = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                nn.MaxPool2d)]
    for p in pools:
        assert _grid_of(gm, p) is _grid_of(gm, p.all_input_nodes[0])
        assert not any(_fq(gm, u) for u in p.users)  # no requantization after a pool
    decode = next(n for n in gm.graph.nodes if info(n).role == "detect.decode")
    boxes, scores, _ = decode.args
    assert _grid_of(gm, boxes) is None and _grid_of(gm, scores) is None  # DFL / decode inputs stay float
    assert not any(isinstance(m, FakeQuant) for m in gm.get_submodule(decode.target).modules())
    for role in ("detect.box_last", "detect.cls_last"):
        for n in (n for n in gm.graph.nodes if info(n).role == role):
            assert not any(_fq(gm, u) for u in n.users)  # float output
            assert gm.get_submodule(n.target).weight_fq is not None  # INT8 weights


def test_quantizer_count_follows_the_rules(calibrated):
    gm = calibrated
    acts = {id(m) for m in gm.modules() if isinstance(m, FakeQuant) and m.ch_axis is None}
    weights = [m for m in gm.modules() if isinstance(m, FakeQuant) and m.ch_axis is not None]
    # producers: the image + 57 conv outputs (63 convs less 6 float-output head convs) + 6 residual adds = 64;
    # sharing merges: C2f concats 6 (backbone, with adds) + 4 (neck) and neck Concats 4 → 64 - 14 = 50 classes
    assert len(acts) == 50
    assert len(weights) == 63
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert all(_fq(gm, next(iter(a.users))) for a in adds)  # residual add output quantized once


def test_roles_assigned(calibrated):
    roles = {info(n).role for n in calibrated.graph.nodes}
    for r in ("first_conv", "c2f.cv1", "c2f.concat", "c2f.split", "bottleneck.add", "sppf.pool", "sppf.concat",
              "detect.box_last", "detect.cls_last", "detect.decode", "concat", "upsample"):
        assert r in roles, r
    first = [n for n in calibrated.graph.nodes if info(n).role == "first_conv"]
    assert [info(n).module_path for n in first] == ["model.0"]


def test_converted_matches_fake_quant(calibrated):
    gm = calibrated.eval()
    q = fxqat.convert(gm)
    for x in (signs_like_images(2, 320, seed=11), torch.rand(2, 3, 320, 320)):
        ref, out = assert_int8_matches_fake_quant(gm, q, x)  # tolerances: see the helper
    # every int8 weight is the code the QAT model's weight quantizer used (its extreme weights sit on a .5 step)
    for n in gm.graph.nodes:
        if op_kind(gm, n) == "conv" and n.op == "call_module" and gm.get_submodule(n.target).weight_fq is not None:
            src, dst = gm.get_submodule(n.target), q.get_submodule(n.target.replace(".", "_"))
            w = src.weight_fq(src.folded()[0].detach())
            assert torch.equal(dst.w_int8.float() * dst.w_scale.view(-1, 1, 1, 1), w), n.name
    # the head's float maps reach DetectDecode channels-last as (B, anchors, C), without NCHW copies
    assert q.get_submodule("model_22_decode").bins_last
    # Detect's last convs emit float themselves: no feature map is dequantized (not even to read its batch size)
    assert not [n for n in q.graph.nodes if n.op == "call_module" and isinstance(q.get_submodule(n.target), Dequantize)]
    buf = io.BytesIO()  # saving after use drops the cached oneDNN weight packs, which cannot be pickled
    torch.save(q, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), out)


def test_qat_trains_loss_decreases_and_gradients_reach_every_conv():
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    from fxqat.models import load_model

    torch.manual_seed(0)
    det = load_model("yolov8n.yaml", nc=10)
    det.args = get_cfg()
    gm = fxqat.prepare_qat(det, example_inputs=(signs_like_images(2, 128),))
    gm.train()
    crit = v8DetectionLoss(det)
    imgs = signs_like_images(4, 128, seed=3)
    # boxes of several sizes in every image, so each pyramid level gets positive anchors
    sizes = [0.08, 0.2, 0.45, 0.9]
    batch = {"batch_idx": torch.tensor([float(i) for i in range(4) for _ in sizes]),
             "cls": torch.tensor([[float(k)] for _ in range(4) for k in range(len(sizes))]),
             "bboxes": torch.tensor([[0.5, 0.5, s, s] for _ in range(4) for s in sizes])}
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss, _ = crit(gm(imgs), batch)
        loss.sum().backward()
        if step == 0:
            convs = {n: m for n, m in gm.named_modules() if type(m).__name__ == "ConvBnAct"}
            assert len(convs) == 63 and all(m.conv.weight.grad is not None for m in convs.values())
            # the float model, same batch: convs whose gradient is zero there (pyramid levels without positive
            # anchors for the box loss) may be zero here too; every other conv must receive gradient
            det.train()
            l_float, _ = crit(det(imgs), batch)
            l_float.sum().backward()
            live = {n.removesuffix(".conv.weight").removesuffix(".weight") for n, p in det.named_parameters()
                    if n.endswith("weight") and p.grad is not None and p.grad.abs().sum() > 0}
            dead = [n for n, m in convs.items() if n in live and m.conv.weight.grad.abs().sum() == 0]
            assert not dead and len(live & set(convs)) >= 57, dead
        opt.step()
        losses.append(float(loss.sum()))
    assert losses[-1] < losses[0]


def test_prepared_graph_golden(golden):
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=10)
    golden("yolov8n_prepared_summary.txt", fxqat.summary(gm, imgsz=320).to_text())


def test_identity_activations_fuse_into_their_convs():
    """``Conv(act=False)`` (yolo11's C2PSA: qkv, pe, proj, ffn.1) is one ConvBnAct whose output is rounded
    once: no Identity node with a quantizer of its own, and no dequantize → quantize pair in the INT8 model."""
    from fxqat.modules.conv_bn_act import ConvBnAct
    from fxqat.modules.int8 import Quantize

    gm = fxqat.prepare_qat("yolo11n.yaml", nc=3, example_inputs=(torch.rand(1, 3, 64, 64),))
    assert not [n.name for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(n.target), nn.Identity)]
    pe = gm.get_submodule("model.10.m.0.attn.pe")
    assert isinstance(pe, ConvBnAct) and isinstance(pe.act, nn.Identity)
    (fq,) = next(n for n in gm.graph.nodes if n.target == "model.10.m.0.attn.pe").users
    assert _fq(gm, fq) is not None and not any(_fq(gm, u) for u in fq.users)
    q = fxqat.convert(gm.eval())
    pairs = [n.name for n in q.graph.nodes if n.op == "call_module" and isinstance(q.get_submodule(n.target), Quantize)
             and n.args[0].op == "call_module" and isinstance(q.get_submodule(n.args[0].target), Dequantize)]
    assert not pairs


def test_a_quantizer_after_an_identity_op_on_another_grid_requantizes(calibrated):
    """conv → FQ1 → Dropout → FQ2 (another grid) → ...: Dropout lowers to nothing, so the INT8 model must
    requantize FQ1's codes onto FQ2's grid; keeping FQ1's codes (the producer's grid) would be silently wrong."""
    import copy

    gm = copy.deepcopy(calibrated).eval()
    fq1 = next(n for n in gm.graph.nodes if n.name == "quant_model_0")
    fq2_mod = copy.deepcopy(gm.get_submodule(fq1.target))
    fq2_mod.scale.mul_(8.0)  # a coarser grid: 8 codes of FQ1 per code of FQ2
    gm.add_submodule("drop_test", nn.Dropout(0.0))
    gm.add_submodule("quant_drop_test", fq2_mod)
    with gm.graph.inserting_after(fq1):
        drop = gm.graph.call_module("drop_test", (fq1,))
    with gm.graph.inserting_after(drop):
        fq2 = gm.graph.call_module("quant_drop_test", (drop,))
    fq1.replace_all_uses_with(fq2, delete_user_cb=lambda u: u is not drop)
    drop.meta["fxqat"], fq2.meta["fxqat"] = copy.copy(info(fq1)), copy.copy(info(fq1))
    gm.recompile()
    q = fxqat.convert(gm)
    assert not any(isinstance(m, nn.Dropout) for m in q.modules())
    from fxqat.modules.int8 import Int8ConvBnAct, Quantize

    grid2 = (float(fq2_mod.scale), int(fq2_mod.zero_point))  # requantized (QuantizeIntoConv may move it into the conv)
    assert any(isinstance(m, Quantize) and (m.scale, m.zero_point) == grid2 or isinstance(m, Int8ConvBnAct) and
               m.quantize_input and (m.x_scale, m.x_zp) == grid2 for m in q.modules())
    assert_int8_matches_fake_quant(gm, q, signs_like_images(2, 320, seed=7))

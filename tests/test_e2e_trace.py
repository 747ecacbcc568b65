"""End-to-end (NMS-free) heads — YOLO26 ``Detect`` with ``one2one_*`` and YOLOv10 ``v10Detect``: trace parity with
eager Ultralytics in train / eval / export mode, on both inference paths (one-to-many, one-to-one top-k)."""

import pytest
import torch

import fxqat
from fxqat.errors import FxqatError
from fxqat.graph.registry import op_kind
from fxqat.models import load_model
from fxqat.modules.e2e import EndToEndDecode, set_end2end

from .conftest_helpers import assert_bit_exact, assert_traced_matches_in_both_modes, liven

# 160 px: 525 anchors > max_det 300 (top-k selects); 96 px: 189 anchors < 300 (k = all anchors); one non-square
SIZES = [(160, 160), (96, 96), (128, 192)]


def _decode(gm):
    return next(gm.get_submodule(n.target) for n in gm.graph.nodes if op_kind(gm, n) == "decode")


@pytest.mark.parametrize("name", [
    "yolo26n.yaml", "yolov10n.yaml",
    pytest.param("yolo26s.yaml", marks=pytest.mark.slow), pytest.param("yolov10s.yaml", marks=pytest.mark.slow),
    *(pytest.param(f"{g}{s}.yaml", marks=pytest.mark.slow) for s in "mlx" for g in ("yolo26", "yolov10")),
])
def test_e2e_bit_identical_both_paths(name):
    torch.manual_seed(0)
    model = liven(load_model(name, nc=3))
    for one2one in (False, True):
        model.end2end = one2one  # Ultralytics' switch (predict / val / export set it from nms=False)
        gm = fxqat.trace(model, "train")
        assert gm.meta["end2end"] is one2one and isinstance(_decode(gm), EndToEndDecode)
        assert_traced_matches_in_both_modes(model, gm, SIZES)
    model.eval()
    with torch.no_grad():
        y = gm.eval()(torch.rand(2, 3, 160, 160))[0]
    assert y.shape == (2, 300, 6)  # x1 y1 x2 y2 score class, top-k = max_det
    assert torch.all(y[..., 2] >= y[..., 0]) and torch.all(y[..., 4][:, :-1] >= y[..., 4][:, 1:])  # xyxy, sorted


def test_e2e_export_mode_and_set_end2end():
    model = load_model("yolo26n.yaml", nc=3).eval()
    gm = fxqat.trace(model, "eval")
    assert gm.meta["end2end"] is False  # Ultralytics' default: one-to-many for NMS
    x = torch.rand(1, 3, 128, 192)
    with torch.no_grad():
        assert gm(x)[0].shape == (1, 4 + 3, 16 * 24 + 8 * 12 + 4 * 6)
    set_end2end(gm, True)
    model.end2end = True
    assert gm.meta["end2end"] is True
    assert_bit_exact(model, gm, x)
    path = next(n.target for n in gm.graph.nodes if op_kind(gm, n) == "decode")
    gm.add_submodule(path, _decode(gm).with_options(export=True))
    model.model[-1].export = True
    assert_bit_exact(model, gm, x)  # export: the (B, k, 6) tensor alone
    with torch.no_grad():
        assert gm(x).shape == (1, 300, 6)  # 504 anchors: k = max_det = 300
    with pytest.raises(FxqatError, match="no end-to-end"):
        set_end2end(fxqat.trace(load_model("yolov8n.yaml", nc=2)), True)


def test_one2one_branch_does_not_train_the_backbone():
    """As in Ultralytics, the one-to-one branch reads detached feature maps: its loss reaches only its own convs."""
    gm = fxqat.trace(load_model("yolo26n.yaml", nc=2), "train")
    raw = gm(torch.rand(1, 3, 96, 96))
    assert set(raw) == {"one2many", "one2one"}
    (raw["one2one"]["scores"].sum() + raw["one2one"]["boxes"].sum()).backward()
    grads = {n: p.grad for n, p in gm.named_parameters()}
    assert all(g is None for n, g in grads.items() if ".one2one_" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".one2one_cv3." in n)


def test_other_e2e_task_heads_refused_with_a_clear_message():
    """YOLO26's task heads are traced (tests/test_e2e_tasks.py); a YOLOv8 Segment head built with ``end2end: True``
    (its own v8 decode with a one-to-one branch set) is not, and says which are."""
    from ultralytics.nn.tasks import SegmentationModel, yaml_model_load

    from fxqat.errors import ModelLoadError

    cfg = yaml_model_load("yolov8n-seg.yaml")
    cfg["end2end"] = True
    model = SegmentationModel(cfg, nc=2, verbose=False)
    assert getattr(model.model[-1], "one2one_cv4", None) is not None
    with pytest.raises(ModelLoadError, match="end-to-end \\(NMS-free\\) Segment heads are not supported; fxqat "
                                             "traces YOLO26's"):
        load_model(model)


def test_e2e_flag_reaches_checkpoint_predictor_metadata_and_analysis(tmp_path):
    """The one-to-one choice survives a checkpoint, makes the validator skip NMS (Predictor.end2end), is written to
    the ONNX metadata, and makes the sensitivity analysis measure the one-to-one head's outputs."""
    from fxqat.analysis.sensitivity import head_roles
    from fxqat.checkpoint import load_checkpoint, save_checkpoint
    from fxqat.deploy import yolo_metadata
    from fxqat.evaluate import as_predictor

    model = load_model("yolo26n.yaml", nc=2)
    model.end2end = True
    gm = fxqat.prepare_qat(model, example_inputs=(torch.rand(1, 3, 64, 64),))
    back = load_checkpoint(save_checkpoint(tmp_path / "e2e.pt", gm))
    assert back.meta["end2end"] is True and _decode(back).one2one
    assert as_predictor(back).end2end and as_predictor(model).end2end
    assert yolo_metadata(back.meta, 320)["end2end"] is True
    assert head_roles(back) == ("e2e.box_last", "e2e.cls_last")
    set_end2end(back, False)
    assert not as_predictor(back).end2end and yolo_metadata(back.meta, 320)["end2end"] is False
    assert head_roles(back) == ("detect.box_last", "detect.cls_last")

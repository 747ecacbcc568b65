"""Segment, Pose and OBB heads (YOLOv8 and YOLO11): trace parity with eager Ultralytics, roles, refusals."""

import pytest
import torch

import fxqat
from fxqat.graph.meta import info
from fxqat.models import load_model
from fxqat.modules.heads import OBBDecode, PoseDecode, SegmentDecode

from .conftest_helpers import assert_bit_exact, assert_traced_matches_in_both_modes

SIZES = [(160, 160), (256, 256), (192, 320)]  # small: three anchor grids, one non-square
DECODES = {"seg": SegmentDecode, "pose": PoseDecode, "obb": OBBDecode}


def _decode_path(gm):
    return next(n.target for n in gm.graph.nodes if n.op == "call_module" and info(n).role == "detect.decode")


def _sizes(fast: tuple[str, ...], slow: tuple[str, ...], tasks=("seg", "pose", "obb")) -> list:
    """Model YAML names per task and scale: ``fast`` ones in the default suite, ``slow`` ones marked slow."""
    return [pytest.param(f"{fam}{scale}-{t}.yaml", marks=() if f"{fam}{scale}" in fast else pytest.mark.slow)
            for fam in ("yolov8", "yolo11") for scale in "nsmlx" for t in tasks if f"{fam}{scale}" in fast + slow]


ALL_SCALES = _sizes(("yolov8n", "yolov8s", "yolo11s"),
                    ("yolo11n", "yolov8m", "yolov8l", "yolov8x", "yolo11m", "yolo11l", "yolo11x"))


@pytest.mark.parametrize("name", ALL_SCALES)
def test_task_heads_bit_identical_train_eval_export(name):
    model = load_model(name, nc=3)
    gm = fxqat.trace(model, "train")
    task = name.split("-")[1].split(".")[0]
    assert gm.meta["task"] == {"seg": "segment"}.get(task, task)
    assert_traced_matches_in_both_modes(model, gm, SIZES)
    # export mode: the head's own flag in eager, the decode's option in the graph
    from fxqat.passes.match import MatchPatterns

    MatchPatterns()(gm)
    path = _decode_path(gm)
    dec = gm.get_submodule(path)
    assert type(dec) is DECODES[task]
    gm.add_submodule(path, dec.with_options(export=True))
    model.model[-1].export = True
    x = torch.rand(2, 3, 192, 320)
    assert_bit_exact(model, gm, x)
    with torch.no_grad():
        out = gm(x)
    y = out[0] if task == "seg" else out
    head = model.model[-1]
    extra = {"seg": head.nm if task == "seg" else 0, "pose": getattr(head, "nk", 0), "obb": 1}[task]
    assert y.shape == (2, 4 + 3 + extra, 24 * 40 + 12 * 20 + 6 * 10)
    if task == "seg":
        assert out[1].shape == (2, head.nm, 48, 80)  # prototypes at 1/4 of the input


def test_bins_last_is_detect_only():
    gm = fxqat.trace(load_model("yolov8n-pose.yaml", nc=2), "eval")
    dec = gm.get_submodule("model.22.decode")
    with pytest.raises(ValueError, match="bins_last is not implemented"):
        dec.with_options(bins_last=True)
    assert dec.with_options(fast_dfl=True).fast_dfl


def test_obb_angle_decoded_in_raw_output():
    """The raw (training) dict holds the decoded angle in [−π/4, 3π/4], like Ultralytics' OBB.forward_head."""
    gm = fxqat.trace(load_model("yolov8n-obb.yaml", nc=2), "train")
    raw = gm(torch.rand(1, 3, 160, 160))
    assert set(raw) == {"boxes", "scores", "feats", "angle"}
    a = raw["angle"]
    assert a.shape == (1, 1, 400 + 100 + 25)
    assert a.min() >= -torch.pi / 4 and a.max() <= 3 * torch.pi / 4


def test_cli_trace_and_export_accept_task_models(tmp_path, capsys):
    from fxqat.checkpoint import save_checkpoint
    from fxqat.cli import main

    assert main(["trace", "yolov8n-obb.yaml", "imgsz=160", "nc=2"]) == 0
    assert "model.22.decode" in capsys.readouterr().out
    gm = fxqat.prepare_qat(load_model("yolov8n-seg.yaml", nc=2), example_inputs=(torch.rand(1, 3, 160, 160),))
    ckpt = save_checkpoint(tmp_path / "seg.pt", gm)
    assert main(["export", str(ckpt), "imgsz=160", f"out={tmp_path / 'seg.onnx'}"]) == 0
    import onnx

    assert len(onnx.load(str(tmp_path / "seg.onnx")).graph.output) == 2  # predictions and prototypes

"""``fxqat demo task=``: the demo's story for every task's shipped model (tiny packed records stand in for the
shipped files), its table columns, and the task pictures (masks, key points, rotated boxes, top-1 labels)."""

import json
import math

import numpy as np
import pytest
import torch

from fxqat.cli import main
from fxqat.report import markdown_table
from fxqat.report_tasks import decode, draw_class, draw_keypoints, draw_masks, draw_rotated, task_prediction_grid
from fxqat.tasks import task_metrics

from .demo_records import tiny_record

NAMES = {i: f"c{i}" for i in range(10)}


def test_demo_refuses_an_unknown_task(capsys):
    assert main(["demo", "task=segmentation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fxqat demo: task=segmentation: valid choices: detect, segment, pose, obb, classify"


def test_demo_model_is_a_shipped_model_of_the_task_given(capsys):
    from fxqat.demo import run_demo
    from fxqat.errors import FxqatError

    assert main(["demo", "model=yolo26n.yaml"]) == 2
    assert "model=yolo26n.yaml: valid choices (shipped models): fxqat-signs-yolov8n" in capsys.readouterr().err
    with pytest.raises(FxqatError, match="model=fxqat-signs-yolo26n is a detect model, not task=pose"):
        run_demo(model="fxqat-signs-yolo26n", task="pose")


def test_every_task_has_a_shipped_entry():
    from fxqat.demo import MODELS
    from fxqat.tasks import TASKS
    from fxqat.zoo import SHIPPED, shipped_path

    assert set(MODELS) == set(TASKS) and set(MODELS.values()) <= set(SHIPPED)
    for name in MODELS.values():
        assert shipped_path(name).stat().st_size < 10e6


# the main metric each shipped model was packed with (fxqat.zoo.pack measures it on the FP16 weights), a floor below it
SHIPPED_FLOORS = {"segment": 0.6, "pose": 0.65, "obb": 0.8, "classify": 0.95}


@pytest.mark.parametrize("task", sorted(SHIPPED_FLOORS))
def test_shipped_task_models_load_as_their_task(task):
    from fxqat.demo import MODELS
    from fxqat.models import load_model
    from fxqat.tasks import spec
    from fxqat.tracing import task_of
    from fxqat.zoo import info

    meta = info(MODELS[task])
    model = load_model(MODELS[task])
    assert task_of(model) == task and meta["task"] == task and not model.training
    assert meta["metrics"][spec(task).main] >= SHIPPED_FLOORS[task]
    assert any("pretrained=fxqat-signs-yolov8n" in c for c in meta["commands"])  # how it was made
    assert meta["data"]["generator"] == "signs" and meta["data"]["task"] == task


def test_demo_names_a_missing_shipped_file_before_any_work(tmp_path, monkeypatch, capsys):
    import fxqat.zoo as zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "empty")
    assert main(["demo", "task=pose", f"project={tmp_path / 'demo'}"]) == 1
    err = capsys.readouterr().err
    assert "fxqat-signs-yolov8n-pose.pt is missing from this installation" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("task", ["detect", "segment", "pose", "obb", "classify"])
def test_table_columns_are_the_tasks_metrics(task):
    companion, main_metric = task_metrics(task)
    rows = [{"model": m, "runtime": "torch", companion: c, main_metric: v, "latency_ms": 10.0, "size_mb": s}
            for m, c, v, s in (("FP32", 0.9, 0.5, 12.0), ("QAT INT8", 0.8, 0.375, 3.0))]
    head, _, fp32, qat = markdown_table(rows, (companion, main_metric)).splitlines()
    assert head.split(" | ")[2:5] == [main_metric, "Δ vs FP32", companion]
    assert qat.split(" | ")[2:5] == ["0.375", "-0.125", "0.800"] and fp32.split(" | ")[2] == "0.500"


def test_the_delta_shows_its_interval_when_there_is_one():
    rows = [{"model": "FP32", "runtime": "torch", "mAP50": 0.9, "mAP50-95": 0.5, "latency_ms": 10.0, "size_mb": 12.0},
            {"model": "QAT INT8", "runtime": "torch", "mAP50": 0.9, "mAP50-95": 0.498, "latency_ms": 5.0, "size_mb": 3.0,
             "delta_ci": [-0.009, 0.004]}]
    assert markdown_table(rows).splitlines()[3].split(" | ")[3] == "-0.002 [-0.009, +0.004]"


def test_detect_table_is_unchanged():
    rows = [{"model": "FP32", "runtime": "torch", "mAP50": 0.9, "mAP50-95": 0.5, "latency_ms": 10.0, "size_mb": 12.0}]
    assert markdown_table(rows).splitlines()[0] == ("| model | runtime | mAP50-95 | Δ vs FP32 | mAP50 | latency (ms) | "
                                                    "speed-up | size (MB) | size ratio |")


def _gray(h=64, w=64):
    return np.full((h, w, 3), 128, np.uint8)


def test_masks_are_blended_inside_the_mask_only():
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 10:30, 20:40] = True
    im = draw_masks(_gray(), mask, [3])
    changed = (im != 128).any(-1)
    assert changed[10:30, 20:40].all() and not changed[~mask[0]].any()


def test_keypoints_draw_the_visible_corner_quad():
    kpts = np.array([[[10, 10, 0.9], [50, 10, 0.9], [50, 50, 0.9], [10, 50, 0.1]]])  # BL not visible
    im = draw_keypoints(_gray(), kpts)
    changed = (im != 128).any(-1)
    for x, y in ((10, 10), (50, 10), (50, 50), (30, 10), (50, 30)):  # the three dots, the TL-TR and TR-BR edges
        assert changed[y, x], (x, y)
    assert not changed[50, 10] and not changed[30, 10] and not changed[50, 30]  # no BL dot, no edge to it
    assert not changed[30, 30]  # inside the quad


def test_rotated_boxes_follow_the_rotation():
    c = math.sqrt(0.5) * 20
    corners = np.array([[[32, 32 - c], [32 + c, 32], [32, 32 + c], [32 - c, 32]]])  # a square turned 45°
    im = draw_rotated(_gray(), corners, [1], [0.9], NAMES)
    changed = (im != 128).any(-1)
    assert changed[32, round(32 + c)] and changed[round(32 + c / 2), round(32 + c / 2)]  # a corner, an edge middle
    assert not changed[32, 32] and not changed[round(32 + c) - 2, round(32 + c) - 2]  # centre; outside the edge


def test_class_label_band():
    im = draw_class(_gray(96, 96), "stop", 0.93, correct=True)
    changed = (im != 128).any(-1)
    assert changed[-16:].all() and not changed[:-16].any()
    assert (im[-16:, :, 1] == 255).any() and not (im[-16:, :, 2] == 255).any()  # green text (BGR) for a right class


def test_decode_obb_and_pose_predictions():
    """Hand-made raw predictions decode to the corners / key points they hold (input pixels)."""
    a = 4
    pred = torch.zeros(1, 4 + 10 + 1, a)
    pred[0, :4, 0] = torch.tensor([32.0, 32.0, 20.0, 10.0])  # cx cy w h
    pred[0, 4 + 2, 0] = 0.9  # class 2
    pred[0, -1, 0] = math.pi / 2  # turned a quarter: 10 wide, 20 tall
    (r,) = decode("obb", pred, None, 10, 64)
    assert r["cls"].tolist() == [2] and r["corners"].shape == (1, 4, 2)
    np.testing.assert_allclose(r["corners"][0].min(0), [27, 22], atol=1e-4)
    np.testing.assert_allclose(r["corners"][0].max(0), [37, 42], atol=1e-4)
    pred = torch.zeros(1, 4 + 10 + 12, a)
    pred[0, :4, 1] = torch.tensor([32.0, 32.0, 20.0, 20.0])
    pred[0, 4 + 5, 1] = 0.8
    k = torch.tensor([22, 22, 0.9, 42, 22, 0.9, 42, 42, 0.9, 22, 42, 0.2])
    pred[0, 14:, 1] = k
    (r,) = decode("pose", pred, None, 10, 64)
    assert r["cls"].tolist() == [5] and np.allclose(r["kpts"][0], k.reshape(4, 3).numpy())
    np.testing.assert_allclose(r["boxes"][0], [22, 22, 42, 42], atol=1e-4)


@pytest.mark.parametrize("task,extra", [("detect", 0), ("segment", 32), ("pose", 12), ("obb", 1)])
def test_no_detection_draws_the_plain_image(task, extra):
    from fxqat.report_tasks import draw_tile

    proto = torch.zeros(1, 32, 16, 16) if task == "segment" else None
    (r,) = decode(task, torch.zeros(1, 4 + 10 + extra, 8), proto, 10, 64)
    assert len(r["cls"]) == 0
    img = torch.full((3, 64, 64), 0.5)
    im = draw_tile(task, img, r, NAMES, 2)
    assert im.shape == (128, 128, 3) and (im == 127).all()


def test_decode_segment_masks_stay_in_their_box():
    pred = torch.zeros(1, 4 + 10 + 32, 4)
    pred[0, :4, 0] = torch.tensor([24.0, 24.0, 16.0, 16.0])
    pred[0, 4, 0] = 0.9
    pred[0, 14, 0] = 5.0  # the first prototype's coefficient
    proto = torch.zeros(1, 32, 16, 16)
    proto[0, 0] = 1.0  # positive everywhere: the mask is the box
    (r,) = decode("segment", pred, proto, 10, 64)
    m = r["masks"][0]
    assert m.shape == (64, 64) and m[18:30, 18:30].all() and not m[40:].any() and not m[:, 40:].any()


def test_classify_grid_writes_fp32_and_int8_rows(tmp_path):
    """Two rows of labelled crops (tiny classify model, its FP32 and INT8 forms)."""
    import cv2

    import fxqat
    from fxqat.models import load_model

    torch.manual_seed(0)
    m = load_model("yolov8n-cls.yaml", nc=10).eval()
    x = torch.rand(3, 3, 32, 32)
    q = fxqat.prepare_qat(m)
    fxqat.calibrate(q, [x], progress=False)
    path = task_prediction_grid("classify", {"FP32": m, "INT8": fxqat.convert(q.eval())}, x, NAMES,
                                tmp_path / "p.png", truth=[0, 1, 2])
    im = cv2.imread(str(path))
    assert im.shape == (2 * (22 + 6 * 32), 3 * 6 * 32, 3)  # 2 rows (title band + tiles), crops enlarged 6 times


def test_openvino_predictor_keeps_the_task_and_every_output(tmp_path):
    """An OpenVINO folder of a segment model is evaluated as one (its metadata's task) with both outputs
    (predictions, prototypes), as the segment validator needs."""
    ov = pytest.importorskip("openvino")
    import yaml

    from fxqat.deploy import openvino_predictor

    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            return x.mean(1).flatten(1)[:, None], x[:, :2] * 2

    folder = tmp_path / "m_openvino_model"
    folder.mkdir()
    torch.onnx.export(TwoOutputs(), (torch.rand(1, 3, 8, 8),), tmp_path / "m.onnx", dynamo=False)
    ov.save_model(ov.convert_model(str(tmp_path / "m.onnx")), str(folder / "m.xml"))
    (folder / "metadata.yaml").write_text(yaml.safe_dump({"names": NAMES, "stride": 32, "task": "segment"}))
    pred = openvino_predictor(folder)
    assert pred.task == "segment"
    x = torch.rand(1, 3, 8, 8)
    y, proto = pred(x)
    torch.testing.assert_close(y, x.mean(1).flatten(1)[:, None])
    torch.testing.assert_close(proto, x[:, :2] * 2)


def _quick_demo(task, tmp_path, monkeypatch, capsys):
    import fxqat.zoo as zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tiny_record(tmp_path, task))
    assert main(["demo", "--quick", f"task={task}", f"project={tmp_path / 'demo'}"]) == 0
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    companion, main_metric = task_metrics(task)
    assert rep["task"] == task and rep["metrics"] == [companion, main_metric]
    rows = {r["model"]: r for r in rep["rows"]}
    assert list(rows) == ["FP32", "PTQ INT8", "QAT INT8", "QAT INT8 QDQ", "PTQ INT8 QDQ"]
    for r in rows.values():  # every form was evaluated by the task's validator and timed
        assert 0 <= r[main_metric] <= r[companion] <= 1 and r["latency_ms"] > 0 and r["size_mb"] > 0
    assert rows["QAT INT8"]["size_mb"] < 0.3 * rows["FP32"]["size_mb"]
    for f in ("report.md", "report.html", "qat_graph.svg", "predictions.png", "qat_int8.onnx"):
        assert (tmp_path / "demo" / f).exists(), f
    out = capsys.readouterr().out
    assert f"| model | runtime | {main_metric} | Δ vs FP32 | {companion} |" in out
    assert f"# fxqat demo task={task} (quick)" in (tmp_path / "demo" / "report.md").read_text()
    return rep


@pytest.mark.slow
def test_quick_demo_segment(tmp_path, monkeypatch, capsys):
    rep = _quick_demo("segment", tmp_path, monkeypatch, capsys)
    assert rep["model"] == "fxqat-signs-yolov8n-seg" and rep["imgsz"] == 64


@pytest.mark.slow
def test_quick_demo_classify(tmp_path, monkeypatch, capsys):
    import cv2

    rep = _quick_demo("classify", tmp_path, monkeypatch, capsys)
    assert rep["model"] == "fxqat-signs-yolov8n-cls" and rep["imgsz"] == 32 and rep["scene_imgsz"] == 64
    im = cv2.imread(str(tmp_path / "demo" / "predictions.png"))
    assert im.shape[1] == 8 * 6 * 32  # one crop of each of 8 classes, enlarged 6 times

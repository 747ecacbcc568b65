"""``fxqat data signs OUT task=...``: every task's labels from the same scenes, valid for Ultralytics' own label
checker and consistent with the detect boxes of the same scene."""

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fxqat.data.signs import CLASSES, generate

S = 128
TOL = 1.5 / S  # one pixel and a half: pixel areas vs contour points, 6-digit rounding


def _rows(root, split="train"):
    return {f.stem: [[float(v) for v in line.split()] for line in f.read_text().splitlines()]
            for f in sorted((root / "labels" / split).glob("*.txt"))}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {t: generate(root / t, train=12, val=2, imgsz=S, seed=3, task=t, progress=False).parent
            for t in ("detect", "segment", "pose", "obb")}


def _ultralytics_check(root, task):
    from ultralytics.data.utils import verify_image_label

    for f in sorted((root / "images" / "train").glob("*.png")):
        kpt = task == "pose"
        out = verify_image_label((str(f), str(root / "labels" / "train" / f"{f.stem}.txt"), "", kpt, len(CLASSES),
                                  4 if kpt else 0, 3 if kpt else 0, False))
        assert out[-1] == "" and out[8] == 0, out[-1]  # no message, not corrupt
        yield f.stem, out


def test_labels_are_valid_for_ultralytics_and_match_the_detect_boxes(datasets):
    det = _rows(datasets["detect"])
    assert sum(len(v) for v in det.values()) >= 12
    for task in ("segment", "pose", "obb"):
        root = datasets[task]
        assert (root / "images" / "train" / "000000.png").read_bytes() == \
            (datasets["detect"] / "images" / "train" / "000000.png").read_bytes()  # same scenes
        checked = dict(_ultralytics_check(root, task))
        rows = _rows(root)
        for stem, boxes in det.items():
            assert len(checked[stem][1]) == len(boxes) == len(rows[stem]), (task, stem)
            for box, row in zip(boxes, rows[stem]):
                assert row[0] == box[0]  # same class, same order
                x0, y0, x1, y1 = box[1] - box[3] / 2, box[2] - box[4] / 2, box[1] + box[3] / 2, box[2] + box[4] / 2
                if task == "segment":  # the visible polygon lies inside the box and spans most of it
                    p = np.array(row[1:]).reshape(-1, 2)
                    assert len(p) >= 3
                    assert p[:, 0].min() >= x0 - TOL and p[:, 0].max() <= x1 + TOL
                    assert p[:, 1].min() >= y0 - TOL and p[:, 1].max() <= y1 + TOL
                    # contour points are pixel centres: the outline spans one pixel less than the pixels do
                    span = (np.ptp(p[:, 0]) + 1 / S) * (np.ptp(p[:, 1]) + 1 / S)
                    assert span >= 0.3 * box[3] * box[4]
                elif task == "pose":  # the detect box, and the square's 4 corners around it
                    assert row[1:5] == box[1:]
                    k = np.array(row[5:]).reshape(4, 3)
                    assert set(k[:, 2]) <= {0, 1, 2}
                    assert (k[k[:, 2] == 0, :2] == 0).all()
                    if (k[:, 2] > 0).all():  # the sign is drawn inside its square: the corners hold the box
                        c = k[:, :2]
                        assert c[:, 0].min() <= x0 + TOL and c[:, 0].max() >= x1 - TOL
                        assert c[:, 1].min() <= y0 + TOL and c[:, 1].max() >= y1 - TOL
                        assert np.ptp(c[:, 0]) * np.ptp(c[:, 1]) <= 4 * (box[3] + TOL) * (box[4] + TOL)
                else:  # obb: the rotated box holds the silhouette, so its extent holds the detect box
                    c = np.array(row[1:]).reshape(4, 2)
                    assert c[:, 0].min() <= x0 + TOL and c[:, 0].max() >= x1 - TOL
                    assert c[:, 1].min() <= y0 + TOL and c[:, 1].max() >= y1 - TOL
                    e = np.linalg.norm(c[1] - c[0]) * np.linalg.norm(c[2] - c[1])
                    assert e <= 1.05 * box[3] * box[4] + 4 * TOL  # and is no larger than the axis-aligned box


def test_pose_and_obb_are_rotated_not_axis_aligned(datasets):
    angles = []
    for rows in _rows(datasets["obb"]).values():
        for r in rows:
            c = np.array(r[1:]).reshape(4, 2)
            angles.append(np.degrees(np.arctan2(c[1, 1] - c[0, 1], c[1, 0] - c[0, 0])))
    assert max(np.abs(angles)) > 5  # the signs' own ±15° rotation (plus perspective) shows in the boxes
    d = yaml.safe_load((datasets["pose"] / "data.yaml").read_text())
    assert d["kpt_shape"] == [4, 3] and d["flip_idx"] == [1, 0, 3, 2] and d["fxqat"]["task"] == "pose"


def test_classify_writes_crops_in_class_folders(tmp_path):
    from fxqat.data.signs import SignsConfig, make_scene

    out = generate(tmp_path / "cls", train=40, val=16, imgsz=S, seed=0, task="classify", progress=False,
                   min_size=0.2, max_size=0.4)
    assert out.is_dir() and sorted(p.name for p in (out / "train").iterdir()) == sorted(CLASSES)
    n = sum(len(make_scene(i, 0, "val", SignsConfig(imgsz=S, min_size=0.2, max_size=0.4))[1]) for i in range(16))
    crops = list((out / "val").rglob("*.png"))
    assert len(crops) == n  # one crop per labeled sign
    import cv2

    img = cv2.imread(str(crops[0]))
    assert img.shape[0] > 8 and abs(img.shape[0] - img.shape[1]) <= 0.5 * max(img.shape[:2])  # square unless clipped
    with pytest.raises(ValueError, match="generate more images"):
        generate(tmp_path / "few", train=1, val=1, imgsz=64, task="classify", progress=False)


@settings(max_examples=40, deadline=None)
@given(task=st.one_of(st.sampled_from(["detect", "segment", "pose", "obb", "classify"]), st.text(max_size=8)))
def test_cli_task_argument(task):
    from fxqat.cli import COMMANDS, UsageError, parse_args

    valid = task in ("detect", "segment", "pose", "obb", "classify")
    if valid:
        assert parse_args(["signs", "out", f"task={task}"], COMMANDS["data"], "data")["task"] == task
    else:
        with pytest.raises(UsageError, match="(?s)task=.*valid choices: detect, segment, pose, obb, classify"):
            parse_args(["signs", "out", f"task={task}"], COMMANDS["data"], "data")

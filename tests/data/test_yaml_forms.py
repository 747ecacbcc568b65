"""Ultralytics data YAML in all its forms, read by fxqat's one image reader exactly as Ultralytics' trainer reads it."""

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import fxqat
from fxqat.cli import main
from fxqat.data.images import image_files, iter_image_batches, read_data_yaml
from fxqat.errors import FxqatError

NAMES = ["a", "b"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A small dataset folder: images/train (4), images/val (2), images/extra (2), as PNGs."""
    import cv2
    import numpy as np

    root = tmp_path_factory.mktemp("ds")
    for split, n in (("train", 4), ("val", 2), ("extra", 2)):
        (root / "images" / split).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), np.full((40, 60, 3), 30 * i, np.uint8))
    return root


def _write(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def _ultralytics_files(data_yaml: Path, split: str) -> list[str]:
    from ultralytics.data.base import BaseDataset
    from ultralytics.data.utils import check_det_dataset

    d = check_det_dataset(str(data_yaml))
    return [str(Path(f).resolve()) for f in BaseDataset.get_img_files(type("D", (), {"prefix": "", "fraction": 1.0})(),
                                                                        d[split])]


def _forms(root: Path, tmp: Path) -> dict:
    (tmp / "lists").mkdir(exist_ok=True)
    (tmp / "lists" / "train.txt").write_text("".join(f"{root}/images/train/{i}.png\n" for i in range(4)))
    shutil.copytree(root / "images", tmp / "local" / "images", dirs_exist_ok=True)
    (tmp / "local" / "val.txt").write_text("./images/val/0.png\n./images/val/1.png\n")
    return {
        "folder, absolute path": {"path": str(root), "train": "images/train", "val": "images/val"},
        "txt list": {"path": str(tmp / "lists"), "train": "train.txt", "val": "train.txt"},
        "txt list with ./ entries, no path": {"train": "val.txt", "val": "val.txt"},
        "list of folders": {"path": str(root), "train": ["images/train", "images/extra"], "val": ["images/val"]},
        "relative path": {"path": os.path.relpath(root, Path.cwd()), "train": "images/train", "val": "images/val"},
    }


@pytest.mark.parametrize("form", ["folder, absolute path", "txt list", "txt list with ./ entries, no path",
                                  "list of folders", "relative path"])
def test_data_yaml_forms_match_ultralytics(form, images, tmp_path):
    d = _forms(images, tmp_path)[form]
    where = tmp_path / "local" if form.startswith("txt list with") else tmp_path
    data = _write(where / "data.yaml", {**d, "names": NAMES})
    for split in ("train", "val"):
        ours = [str(p.resolve()) for p in image_files(data, split)]
        assert ours == sorted(_ultralytics_files(data, split)) and ours
    assert read_data_yaml(data)["names"] == {0: "a", 1: "b"}


def test_calibration_and_analysis_read_a_txt_list(images, tmp_path):
    data = _write(tmp_path / "data.yaml", {**_forms(images, tmp_path)["txt list"], "names": NAMES})
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=2)
    fxqat.calibrate(gm, str(data), imgsz=64, batch=2, progress=False)
    assert all(bool(m.initialized) for m in gm.modules() if hasattr(m, "initialized"))
    assert [b.shape[0] for b in iter_image_batches(data, imgsz=64, batch=3, split="train")] == [3, 1]


@pytest.mark.parametrize("text, fragment", [
    ("path: .\ntrain: images\n", "no 'names'"),
    ("names: [a, b\ntrain: x\n", "line"),
    ("- just\n- a list\n", "mapping"),
    ("names: [a]\nnc: 2\n", "nc is 2"),
])
def test_bad_data_yaml_is_one_line_naming_the_file(tmp_path, capsys, text, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(FxqatError) as e:
        read_data_yaml(bad)
    assert str(bad) in str(e.value) and fragment in str(e.value)
    assert main(["eval", "yolov8n.yaml", f"data={bad}"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "Traceback" not in err


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("path: .\nnames:\n  0: a\n   1: b\n")
    with pytest.raises(FxqatError, match=r"bad.yaml: line [34]"):
        read_data_yaml(bad)


def test_unreadable_and_empty_images_are_skipped_with_a_warning(images, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(images / "images" / "val", folder)
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    batches = list(iter_image_batches(folder, imgsz=64, batch=8))
    assert [b.shape[0] for b in batches] == [2]
    err = capsys.readouterr().err
    assert "empty.png" in err and "garbage.jpg" in err and "skipping" in err


def test_calibration_refuses_nan_and_inf_naming_the_batch():
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=2)
    good = torch.rand(1, 3, 64, 64)
    bad = good.clone()
    bad[0, 1, 3, 3] = float("nan")
    with pytest.raises(FxqatError, match="batch 1 holds NaN/Inf"):
        fxqat.calibrate(gm, [good, bad], progress=False)
    inf = good.clone()
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(FxqatError, match="batch 0 holds NaN/Inf"):
        fxqat.calibrate(gm, [inf], progress=False)

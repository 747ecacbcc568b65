import numpy as np
import yaml

from fxqat.data.signs import CLASSES, make_image, render_sign


def test_ten_classes_render_distinct_signs():
    assert len(CLASSES) == 10
    imgs = [render_sign(c, 64) for c in range(10)]
    for img in imgs:
        assert img.shape == (64, 64, 4) and img[..., 3].max() == 255
    for i in range(10):
        for j in range(i + 1, 10):
            assert np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean() > 3, (CLASSES[i], CLASSES[j])


def test_deterministic_and_seeded():
    a, la = make_image(3, seed=7, split="train")
    b, lb = make_image(3, seed=7, split="train")
    c, _ = make_image(3, seed=8, split="train")
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, c)


def test_labels_valid_and_varied():
    sizes, counts = [], []
    for i in range(60):
        img, labels = make_image(i, seed=0, split="train")
        assert img.dtype == np.uint8 and img.shape == (320, 320, 3)
        counts.append(len(labels))
        for cls, x, y, w, h in labels:
            assert 0 <= cls < 10 and 0 < w <= 1 and 0 < h <= 1
            assert 0 <= x - w / 2 + 1e-6 and x + w / 2 <= 1 + 1e-6 and 0 <= y - h / 2 + 1e-6 and y + h / 2 <= 1 + 1e-6
            sizes.append(max(w, h))
    assert min(sizes) < 0.06 and max(sizes) > 0.3  # small and large signs
    assert max(counts) >= 4 and sum(counts) / len(counts) > 1.5  # several signs per image


def test_generate_writes_ultralytics_layout(tiny_data):
    d = yaml.safe_load(tiny_data.read_text())
    root = tiny_data.parent
    assert d["nc"] == 10 and d["names"][0] == "stop"
    assert len(list((root / "images" / "train").glob("*.png"))) == 16
    assert len(list((root / "labels" / "val").glob("*.txt"))) == 8


def test_size_range_changes_the_signs(tmp_path):
    import pytest

    from fxqat.data.signs import generate

    path = generate(tmp_path / "big", train=12, val=2, imgsz=128, min_size=0.3, max_size=0.4, progress=False)
    sizes = [max(float(v) for v in line.split()[3:5])
             for f in (path.parent / "labels" / "train").glob("*.txt") for line in f.read_text().splitlines()]
    assert sizes and min(sizes) > 0.2  # warped and rotated: a little under min_size at most
    assert yaml.safe_load(path.read_text())["fxqat"]["min_size"] == 0.3
    with pytest.raises(ValueError, match="min_size"):
        generate(tmp_path / "bad", train=1, val=1, imgsz=128, min_size=0.5, max_size=0.4, progress=False)

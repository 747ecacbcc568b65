"""fxqat.analysis.bootstrap: per-image validation statistics, the paired bootstrap of an mAP difference, and the two
reports that use it (``benchmarks.accuracy --bootstrap``, ``fxqat eval ... interval=``)."""

import numpy as np
import pytest

from fxqat.analysis.bootstrap import Ranked, paired_delta
from fxqat.evaluate import evaluate


@pytest.fixture(scope="module")
def shipped_images(tiny_data):
    images = []
    r = evaluate("fxqat-signs-yolov8n", tiny_data, imgsz=128, batch=4, images=images)
    return r, images


def test_per_image_statistics_rebuild_the_validators_map(shipped_images):
    r, images = shipped_images
    assert len(images) == 8 and {"tp", "conf", "pred_cls", "target_cls"} <= set(images[0])
    assert r["mAP50-95"] > 0.05  # the shipped detector finds the signs: a real figure, not 0 == 0
    assert Ranked(images).map50_95() == pytest.approx(r["mAP50-95"], abs=1e-9)
    # an image drawn twice counts twice: the same as the list holding it twice
    w = np.ones(len(images))
    w[0], w[1] = 2, 0
    twice = Ranked([images[0], *images[2:], images[0]])
    assert Ranked(images).map50_95(w) == pytest.approx(twice.map50_95(), abs=0.02)


def test_a_model_against_itself_differs_by_nothing(shipped_images):
    _, images = shipped_images
    ci = paired_delta(images, images, n=50)
    assert ci["delta_pt"] == ci["lo_pt"] == ci["hi_pt"] == ci["se_pt"] == 0.0


def _worse(images, drop: int):
    """The same detections with the ``drop`` most confident true positives of each image made false."""
    out = []
    for im in images:
        tp = im["tp"].copy()
        hits = np.flatnonzero(tp[:, 0])
        tp[hits[np.argsort(-im["conf"][hits])][:drop]] = False
        out.append(dict(im, tp=tp))
    return out


def test_the_interval_brackets_a_real_loss_and_narrows_with_more_images(shipped_images):
    _, images = shipped_images
    worse = _worse(images, 1)
    small = paired_delta(images, worse, n=300, seed=1)
    assert small["delta_pt"] < -1.0  # a lost true positive per image costs points
    assert small["lo_pt"] <= small["delta_pt"] <= small["hi_pt"] and small["hi_pt"] < 0
    big = paired_delta(images * 4, worse * 4, n=300, seed=1)  # the same images, 4x as many: SE halves
    assert big["delta_pt"] == pytest.approx(small["delta_pt"], abs=1e-9)
    assert 0.35 < big["se_pt"] / small["se_pt"] < 0.7


def test_unpaired_inputs_are_refused(shipped_images):
    _, images = shipped_images
    with pytest.raises(ValueError, match="same images for every model"):
        paired_delta(images, images[:-1])


def test_classify_has_no_per_image_statistics(capsys):
    from benchmarks.accuracy import main

    with pytest.raises(SystemExit):
        main(["--fp32", "yolov8n-cls.yaml", "--data", "missing.yaml", "--bootstrap", "10"])
    assert "--bootstrap: per-image statistics exist for detect, obb, segment, pose models, not classify" in \
        capsys.readouterr().err


def test_accuracy_benchmark_reports_each_rows_interval(tiny_data, tiny_qat_run, monkeypatch, capsys, tmp_path):
    """``benchmarks.accuracy --bootstrap``: every fxqat row gets its difference to FP32 with an interval; a QAT
    checkpoint far worse than the FP32 detector (two epochs from random weights) lies below 0 with all of it."""
    import benchmarks.accuracy as acc

    saved = {}
    monkeypatch.setattr(acc, "train_qat", lambda *a, **k: (None, tiny_qat_run[1]))
    monkeypatch.setattr(acc, "save", lambda name, rows, extra=None: saved.update(rows=rows) or tmp_path / "r.json")
    acc.main(["--fp32", "fxqat-signs-yolov8n", "--data", str(tiny_data), "--imgsz", "128", "--batch", "4",
              "--calib", "1", "--skip-ort", "--skip-ultralytics", "--bootstrap", "40", "--project", str(tmp_path)])
    out = capsys.readouterr().out
    assert "paired bootstrap over the 8 validation images (40 resamples)" in out
    rows = {r["method"]: r for r in saved["rows"]}
    assert "delta_ci_pt" not in rows["FP32"]
    qat = [r for name, r in rows.items() if name.startswith("fxqat QAT")]
    assert len(qat) == 3 and all("delta_ci_pt" in r for r in rows.values() if r["method"] != "FP32")
    for r in qat:
        lo, hi = r["delta_ci_pt"]
        assert lo <= r["delta_pt"] <= hi < 0 and r["delta_se_pt"] > 0


def test_eval_command_reports_each_forms_interval(tiny_qat_run, tiny_data, tmp_path, capsys):
    """``fxqat eval CKPT fp32=... interval=N``: each form's difference to the FP32 row with its interval, in the
    table and the JSON; a checkpoint far worse than the shipped detector lies below 0 with all of its interval."""
    from fxqat.cli import main

    _, best = tiny_qat_run
    out = tmp_path / "r.json"
    assert main(["eval", str(best), f"data={tiny_data}", "fp32=fxqat-signs-yolov8n", "imgsz=128", "batch=4",
                 "onnx=false", "interval=40", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert "Δ mAP50-95 pt" in text and "on the same 8 validation images" in text and "40 resamples" in text
    import json

    rows = {r["model"]: r for r in json.loads(out.read_text())}
    assert "95 % interval" not in rows["FP32"]
    for form in ("QAT fake-quant", "INT8 torch"):
        lo, hi = (float(v) for v in rows[form]["95 % interval"].split(" to "))
        assert lo <= float(rows[form]["Δ mAP50-95 pt"]) <= hi < 0


def test_eval_interval_needs_fp32_and_a_detection_style_task(tiny_data, capsys):
    from fxqat.cli import main

    assert main(["eval", "yolov8n.yaml", f"data={tiny_data}", "interval=10"]) != 0
    assert "interval=: the differences are to the FP32 model: give fp32=PATH.pt too" in capsys.readouterr().err
    assert main(["eval", "yolov8n.yaml", f"data={tiny_data}", "interval=-1"]) == 2
    assert "interval" in capsys.readouterr().err
    assert main(["eval", "yolov8n-cls.yaml", f"data={tiny_data}", "fp32=yolov8n-cls.yaml", "interval=10"]) != 0
    assert "interval=: per-image statistics exist for detect, obb, segment, pose models, not classify" in \
        capsys.readouterr().err

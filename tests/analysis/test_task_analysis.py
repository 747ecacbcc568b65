"""``fxqat analyze`` on segment / pose / OBB models: the task's own head outputs are measured too."""

import math

import pytest

import fxqat
from fxqat.models import load_model

from ..conftest_helpers import signs_like_images

CASES = [("yolov8n-pose.yaml", "pose.kpt_last", "pose.kpt"),
         pytest.param("yolov8n-seg.yaml", "segment.proto_last", "segment.proto", marks=pytest.mark.slow),
         pytest.param("yolov8n-obb.yaml", "obb.angle_last", "obb.angle", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,output,branch", CASES)
def test_analyze_measures_the_task_outputs(name, output, branch):
    from ..conftest_helpers import liven

    # livened BN statistics: at random init the stride-32 keypoint branch's outputs are degenerate (its error is 0)
    rep = fxqat.analyze(liven(load_model(name, nc=3)), signs_like_images(2, 64), imgsz=64, images=2, progress=False)
    outs = rep.summary["outputs_sqnr_db"]
    assert set(outs) >= {"detect", output} and all(math.isfinite(v) for v in outs.values())
    # the task branch's convs reach only the task's outputs: measured only there, their error is not zero
    rows = [r for r in rep.layers if r["role"].startswith(branch)]
    assert rows and all(r["alone_nsr"] > 0 for r in rows)
    assert "head outputs, all quantized: detect" in rep.table()


def test_analyze_a_classifier_measures_its_logits():
    from ..conftest_helpers import liven

    rep = fxqat.analyze(liven(load_model("yolov8n-cls.yaml", nc=3)), signs_like_images(2, 64), imgsz=64, images=2,
                        progress=False)
    assert list(rep.summary["outputs_sqnr_db"]) == ["classify.linear"]  # no Detect outputs in a classifier
    assert rep.summary["head_sqnr_db"] == rep.summary["outputs_sqnr_db"]["classify.linear"]
    rows = {r["role"]: r for r in rep.layers}
    assert rows["classify.linear"]["alone_nsr"] > 0 and rows["classify.conv"]["alone_nsr"] > 0

"""The real ``fxqat qat`` under DDP: 2 gloo ranks on the CPU (the CLI's own launcher) vs 1 rank, same global batch.

Slow (two QAT jobs, each process importing torch and Ultralytics): a few minutes on 2 idle cores (6 under load)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

MAP = "metrics/mAP50-95(B)"


def _qat(data, project, name, extra, env=None):
    cmd = [sys.executable, "-m", "fxqat.cli", "qat", "fxqat-signs-yolov8n", f"data={data}", "epochs=1", "imgsz=192",
           "batch=8", "workers=0", f"project={project}", f"name={name}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "YOLO_OFFLINE": "1", **(env or {})},
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _qat_resume(path):
    cmd = [sys.executable, "-m", "fxqat.cli", "qat", f"resume={path}", "device=cpu", "nproc=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "YOLO_OFFLINE": "1"}, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def signs32(tmp_path_factory):
    from fxqat.data.signs import generate

    # the shipped model's data settings: a trained start, so the mAP comparisons below compare real numbers
    return generate(tmp_path_factory.mktemp("signs32"), train=32, val=16, imgsz=192, seed=0, progress=False,
                    min_size=0.12)


def test_two_gloo_ranks_train_like_one(signs32, tmp_path):
    from fxqat.checkpoint import load_checkpoint

    dump = tmp_path / "dump"
    log = _qat(signs32, tmp_path, "r2", ["device=cpu", "nproc=2"], env={"FXQAT_DDP_DUMP": str(dump)})
    assert "DDP: world size 2 (gloo, cpu)" in log
    assert "DDP: all 2 ranks end with identical weights and quantizer state" in log
    a, b = (torch.load(dump / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys() and sum(k.endswith(".scale") for k in a) > 100
    for k in a:
        assert torch.equal(a[k], b[k]), k  # tolerance: exact (DDP averages gradients, the sync reduces the ranges)
    # only rank 0 writes checkpoints, and its best.pt loads
    best = tmp_path / "r2" / "weights" / "best.pt"
    gm, ck = load_checkpoint(best, with_extra=True)
    assert ck["epoch"] in (-1, 0) and "optimizer" in ck  # -1: the PTQ start (epoch 0) stayed best
    # its mAP (validated during the DDP run by rank 0 alone) is what fxqat eval reports for it
    out = tmp_path / "eval.json"
    from fxqat.cli import main

    assert main(["eval", str(best), f"data={signs32}", "imgsz=192", "batch=8", "onnx=false", f"out={out}"]) == 0
    row = json.loads(out.read_text())[0]
    assert row["mAP50-95"] > 0.2
    # resume under DDP: the interrupted run's last.pt (here: the finished 1-epoch run re-labelled as 2 epochs) trains
    # its second epoch on 2 ranks, in the same run folder
    from fxqat.checkpoint import save_checkpoint

    gm_last, last = load_checkpoint(tmp_path / "r2" / "weights" / "last.pt", with_extra=True)
    keep = ("epoch", "best_fitness", "updates", "optimizer", "ema", "train_args", "metrics")
    resume = tmp_path / "r2b" / "weights" / "last.pt"
    save_checkpoint(resume, gm_last, **{k: last[k] for k in keep},
                    run_args=dict(last["run_args"], epochs=2, name="r2b"))
    log = _qat_resume(resume)
    assert "DDP: world size 2 (gloo, cpu)" in log and "DDP: all 2 ranks end with identical" in log
    _, resumed = load_checkpoint(resume, with_extra=True)
    assert resumed["epoch"] == 1 and resumed["updates"] > last["updates"]
    # the same job on one rank with the same global batch (8 = 2 x 4) ends within noise of it
    _qat(signs32, tmp_path, "r1", ["device=cpu"])
    _, ck1 = load_checkpoint(tmp_path / "r1" / "weights" / "best.pt", with_extra=True)
    # tolerance 0.05 mAP50-95: BN batch statistics (4 vs 8 images) and augmentation draws differ between the jobs
    assert abs(ck1["metrics"][MAP] - ck["metrics"][MAP]) <= 0.05
    assert Path(best).parent.parent.joinpath("results.csv").exists()
    # rank 0 validated as fxqat eval validates (same imgsz and batch): the same computation, tolerance 1e-12
    assert row["mAP50-95"] == pytest.approx(ck["metrics"][MAP], abs=1e-12)

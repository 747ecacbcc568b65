"""QAT never ends below its PTQ start: the PTQ-initialized model is validated as epoch 0 and competes for best.pt."""

import torch

from fxqat.checkpoint import load_checkpoint

MAP = "metrics/mAP50-95(B)"


def test_ptq_start_stays_best_when_qat_does_worse(tmp_path):
    from fxqat.data.signs import generate
    from fxqat.training import train_qat

    # the shipped model's data settings (a trained start); a learning rate 1000x the default wrecks one QAT epoch
    data = generate(tmp_path / "d", train=16, val=16, imgsz=192, seed=0, min_size=0.12, progress=False)
    trainer, best = train_qat("fxqat-signs-yolov8n", data, epochs=1, imgsz=192, batch=8, project=str(tmp_path),
                              name="q", workers=0, calib_batches=1, lr0=0.1, verbose=False)
    gm, ck = load_checkpoint(best, with_extra=True)
    _, last = load_checkpoint(best.with_name("last.pt"), with_extra=True)
    assert last["epoch"] == 0 and last["metrics"][MAP] < ck["metrics"][MAP]  # the QAT epoch did worse ...
    assert ck["epoch"] == -1 and ck["metrics"][MAP] > 0.3  # ... so best.pt is the PTQ start (epoch 0)
    assert ck["best_fitness"] == last["best_fitness"]
    # and it is the PTQ start's weights, not the wrecked ones
    start = dict(gm.named_parameters())
    moved = [k for k, v in last["state_dict"].items() if k in start and not torch.equal(v, start[k])]
    assert moved


def test_ptq_epoch0_false_skips_the_start_validation(tiny_qat_run):
    trainer, best = tiny_qat_run  # ptq_epoch0=False in the fixture: best.pt comes from a QAT epoch
    _, ck = load_checkpoint(best, with_extra=True)
    assert ck["epoch"] >= 0

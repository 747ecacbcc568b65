"""train_qat(dampen=...): the dampening term is in the loss the trainer backpropagates, the run records it, and a
resume restores it (fxqat.quant.oscillation holds the term itself, tests/quant/test_oscillation.py its numbers)."""

import pytest
import torch

from .conftest_helpers import interrupted_after_first_epoch


def _recording(real, seen: list):
    """A ``_trainer_cls`` stand-in whose trainer records, per batch, the loss it backpropagated, the task loss
    (Ultralytics' loss items times the batch) and the dampening term it added."""
    def trainer_cls(task="detect"):
        class Recording(real(task)):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.add_callback("on_train_batch_end", Recording._record)

            @staticmethod
            def _record(t):
                d = t.dampening
                seen.append(dict(epoch=t.epoch, loss=float(t.loss.detach()), weight=None if d is None else d.weight,
                                 task=float(sum(t.loss_items.values())) * t.batch_size,
                                 term=None if d is None else d.last,
                                 tracked=None if t.freezer is None else len(t.freezer.state),
                                 threshold=None if t.freezer is None else t.freezer.threshold))

        return Recording

    return trainer_cls


@pytest.fixture(scope="module")
def interrupted(tiny_data, tmp_path_factory):
    """A W4A8 QAT run with dampen=0.5 and freeze_osc=0.5, an optimizer step per batch (nbs=8), interrupted once
    epoch 1 of 2 is saved: (last.pt, per-batch records)."""
    import fxqat.training as T

    real, seen, out = T._trainer_cls, [], tmp_path_factory.mktemp("osc")
    T._trainer_cls = interrupted_after_first_epoch(lambda task: _recording(real, seen)(task))
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train_qat("yolov8n.yaml", tiny_data, qconfig="w4a8", dampen=0.5, freeze_osc=0.5, nbs=8, epochs=2, imgsz=64,
                        batch=8, project=str(out), name="run", workers=0, calib_batches=1, verbose=False, ptq_epoch0=False)
    finally:
        T._trainer_cls = real
    return out / "run" / "weights" / "last.pt", seen


def test_freezing_tracks_every_quantized_conv_after_each_optimizer_step(interrupted):
    from fxqat.checkpoint import load_checkpoint
    from fxqat.quant.oscillation import quantized_convs

    last, seen = interrupted
    assert torch.load(last, weights_only=True)["run_args"]["freeze_osc"] == 0.5
    units = len(quantized_convs(load_checkpoint(last)))
    assert units > 50 and [r["tracked"] for r in seen] == [units, units]  # the step hook ran on every unit


def test_dampen_is_in_the_trained_loss_and_recorded(interrupted):
    from fxqat.errors import FxqatError
    from fxqat.training import train_qat

    last, seen = interrupted
    assert torch.load(last, weights_only=True)["run_args"]["dampen"] == 0.5
    assert [r["epoch"] for r in seen] == [0, 0]  # 16 images, batch 8
    first, second = seen
    d0, lam0 = first["term"]
    assert lam0 == 0.0 and first["loss"] == pytest.approx(first["task"], rel=1e-4)  # cosine ramp starts at 0
    d1, lam1 = second["term"]
    assert d1 > 100 and lam1 == pytest.approx(0.5 * 0.5 * (1 - 2 ** -0.5), rel=1e-6)  # progress 1/4 of 2 epochs
    assert second["loss"] - second["task"] == pytest.approx(lam1 * d1 * 8, rel=1e-3)  # the term, times the batch
    assert second["loss"] - second["task"] > 0.05 * second["task"]  # not negligible here: the test sees it
    with pytest.raises(FxqatError, match="dampen=0.1 conflicts with the checkpoint's dampen=0.5"):
        train_qat(resume=str(last), dampen=0.1)
    with pytest.raises(FxqatError, match="freeze_osc=0.2 conflicts with the checkpoint's freeze_osc=0.5"):
        train_qat(resume=str(last), freeze_osc=0.2)


@pytest.mark.slow
def test_resume_restores_dampen(interrupted, monkeypatch):
    import fxqat.training as T

    last, _ = interrupted
    seen: list = []
    monkeypatch.setattr(T, "_trainer_cls", _recording(T._trainer_cls, seen))
    T.train_qat(resume=str(last), workers=0)  # dampen not given: the checkpoint's 0.5
    assert [r["epoch"] for r in seen] == [1, 1] and all(r["weight"] == 0.5 and r["threshold"] == 0.5 for r in seen)
    assert all(r["loss"] - r["task"] == pytest.approx(r["term"][1] * r["term"][0] * 8, rel=1e-3) for r in seen)
    assert seen[-1]["term"][1] == pytest.approx(0.5 * 0.5 * (1 + 2 ** -0.5), rel=1e-6)  # progress 3/4


def test_bad_dampen_values_are_refused_before_any_work(tiny_data, tmp_path):
    from fxqat.errors import FxqatError
    from fxqat.training import train_qat

    for bad in (-0.1, float("nan"), 11.0, "x"):
        with pytest.raises(FxqatError, match="from 0 \\(off\\) to 10"):
            train_qat("yolov8n.yaml", tiny_data, dampen=bad, epochs=1, imgsz=64, project=str(tmp_path))
    for bad in (0, 1, -0.5, "x"):
        with pytest.raises(FxqatError, match="freeze_osc=.*between 0 and 1"):
            train_qat("yolov8n.yaml", tiny_data, freeze_osc=bad, epochs=1, imgsz=64, project=str(tmp_path))


def test_fxqat_qat_passes_dampen_and_freeze_osc_and_refuses_bad_values(monkeypatch, capsys):
    import fxqat.training as T
    from fxqat.cli import main

    seen = {}
    monkeypatch.setattr(T, "train_qat", lambda model, data, **kw: (seen.update(kw), (None, "best.pt"))[1])
    assert main(["qat", "yolov8n.yaml", "data=d.yaml", "dampen=1e-3", "freeze_osc=0.02"]) == 0
    assert seen["dampen"] == 0.001 and seen["freeze_osc"] == 0.02
    seen.clear()
    assert main(["qat", "yolov8n.yaml", "data=d.yaml"]) == 0
    assert seen["dampen"] is None and seen["freeze_osc"] is None  # not given: the default (off) or the resumed run's
    capsys.readouterr()
    for arg, bad in (("dampen", "-1"), ("dampen", "nan"), ("dampen", "11"), ("dampen", "lots"), ("freeze_osc", "0"),
                     ("freeze_osc", "1.5"), ("freeze_osc", "x")):
        assert main(["qat", "yolov8n.yaml", "data=d.yaml", f"{arg}={bad}"]) == 2
        err = capsys.readouterr().err
        assert f"{arg}=" in err and len(err.strip().splitlines()) == 1, err

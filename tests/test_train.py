import os
from pathlib import Path

import pytest
import torch

import fxqat
from fxqat.checkpoint import load_checkpoint, save_checkpoint
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import signs_like_images

QCONFIGS = Path(__file__).parents[1] / "fxqat" / "qconfigs"


def test_qat_through_ultralytics_trainer(tiny_qat_run):
    trainer, best = tiny_qat_run
    assert best.exists()
    assert "metrics/mAP50-95(B)" in trainer.metrics
    gm = load_checkpoint(best)
    fqs = [m for m in gm.modules() if isinstance(m, FakeQuant)]
    assert fqs and all(bool(m.initialized) for m in fqs)
    # EMA model carries the live model's quantizer state (copied, not averaged)
    live = dict(trainer.model.gm.named_modules())
    for name, m in trainer.ema.ema.gm.named_modules():
        if isinstance(m, FakeQuant):
            assert torch.equal(m.zero_point, live[name].zero_point)
    # the freeze schedule ran: BN frozen from epoch 1 of 2, observers frozen in the last epoch
    convs = [m for m in trainer.model.gm.modules() if hasattr(m, "bn_frozen") and m.bn is not None]
    assert all(m.bn_frozen for m in convs)
    live_fqs = [m for m in trainer.model.gm.modules() if isinstance(m, FakeQuant)]
    assert not any(m.observe_enabled for m in live_fqs)


def test_checkpoint_is_weights_only_and_complete(tiny_qat_run):
    _, best = tiny_qat_run
    ck = torch.load(best, map_location="cpu", weights_only=True)  # no pickled classes needed
    assert ck["fxqat"] == 2 and "qconfig" in ck and "state_dict" in ck and len(ck["digest"]) == 64
    assert ck["prepare_args"] == {"leaf_modules": [], "nc": 10}
    assert {"data", "epochs", "imgsz", "batch", "project", "name", "freeze_bn_epoch"} <= set(ck["run_args"])
    assert any(k.endswith("zero_point") for k in ck["state_dict"])
    assert any(k.endswith("observer.min_val") for k in ck["state_dict"])


def _batch():
    sizes = [0.1, 0.3, 0.6]
    return {"batch_idx": torch.tensor([float(i) for i in range(2) for _ in sizes]),
            "cls": torch.tensor([[float(k)] for _ in range(2) for k in range(3)]),
            "bboxes": torch.tensor([[0.5, 0.5, s, s] for _ in range(2) for s in sizes])}


def _step(gm, crit, opt, imgs, batch):
    opt.zero_grad()
    loss, _ = crit(gm(imgs), batch)
    loss.sum().backward()
    opt.step()
    return float(loss.sum().detach())


def test_resume_gives_identical_next_step_loss(tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    from fxqat.models import load_model

    torch.manual_seed(0)
    det = load_model("yolov8n.yaml", nc=10)
    det.args = get_cfg()
    crit = v8DetectionLoss(det)
    imgs, batch = signs_like_images(2, 128, seed=1), _batch()
    gm = fxqat.prepare_qat(det, example_inputs=(imgs,))
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        _step(gm, crit, opt, imgs, batch)
    fxqat.freeze_bn(gm)
    path = save_checkpoint(tmp_path / "last.pt", gm, optimizer=opt.state_dict(), epoch=1)
    expected = _step(gm, crit, opt, imgs, batch)

    gm2, ck = load_checkpoint(path, with_extra=True)
    gm2.train()
    opt2 = torch.optim.SGD(gm2.parameters(), lr=0.01, momentum=0.9)
    opt2.load_state_dict(ck["optimizer"])
    assert all(m.bn_frozen for m in gm2.modules() if hasattr(m, "bn_frozen"))
    assert _step(gm2, crit, opt2, imgs, batch) == expected  # tolerance: exact (same ops, same state)


def test_atomic_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=10)
    path = save_checkpoint(tmp_path / "last.pt", gm, epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, gm, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert os.access(path, os.R_OK)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(fxqat.ModelLoadError, match="not an fxqat QAT checkpoint"):
        load_checkpoint(bad)


def _csv_epochs(path):
    lines = path.read_text().strip().splitlines()
    return [int(float(line.split(",")[0])) for line in lines[1:]]


def test_resume_after_interrupt_keeps_every_argument_and_both_epochs_rows(tiny_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C right after epoch 1 of 2 is saved (a real interruption point), then ``fxqat qat resume=last.pt``."""
    import shutil

    import fxqat.training as T
    from fxqat.cli import main
    from fxqat.errors import FxqatError

    data = tmp_path / "data.yaml"  # a private copy (absolute path:), so the class-count check can edit it
    shutil.copy(tiny_data, data)
    from .conftest_helpers import interrupted_after_first_epoch

    real = T._trainer_cls
    monkeypatch.setattr(T, "_trainer_cls", interrupted_after_first_epoch(real))
    with pytest.raises(KeyboardInterrupt):
        T.train_qat("yolov8n.yaml", str(data), epochs=2, imgsz=128, batch=8, project=str(tmp_path / "runs"),
                    name="run", workers=0, calib_batches=1, verbose=False, freeze_bn_epoch=1)
    monkeypatch.setattr(T, "_trainer_cls", real)
    run = tmp_path / "runs" / "run"
    last = run / "weights" / "last.pt"
    assert _csv_epochs(run / "results.csv") == [1]

    # an explicit argument that differs from the checkpoint's is an error naming it and both values
    for kw, fragment in (({"imgsz": 160}, "imgsz=160 conflicts with the checkpoint's imgsz=128"),
                         ({"epochs": 5}, "epochs=5 conflicts with the checkpoint's epochs=2"),
                         ({"data": str(tiny_data)}, "data="),
                         ({"lr0": 0.01}, "lr0=0.01"),
                         ({"qconfig": str(QCONFIGS / "mixed_w4.yaml")}, "differs from the checkpoint's qconfig")):
        with pytest.raises(FxqatError, match=fragment):
            T.train_qat(resume=str(last), **kw)
    # data whose class count no longer matches the checkpoint's is refused
    text = data.read_text()
    import yaml

    d = yaml.safe_load(text)
    names = list(d["names"].values() if isinstance(d["names"], dict) else d["names"])
    data.write_text(yaml.safe_dump({**d, "names": names[:3], "nc": 3}))
    with pytest.raises(FxqatError, match="has 3 classes but the checkpoint has 10"):
        T.train_qat(resume=str(last))
    data.write_text(text)

    seen = {}
    real_init = real()
    monkeypatch.setattr(T, "_trainer_cls", lambda task="detect": type("Spy", (real_init,), {
        "_setup_train": lambda self: (real_init._setup_train(self), seen.update(start=self.start_epoch))[0]}))
    assert main(["qat", f"resume={last}", "workers=0"]) == 0
    assert seen["start"] == 1  # epoch 2 of 2 ran, epoch 1 was not repeated
    assert _csv_epochs(run / "results.csv") == [1, 2]  # same run folder, earlier row kept
    ck = torch.load(last, weights_only=True)
    assert ck["epoch"] == 1
    assert {k: ck["train_args"][k] for k in ("imgsz", "batch", "epochs", "data")} == \
        {"imgsz": 128, "batch": 8, "epochs": 2, "data": str(data)}
    assert ck["run_args"]["freeze_bn_epoch"] == 1 and ck["run_args"]["name"] == "run"


def test_resume_of_a_finished_run_is_refused(tiny_qat_run):
    trainer, _ = tiny_qat_run
    from fxqat.errors import FxqatError
    from fxqat.training import train_qat

    with pytest.raises(FxqatError, match="already finished its 2 epochs"):
        train_qat(resume=str(trainer.last))


def test_learned_scales_leave_the_weight_decay_group():
    import torch

    import fxqat
    from fxqat.quant.fake_quant import FakeQuant
    from fxqat.training import scales_without_decay

    gm = fxqat.prepare_qat("yolov8n.yaml", {"version": 1, "weight": {"learnable": True}}, nc=10)
    scales = [m.scale for m in gm.modules() if isinstance(m, FakeQuant) and m.spec.learnable]
    assert len(scales) == 63
    weights = [p for n, p in gm.named_parameters() if n.endswith("conv.weight")]
    opt = torch.optim.SGD([{"params": weights + scales, "weight_decay": 5e-4}], lr=0.1)
    scales_without_decay(opt, gm)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not decayed & {id(s) for s in scales} and {id(w) for w in weights} <= decayed
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] == 0) == 63


def test_fxqat_train_stays_the_function_after_the_module_is_imported():
    import subprocess
    import sys

    code = ("import fxqat, fxqat.training, fxqat.commands; from fxqat.training import train_qat; "
            "assert callable(fxqat.train) and fxqat.train is fxqat.training.train, fxqat.train; "
            "assert callable(fxqat.train) and callable(fxqat.deploy.as_yolo) and callable(fxqat.checkpoint.load_checkpoint)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]


def test_train_fp32_starts_from_pretrained(tiny_data, tmp_path, monkeypatch, capsys):
    """pretrained= reaches the model Ultralytics' trainer trains: the detector's backbone and box branch in a segment
    model, its mask branch left as built; nothing matching is refused before any training."""
    from ultralytics.engine.trainer import BaseTrainer

    from fxqat.errors import FxqatError
    from fxqat.models import load_model
    from fxqat.training_fp32 import train_fp32

    class Started(Exception):
        pass

    seen = {}

    def capture(self):
        seen["model"] = self.model
        raise Started

    monkeypatch.setattr(BaseTrainer, "train", capture)
    src = load_model("yolov8n.yaml", nc=10)
    with torch.no_grad():
        for p in src.parameters():
            p.uniform_(-1, 1)  # weights no fresh model has
    with pytest.raises(Started):
        train_fp32("yolov8n-seg.yaml", str(tiny_data), epochs=1, imgsz=64, project=str(tmp_path), pretrained=src)
    trained = seen["model"].state_dict()
    theirs = src.state_dict()
    assert torch.equal(trained["model.0.conv.weight"], theirs["model.0.conv.weight"])  # backbone
    assert torch.equal(trained["model.22.cv2.0.0.conv.weight"], theirs["model.22.cv2.0.0.conv.weight"])  # box branch
    assert trained["model.22.cv4.0.0.conv.weight"].abs().max() < 1  # the mask branch: as Ultralytics builds it
    assert "pretrained: " in capsys.readouterr().out
    import fxqat.models as M

    monkeypatch.setattr(M, "load_model", lambda spec, **kw: torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(FxqatError, match="no tensor matches"):
        train_fp32("yolov8n-seg.yaml", str(tiny_data), epochs=1, imgsz=64, project=str(tmp_path), pretrained="x.pt")

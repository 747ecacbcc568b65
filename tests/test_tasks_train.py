"""QAT of segment / pose / OBB models through the task's own Ultralytics trainer (loss, augmentation, validator),
checkpoints that rebuild the task's model, and ``fxqat eval`` with the task's validator metrics."""

import pytest
import torch

from fxqat.checkpoint import load_checkpoint
from fxqat.errors import FxqatError
from fxqat.tasks import TASKS

MODELS = {"segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml", "obb": "yolov8n-obb.yaml"}
LOSSES = {"segment": "v8SegmentationLoss", "pose": "v8PoseLoss", "obb": "v8OBBLoss"}
VALIDATORS = {"segment": "SegmentationValidator", "pose": "PoseValidator", "obb": "OBBValidator"}


@pytest.fixture(scope="module", params=[pytest.param("segment"), pytest.param("pose", marks=pytest.mark.slow),
                                        pytest.param("obb", marks=pytest.mark.slow)])
def task_run(request, tmp_path_factory):
    """One QAT epoch on a tiny generated dataset of the task: (task, data, trainer, best checkpoint)."""
    from fxqat.data.signs import generate
    from fxqat.training import train_qat

    task = request.param
    root = tmp_path_factory.mktemp(task)
    data = generate(root / "data", train=8, val=4, imgsz=64, seed=1, task=task, progress=False)
    trainer, best = train_qat(MODELS[task], data, epochs=1, imgsz=64, batch=4, project=str(root / "runs"),
                              name="qat", workers=0, calib_batches=1, verbose=False)
    return task, data, trainer, best


def test_task_qat_uses_the_task_trainer_and_checkpoint_rebuilds(task_run):
    task, data, trainer, best = task_run
    assert type(trainer).__mro__[1].__name__ == TASKS[task].trainer.split(":")[1]
    assert type(trainer.model.criterion).__name__ == LOSSES[task]  # the task's loss ran on the QAT graph
    assert type(trainer.validator).__name__ == VALIDATORS[task]
    assert set(dict(TASKS[task].metrics).values()) <= set(trainer.metrics)  # mask (M) / pose (P) metrics too
    gm = load_checkpoint(best)
    assert gm.meta["task"] == task
    if task == "pose":
        assert gm.meta["kpt_shape"] == [4, 3]  # built for the data's keypoints, not the YAML's 17
    ema = trainer.ema.ema.gm.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = gm.eval()(x), ema(x)
    ya, yb = (a[0][0], b[0][0]) if task == "segment" else (a[0], b[0])
    assert torch.equal(ya, yb)  # the checkpoint is the trained EMA model, exactly


def test_task_eval_reports_the_task_metrics(task_run):
    from fxqat.evaluate import evaluate

    task, data, trainer, best = task_run
    r = evaluate(best, data, imgsz=64, batch=4)
    assert list(r) == [name for name, _ in TASKS[task].metrics]
    assert all(0.0 <= v <= 1.0 for v in r.values())
    assert r == evaluate(trainer.ema.ema.gm, data, imgsz=64, batch=4)


def test_pose_data_with_other_keypoints_is_refused(tmp_path):
    import fxqat
    from fxqat.data.signs import generate
    from fxqat.models import load_model
    from fxqat.training import train_qat

    data = generate(tmp_path / "d", train=1, val=1, imgsz=64, task="pose", progress=False)
    gm = fxqat.prepare_qat(load_model("yolov8n-pose.yaml", nc=10))  # the YAML's 17 keypoints
    with pytest.raises(FxqatError, match=r"kpt_shape=\[4, 3\] but the model's head has kpt_shape=\[17, 3\]"):
        train_qat(gm, str(data))
    plain = tmp_path / "plain.yaml"
    plain.write_text(data.read_text().split("kpt_shape")[0])
    with pytest.raises(FxqatError, match="a pose data YAML needs kpt_shape"):
        train_qat(gm, str(plain))


def test_cli_eval_every_form_with_the_task_validator(task_run, tmp_path, capsys):
    """fake-quant, INT8 torch and QDQ ONNX rows, each with the task's metric columns (mask_* / pose_*)."""
    import json

    from fxqat.cli import main

    task, data, _, best = task_run
    out = tmp_path / "eval.json"
    assert main(["eval", str(best), f"data={data}", "imgsz=64", "batch=4", f"out={out}"]) == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["QAT fake-quant", "INT8 torch", "QDQ ONNX (ORT)"]
    names = [name for name, _ in TASKS[task].metrics]
    for r in rows:
        assert list(r) == ["model", *names] and all(0.0 <= r[k] <= 1.0 for k in names)
    header = capsys.readouterr().out.splitlines()[-4].split()
    assert header == ["model", *names]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pose", "classify"])
def test_task_resume_continues_with_the_task_trainer(task, tmp_path, monkeypatch):
    """An interrupted 2-epoch run resumes from last.pt: the task's model class is rebuilt from the checkpoint's
    YAML, the task's trainer runs epoch 2 only, in the same run folder."""
    import fxqat.training as T
    from fxqat.data.signs import generate

    model = "yolov8n-cls.yaml" if task == "classify" else MODELS[task]
    data = generate(tmp_path / "data", train=40 if task == "classify" else 8, val=16 if task == "classify" else 4,
                    imgsz=128 if task == "classify" else 64, seed=0, task=task, progress=False, min_size=0.2,
                    max_size=0.4)
    from .conftest_helpers import interrupted_after_first_epoch

    real = T._trainer_cls
    monkeypatch.setattr(T, "_trainer_cls", interrupted_after_first_epoch(real))
    with pytest.raises(KeyboardInterrupt):
        T.train_qat(model, str(data), epochs=2, imgsz=64, batch=4, project=str(tmp_path / "runs"), name="run",
                    workers=0, calib_batches=1, verbose=False)
    monkeypatch.setattr(T, "_trainer_cls", real)
    last = tmp_path / "runs" / "run" / "weights" / "last.pt"
    trainer, _ = T.train_qat(resume=str(last))
    assert type(trainer).__mro__[1].__name__ == TASKS[task].trainer.split(":")[1]
    assert trainer.start_epoch == 1 and trainer.epoch == 1  # epoch 2 of 2 ran, epoch 1 was not repeated
    assert load_checkpoint(last).meta["task"] == task
    rows = (tmp_path / "runs" / "run" / "results.csv").read_text().strip().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [1, 2]

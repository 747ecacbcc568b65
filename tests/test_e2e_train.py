"""QAT of an end-to-end head through Ultralytics' trainer: both branch sets trained with Ultralytics' E2ELoss."""

import pytest
import torch


@pytest.mark.slow
def test_e2e_qat_trains_both_branch_sets_with_e2e_loss(tiny_data, tmp_path):
    from ultralytics.utils.loss import E2ELoss

    import fxqat
    from fxqat.checkpoint import load_checkpoint
    from fxqat.models import load_model
    from fxqat.training import train_qat

    import yaml

    torch.manual_seed(0)
    model = load_model("yolo26n.yaml", nc=len(yaml.safe_load(open(tiny_data))["names"]))
    model.end2end = True
    start = fxqat.prepare_qat(model, example_inputs=(torch.rand(2, 3, 128, 128),))  # a graph is trained as given
    before = {k: v.detach().clone() for k, v in start.state_dict().items()}
    trainer, best = train_qat(start, tiny_data, epochs=1, imgsz=128, batch=8, project=str(tmp_path), name="qat",
                              workers=0, calib_batches=1, verbose=False)
    assert isinstance(trainer.model.criterion, E2ELoss)  # one-to-many + one-to-one terms, Ultralytics' schedule
    gm = load_checkpoint(best)
    assert gm.meta["end2end"] is True
    after = gm.state_dict()
    for key in ("model.23.cv3.0.2.conv.weight", "model.23.one2one_cv3.0.2.conv.weight", "model.0.conv.weight"):
        assert not torch.equal(after[key], before[key]), f"{key} did not train"
    with torch.no_grad():
        y = gm.eval()(torch.rand(1, 3, 128, 128))[0]
    assert y.shape == (1, 300, 6)  # one-to-one top-k rows (336 anchors, k = max_det)


@pytest.mark.parametrize("task", ["pose", pytest.param("segment", marks=pytest.mark.slow),
                                  pytest.param("obb", marks=pytest.mark.slow)])
def test_yolo26_task_qat_uses_yolo26_losses_and_trains_the_training_only_parts(task, tmp_path):
    """YOLO26's task heads train with Ultralytics' own YOLO26 losses (SegmentLoss26 / PoseLoss26 / v8OBBLoss inside
    E2ELoss); the training-only parts (Pose26's sigma heads and flow model, Segment26's semantic branch) train with
    the graph; the checkpoint rebuilds, and ``evaluate`` validates its one-to-one output with the task's metrics."""
    import fxqat
    from fxqat.checkpoint import load_checkpoint
    from fxqat.data.signs import generate
    from fxqat.evaluate import evaluate
    from fxqat.models import load_model
    from fxqat.tasks import TASKS
    from fxqat.training import train_qat

    import yaml

    torch.manual_seed(0)
    data = generate(tmp_path / "data", train=8, val=4, imgsz=64, seed=1, task=task, progress=False)
    info = yaml.safe_load(open(data))
    model = load_model(f"yolo26n-{'seg' if task == 'segment' else task}.yaml", nc=len(info["names"]))
    if task == "pose":
        model = load_model(str(_pose_yaml(tmp_path, info["kpt_shape"])), nc=len(info["names"]))
    model.end2end = True
    start = fxqat.prepare_qat(model, example_inputs=(torch.rand(2, 3, 64, 64),))
    before = {k: v.detach().clone() for k, v in start.state_dict().items()}
    trainer, best = train_qat(start, data, epochs=1, imgsz=64, batch=4, project=str(tmp_path / "runs"), name="qat",
                              workers=0, calib_batches=1, verbose=False, ptq_epoch0=False)
    crit = trainer.model.criterion
    loss = {"segment": "SegmentLoss26", "pose": "PoseLoss26", "obb": "v8OBBLoss"}[task]
    assert type(crit).__name__ == "E2ELoss" and type(crit.one2one).__name__ == loss
    gm = load_checkpoint(best)
    assert gm.meta["head"] == {"segment": "Segment26", "pose": "Pose26", "obb": "OBB26"}[task]
    after = gm.state_dict()
    for part in {"pose": (".decode.cv4_sigma.", ".decode.flow_model."), "segment": (".decode.semseg.",),
                 "obb": (".one2one_cv4.",)}[task]:  # saved with the graph, and moved by training
        keys = [k for k in before if part in k and before[k].is_floating_point()]
        assert keys and any(not torch.equal(after[k], before[k]) for k in keys), f"{part} did not train"
    r = evaluate(best, data, imgsz=64, batch=4)
    assert list(r) == [n for n, _ in TASKS[task].metrics] and all(0.0 <= v <= 1.0 for v in r.values())


def _pose_yaml(tmp_path, kpt_shape):
    """yolo26n-pose.yaml with the data's keypoint shape (the YAML's own is 17 × 3)."""
    from ultralytics.nn.tasks import yaml_model_load

    import yaml

    cfg = yaml_model_load("yolo26n-pose.yaml")
    cfg["kpt_shape"] = list(kpt_shape)
    path = tmp_path / "yolo26n-pose.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path

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

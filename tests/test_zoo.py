"""Shipped models: loaded by short name from package data, never unpickled, reproducible with pack()."""

import pytest
import torch
import yaml

from fxqat.errors import ModelLoadError
from fxqat.models import load_model
from fxqat.zoo import FORMAT, SHIPPED, info, pack, read_shipped, shipped_path


def test_shipped_model_loads_by_name():
    m = load_model("fxqat-signs-yolov8n")
    assert type(m).__name__ == "DetectionModel" and not m.training
    assert m.model[-1].nc == 10 and m.names[0] == "stop"
    meta = info("fxqat-signs-yolov8n")
    assert meta["format"] == FORMAT and meta["data"]["generator"] == "signs" and "state_dict" not in meta
    assert any("fxqat train" in c for c in meta["commands"])  # the commands that reproduce it
    assert shipped_path("fxqat-signs-yolov8n").stat().st_size < 10e6
    with torch.no_grad():
        y = m(torch.rand(1, 3, 192, 192))[0]
    assert y.shape == (1, 14, 756) and torch.isfinite(y).all()


def test_shipped_file_is_tensors_only():
    # weights_only=True inside read_shipped: a pickled class would be refused
    rec = read_shipped(shipped_path("fxqat-signs-yolov8n"))
    assert all(isinstance(v, torch.Tensor) for v in rec["state_dict"].values())


def test_pack_round_trip(tmp_path, tiny_data):
    from ultralytics.nn.tasks import DetectionModel

    det = DetectionModel("yolov8n.yaml", nc=10, verbose=False)
    torch.save({"model": det.half()}, tmp_path / "best.pt")
    out = pack(tmp_path / "best.pt", tiny_data, tmp_path / "x.pt", "x", ["fxqat train ..."], metrics={"mAP50-95": 0.5})
    rec = read_shipped(out)
    assert rec["metrics"] == {"mAP50-95": 0.5} and rec["data"]["imgsz"] == 128
    from fxqat.zoo import build

    m = build(rec)
    ref = det.float().state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k].half().float()), k  # FP16 storage, exactly what was packed


def test_pack_refuses_foreign_data(tmp_path, tiny_data):
    from ultralytics.nn.tasks import DetectionModel

    torch.save({"model": DetectionModel("yolov8n.yaml", nc=10, verbose=False)}, tmp_path / "best.pt")
    d = yaml.safe_load(tiny_data.read_text())
    d.pop("fxqat")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ModelLoadError, match="not made by fxqat data signs"):
        pack(tmp_path / "best.pt", tmp_path / "data.yaml", tmp_path / "x.pt", "x", [])


def test_unknown_or_foreign_file_refused(tmp_path):
    assert "fxqat-signs-yolov8n" in SHIPPED
    with pytest.raises(ModelLoadError, match="valid: fxqat-signs-yolov8n"):
        shipped_path("nope")
    torch.save({"format": "other"}, tmp_path / "f.pt")
    with pytest.raises(ModelLoadError, match="not an fxqat shipped model"):
        read_shipped(tmp_path / "f.pt")


@pytest.mark.parametrize("yaml_name,task", [("yolov8n-seg.yaml", "segment"), ("yolov8n-pose.yaml", "pose"),
                                            ("yolov8n-cls.yaml", "classify")])
def test_pack_round_trip_task_models(tmp_path, tiny_data, yaml_name, task):
    """A task model packs with its task and builds back as the same model class, weights FP16-exact."""
    from fxqat.data.signs import generate
    from fxqat.tracing import task_of

    if task == "classify":
        data = generate(tmp_path / "cls", train=40, val=16, imgsz=128, seed=0, progress=False, task="classify",
                        min_size=0.2, max_size=0.4)
    else:
        data = tiny_data
    kw = {"data_kpt_shape": (4, 3)} if task == "pose" else {}
    model = load_model(yaml_name, nc=10)
    if kw:
        from ultralytics.nn.tasks import PoseModel

        model = PoseModel(yaml_name, nc=10, verbose=False, **kw)
    torch.save({"model": model.half()}, tmp_path / "best.pt")
    out = pack(tmp_path / "best.pt", data, tmp_path / "x.pt", "x", [], metrics={"m": 0.5}, imgsz=64)
    rec = read_shipped(out)
    assert rec["task"] == task and rec["imgsz"] == 64 and rec["nc"] == 10
    from fxqat.zoo import build

    m = build(rec)
    assert type(m) is type(model) and task_of(m) == task
    ref = model.float().state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k].half().float()), k
    if task == "pose":
        assert tuple(m.model[-1].kpt_shape) == (4, 3)


def test_shipped_yolo26n_runs_its_one_to_one_path():
    """fxqat-signs-yolo26n is shipped for its NMS-free path: it loads (and traces) with end2end set, top-k rows out."""
    import fxqat

    rec = read_shipped(shipped_path("fxqat-signs-yolo26n"))
    assert rec["end2end"] is True and rec["task"] == "detect" and rec["imgsz"] == 192
    model = load_model("fxqat-signs-yolo26n")
    assert model.end2end
    gm = fxqat.trace("fxqat-signs-yolo26n")
    assert gm.meta["end2end"] is True
    with torch.no_grad():
        assert gm(torch.rand(1, 3, 192, 192))[0].shape == (1, 300, 6)

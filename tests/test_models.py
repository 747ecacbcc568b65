import pytest
import torch

import fxqat
from fxqat.errors import ModelLoadError
from fxqat.models import load_model


@pytest.mark.parametrize("spec, fragment", [
    ("yolov9000.yaml", "no such model YAML"),
    ("yolo26n-sem.yaml", "is a semantic model"),
    ("/nonexistent/best.pt", "checkpoint not found"),
    ("model.onnx", "unknown model file type"),
])
def test_bad_inputs_name_the_input(spec, fragment):
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert fragment in str(e.value) and spec in str(e.value)
    assert "yolov8n.yaml" in str(e.value) or "detection" in str(e.value)


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        fxqat.trace(str(bad))
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(ModelLoadError, match="holds no Ultralytics model"):
        fxqat.trace(str(empty))


def test_non_detection_module():
    with pytest.raises(ModelLoadError, match="not an Ultralytics detection model"):
        fxqat.trace(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ModelLoadError, match="cannot load a model"):
        load_model(42)


def test_nc_from_yaml():
    assert load_model("yolov8n.yaml", nc=10).model[-1].nc == 10

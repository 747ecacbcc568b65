"""No file a user passes is unpickled beyond fxqat's allow-list unless the user opts in (trust / FXQAT_TRUST_PICKLE)."""

import copy
import fractions
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxqat
from fxqat.checkpoint import TRUST_ENV, load_checkpoint, load_file, unsafe_globals
from fxqat.cli import main
from fxqat.errors import FxqatError, ModelLoadError
from fxqat.models import load_model

OPT_IN = ("trust=true", TRUST_ENV)


class _Marker:
    """Unpickling this creates the marker file: what a malicious checkpoint would do (without running a shell)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Marker(marker), "epoch": 3}, path)
    assert "io.open" in unsafe_globals(path)
    return path, marker


@pytest.fixture(autouse=True)
def _no_env_trust(monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)


def _ultralytics_ckpt(path, yaml="yolov8n.yaml", with_namespace=False):
    """A checkpoint in Ultralytics' own save format (engine/trainer.py save_model), built without training."""
    import numpy as np
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import IterableSimpleNamespace

    model = DetectionModel(yaml, nc=3, verbose=False)
    args = get_cfg()
    if with_namespace:  # older releases pickle the args namespace and numpy scalars
        model.args = IterableSimpleNamespace(**vars(args))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    torch.save({"epoch": 0, "best_fitness": np.float64(0.5) if with_namespace else 0.5, "model": None,
                "ema": copy.deepcopy(model).half(), "updates": 2, "optimizer": opt.state_dict(),
                "train_args": {**vars(args), "data": Path("data.yaml")}, "train_metrics": {"fitness": 0.1},
                "date": "2026-01-01", "version": "8.4.190"}, path)
    return path


@pytest.mark.parametrize("yaml, namespace", [("yolov8n.yaml", False), ("yolo11n.yaml", True)])
def test_ultralytics_checkpoint_loads_weights_only(tmp_path, monkeypatch, yaml, namespace):
    path = _ultralytics_ckpt(tmp_path / "u.pt", yaml, namespace)
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    model = load_model(path)
    assert type(model).__name__ == "DetectionModel" and model.model[-1].nc == 3
    assert calls == [True]


@pytest.mark.slow  # one Ultralytics training epoch (~20 s on 2 cores)
def test_real_ultralytics_training_checkpoint_loads(tmp_path, tiny_data):
    """The allow-list was derived from a real Ultralytics run: its last.pt loads weights-only."""
    from fxqat.training_fp32 import train_fp32

    pt = train_fp32("yolov8n.yaml", tiny_data, epochs=1, imgsz=128, batch=8, project=str(tmp_path), name="fp32",
                    workers=0, verbose=False)
    ck = load_file(pt)
    assert isinstance(ck.get("ema") or ck.get("model"), torch.nn.Module)
    assert type(load_model(pt)).__name__ == "DetectionModel"


def _cli(evil_path, data):
    return {
        "trace": ["trace", str(evil_path)],
        "qat": ["qat", str(evil_path), f"data={data}", "epochs=1"],
        "train": ["train", str(evil_path), f"data={data}", "epochs=1"],
        "eval": ["eval", str(evil_path), f"data={data}"],
        "eval fp32=": ["eval", "yolov8n.yaml", f"fp32={evil_path}", f"data={data}"],
        "bench": ["bench", str(evil_path), "imgsz=64"],
        "analyze": ["analyze", str(evil_path), f"data={data}"],
        "export": ["export", str(evil_path)],
        "qat resume=": ["qat", f"resume={evil_path}"],
    }


@pytest.mark.parametrize("command", list(_cli("x", "d")))
def test_unsafe_pickle_refused_by_every_command(command, evil, tiny_data, capsys):
    path, marker = evil
    assert main(_cli(path, tiny_data)[command]) == 1
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert len(err.splitlines()) == 1 and str(path) in err and "io.open" in err
    if command in ("export", "qat resume="):  # they take fxqat checkpoints only, which are never unpickled
        assert "not an fxqat QAT checkpoint" in err
    else:
        assert all(o in err for o in OPT_IN), err


def _api(path, data):
    from fxqat.bench import bench_model
    from fxqat.evaluate import evaluate
    from fxqat.training import train_qat
    from fxqat.training_fp32 import train_fp32

    return {
        "load_model": lambda: load_model(path),
        "fxqat.trace": lambda: fxqat.trace(str(path)),
        "fxqat.prepare_qat": lambda: fxqat.prepare_qat(str(path)),
        "fxqat.analyze": lambda: fxqat.analyze(str(path), data, images=2, progress=False),
        "evaluate": lambda: evaluate(str(path), data),
        "train_qat": lambda: train_qat(str(path), data, epochs=1),
        "train_fp32": lambda: train_fp32(str(path), data, epochs=1),
        "bench_model": lambda: bench_model(str(path), imgsz=64),
        "load_checkpoint": lambda: load_checkpoint(path),
    }


@pytest.mark.parametrize("entry", list(_api("x", "d")))
def test_unsafe_pickle_refused_by_every_api_entry(entry, evil, tiny_data):
    path, marker = evil
    with pytest.raises(FxqatError) as e:
        _api(path, tiny_data)[entry]()
    assert not marker.exists()
    assert str(path) in str(e.value) and "io.open" in str(e.value)
    if entry != "load_checkpoint":
        assert "trust=True" in str(e.value) and TRUST_ENV in str(e.value)


@pytest.fixture
def legit_unsafe(tmp_path):
    """A real model plus an object outside the allow-list (a Fraction): harmless, but only loads when trusted."""
    from ultralytics.nn.tasks import DetectionModel

    path = tmp_path / "custom.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=3, verbose=False), "ratio": fractions.Fraction(1, 3)}, path)
    return path


def test_opt_in_loads_a_legitimate_unsafe_file(legit_unsafe, monkeypatch, capsys):
    with pytest.raises(ModelLoadError, match="fractions.Fraction"):
        load_model(legit_unsafe)
    assert load_model(legit_unsafe, trust=True).model[-1].nc == 3
    assert main(["trace", str(legit_unsafe), "trust=true", "imgsz=64"]) == 0
    assert "model.22" in capsys.readouterr().out
    monkeypatch.setenv(TRUST_ENV, "1")
    assert load_model(legit_unsafe).model[-1].nc == 3
    with pytest.raises(ModelLoadError, match="fractions.Fraction"):  # an explicit trust=False beats the env
        load_model(legit_unsafe, trust=False)


def test_file_claiming_fxqat_is_never_unpickled(tmp_path, tiny_data, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "fake_qat.pt"
    torch.save({"fxqat": 2, "state_dict": {}, "payload": _Marker(marker)}, path)
    for load in (lambda: load_checkpoint(path), lambda: load_model(path, trust=True),
                 lambda: load_file(path, trust=True)):
        with pytest.raises(ModelLoadError, match="fxqat"):
            load()
    assert main(["eval", str(path), f"data={tiny_data}", "trust=true"]) == 1
    assert "claims to be an fxqat QAT checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_subprocess_refusal_is_one_line(evil):
    path, marker = evil
    r = subprocess.run([sys.executable, "-m", "fxqat.cli", "trace", str(path)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "trust=true" in r.stderr and not marker.exists()


class _Getattr:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return (getattr, (self.obj, self.name))


def test_getattr_is_restricted_to_module_class_attributes(tmp_path):
    """Ultralytics pickles reference ``getattr(Detect, "forward")``; any other getattr could reach os.system."""
    from ultralytics.nn.modules import Detect

    from fxqat.checkpoint import load_file

    ok = tmp_path / "ok.pt"
    torch.save({"fn": _Getattr(Detect, "forward")}, ok)
    assert load_file(ok)["fn"] is Detect.forward
    bad = tmp_path / "bad.pt"
    torch.save({"fn": _Getattr(Detect, "__init__")}, bad)
    with pytest.raises(ModelLoadError, match="getattr"):
        load_file(bad)


def test_legacy_format_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "legacy.pt"
    torch.save({"model": _Marker(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError) as e:
        load_model(path)
    assert "io.open" in str(e.value) and "trust=True" in str(e.value) and not marker.exists()


def test_classify_checkpoint_with_its_transforms_loads_weights_only(tmp_path):
    """Ultralytics' ClassificationTrainer pickles model.transforms (torchvision Compose/Resize/CenterCrop/Normalize,
    an InterpolationMode enum): admitted; a transform holding a foreign callable is still refused."""
    import torchvision.transforms as T
    from ultralytics.data.augment import classify_transforms

    model = load_model("yolov8n-cls.yaml", nc=10)
    model.transforms = classify_transforms(64)
    torch.save({"model": model}, tmp_path / "best.pt")
    loaded = load_model(tmp_path / "best.pt")
    assert [type(t).__name__ for t in loaded.transforms.transforms] == \
        [type(t).__name__ for t in model.transforms.transforms]
    assert torch.equal(loaded.state_dict()["model.9.linear.weight"], model.state_dict()["model.9.linear.weight"])
    model.transforms = T.Compose([T.Lambda(subprocess.call)])  # a callable a transform could carry
    torch.save({"model": model}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match=r"refused to unpickle \S*call"):
        load_model(tmp_path / "evil.pt")

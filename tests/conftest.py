import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
GOLDEN = Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.txt from the current code")


@pytest.fixture
def golden(request):
    """Compare text with tests/golden/<name>; ``pytest --update-golden`` rewrites the file instead."""

    def check(name: str, text: str):
        path = GOLDEN / name
        text = re.sub(r"[ \t]+\n", "\n", text).rstrip() + "\n"
        if request.config.getoption("--update-golden"):
            path.write_text(text)
        # a missing file fails (locally too): writing it silently would make the first run pass whatever it dumps
        assert path.exists(), f"{path} missing: run pytest --update-golden"
        expected = path.read_text()
        assert text == expected, f"graph dump differs from {path}; if intended, run pytest --update-golden"

    return check


@pytest.fixture(scope="session")
def v8n():
    from fxqat.models import load_model

    return load_model("yolov8n.yaml", nc=10)


@pytest.fixture(scope="session")
def v8n_graph(v8n):
    import fxqat

    return fxqat.trace(v8n, "eval")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small signs dataset (generated once per session)."""
    from fxqat.data.signs import generate

    return generate(tmp_path_factory.mktemp("signs"), train=16, val=8, imgsz=128, seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_qat_run(tiny_data, tmp_path_factory):
    """One short QAT run through the Ultralytics trainer on the tiny dataset: (trainer, best checkpoint)."""
    from fxqat.training import train_qat

    out = tmp_path_factory.mktemp("runs")
    return train_qat("yolov8n.yaml", tiny_data, epochs=2, imgsz=128, batch=8, project=str(out), name="qat",
                     workers=0, calib_batches=1, verbose=False, ptq_epoch0=False)

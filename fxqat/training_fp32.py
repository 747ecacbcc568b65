"""FP32 training with Ultralytics (``fxqat train``): the starting models QAT fine-tunes, read safely, optionally
started from another model's matching tensors (``pretrained=``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .checkpoint import trusted
from .errors import FxqatError


@contextlib.contextmanager
def _ultralytics_safe_load(tasks):
    """Ultralytics' own weights-only loading, for the time it reads the user's .pt."""
    saved = tasks.SAFE_LOAD
    tasks.SAFE_LOAD = True
    try:
        yield
    finally:
        tasks.SAFE_LOAD = saved


def train_fp32(model, data: str, epochs: int = 10, imgsz: int = 320, batch: int = 16, project: str = "runs/fxqat",
               name: str = "fp32", trust: bool | None = None, pretrained=None, **overrides) -> Path:
    """Train an FP32 model with Ultralytics (plots off, offline) and return the path of its best.pt.

    A ``.pt`` is checked by fxqat's safe loader and then read by Ultralytics weights-only, unless ``trust``.
    ``pretrained``: a model (shipped name, ``.pt``, YAML or module, read by :func:`fxqat.models.load_model`) whose
    tensors start the training wherever name and shape match (:func:`fxqat.models.transfer_weights`), e.g. the
    shipped detector's for a segment, pose, OBB or classify model; refused when nothing matches."""
    import ultralytics.nn.tasks as tasks
    from ultralytics import YOLO

    from .models import load_model
    from .tasks import read_data

    info = read_data(data)  # a data YAML, or a classify folder
    guard = contextlib.nullcontext()
    if isinstance(model, (str, Path)):
        load_model(model, trust=trust)  # fxqat's checks: detection model, and a .pt read safely unless trusted
        if str(model).endswith((".pt", ".pth")) and not trusted(trust):
            guard = _ultralytics_safe_load(tasks)
    with guard:
        yolo = YOLO(str(model)) if isinstance(model, (str, Path)) else model
    if pretrained is not None:
        _start_from(yolo, pretrained, trust, info)
    args = dict(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, project=project, name=name, exist_ok=True,
                plots=False, amp=False, device="cpu" if not torch.cuda.is_available() else 0)
    args.update(overrides)
    yolo.train(**args)
    best = Path(yolo.trainer.save_dir) / "weights" / "best.pt"
    return best if best.exists() else Path(yolo.trainer.save_dir) / "weights" / "last.pt"


def _start_from(yolo, pretrained, trust, data: dict) -> None:
    """Copy ``pretrained``'s matching tensors into ``yolo``'s model, built for ``data``'s classes (and keypoints), and
    have Ultralytics' trainer start from that model (it rebuilds a model from its YAML and loads weights only when
    the YOLO object holds a checkpoint)."""
    from .models import load_model, transfer_weights

    kw = {"data_kpt_shape": tuple(data["kpt_shape"])} if data.get("kpt_shape") else {}
    yolo.model = type(yolo.model)(yolo.model.yaml, nc=data["nc"], verbose=False, **kw)
    n, total = transfer_weights(yolo.model, load_model(pretrained, trust=trust))
    if n == 0:
        raise FxqatError(f"pretrained={pretrained}: no tensor matches the model's by name and shape; give a model of "
                         "the same family and size (e.g. fxqat-signs-yolov8n for yolov8n-seg.yaml)")
    print(f"pretrained: {n}/{total} tensors from {pretrained}")
    yolo.ckpt = yolo.ckpt or {"pretrained": str(pretrained)}  # Ultralytics then trains from yolo.model's weights

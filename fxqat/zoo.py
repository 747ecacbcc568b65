"""Models fxqat ships as package data, loaded by a short name (nothing is downloaded).

    fxqat.load_model("fxqat-signs-yolov8n")     # also: fxqat trace / qat / eval / analyze fxqat-signs-yolov8n

A shipped file holds tensors, strings and numbers only (read with ``torch.load(weights_only=True)``, never
unpickled): the Ultralytics model YAML, FP16 weights, class names, the generator settings of the data it was trained
on, its validation metrics and the commands that reproduce it. :func:`pack` writes one from an Ultralytics
``best.pt``; the README (Shipped model) lists the exact commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

FORMAT = "fxqat-shipped/1"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Shipped:
    name: str
    file: str
    about: str


SHIPPED = {s.name: s for s in (
    Shipped("fxqat-signs-yolov8n", "fxqat-signs-yolov8n.pt",
            "yolov8n trained by fxqat on its synthetic traffic signs (10 classes, trained at 192 px, runs at 256 px)"),
    Shipped("fxqat-signs-yolov8n-seg", "fxqat-signs-yolov8n-seg.pt",
            "yolov8n-seg trained by fxqat on its synthetic traffic signs: each sign's visible mask (192 px)"),
    Shipped("fxqat-signs-yolov8n-pose", "fxqat-signs-yolov8n-pose.pt",
            "yolov8n-pose trained by fxqat on its synthetic traffic signs: the 4 corners of each sign (192 px)"),
    Shipped("fxqat-signs-yolov8n-obb", "fxqat-signs-yolov8n-obb.pt",
            "yolov8n-obb trained by fxqat on its synthetic traffic signs: rotated boxes along the signs (192 px)"),
    Shipped("fxqat-signs-yolov8n-cls", "fxqat-signs-yolov8n-cls.pt",
            "yolov8n-cls trained by fxqat on crops of its synthetic traffic signs (runs at 64 px)"),
    Shipped("fxqat-signs-yolo26n", "fxqat-signs-yolo26n.pt",
            "yolo26n trained by fxqat on its synthetic traffic signs, run on its NMS-free one-to-one path (192 px)"),
)}


def is_shipped(spec) -> bool:
    return isinstance(spec, str) and spec in SHIPPED


def shipped_path(name: str) -> Path:
    if name not in SHIPPED:
        raise ModelLoadError(f"{name}: not a model fxqat ships; valid: {', '.join(SHIPPED)}")
    path = WEIGHTS_DIR / SHIPPED[name].file
    if not path.is_file():
        raise ModelLoadError(f"{name}: {path} is missing from this installation; reinstall fxqat (pip install -e .)")
    return path


def read_shipped(path) -> dict:
    """The shipped record (a dict of tensors, strings and numbers), checked for its format."""
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file
        raise ModelLoadError(f"{path}: not a readable fxqat shipped model ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: not an fxqat shipped model (format {FORMAT!r} expected)")
    return rec


def build(rec: dict):
    """An FP32 Ultralytics model of the record's task (``DetectionModel``, ``SegmentationModel``, ``PoseModel``,
    ``OBBModel``, ``ClassificationModel``) from a shipped record, in eval mode."""
    from .tasks import spec

    task = str(rec.get("task", "detect"))  # records written before task models hold detectors
    model = spec(task).cls("model")(dict(rec["yaml"]), nc=int(rec["nc"]), verbose=False)
    model.load_state_dict({k: v.float() for k, v in rec["state_dict"].items()})
    model.names = {int(k): v for k, v in rec["names"].items()}
    model.args = {"imgsz": int(rec["imgsz"]), "task": task}
    if rec.get("end2end"):  # an end-to-end model shipped for its one-to-one (top-k, no NMS) path
        model.end2end = True
    return model.float().eval()


def load_shipped(name: str):
    """The shipped model ``name`` as an FP32 Ultralytics model of its task."""
    return build(read_shipped(shipped_path(name)))


def info(name: str) -> dict:
    """Metadata of a shipped model: data settings, metrics, the commands that made it (no weights)."""
    rec = read_shipped(shipped_path(name))
    return {k: v for k, v in rec.items() if k != "state_dict"}


def pack(best_pt, data_yaml, out, name: str, commands: list[str], metrics: dict | None = None,
         imgsz: int | None = None) -> Path:
    """Write a shipped model from an Ultralytics ``best.pt`` trained on fxqat's signs data (``data_yaml``: its data
    YAML, or for a classify model its data folder).

    ``metrics``: the validation metrics to record; measured on the packed (FP16-rounded) weights when not given.
    ``imgsz``: the size the model runs at (default: the data's image size; a classify model runs on its crops).
    """
    from .models import load_model
    from .tasks import read_data
    from .tracing import task_of

    model = load_model(str(best_pt)).float().eval()
    from .modules.e2e import has_one2one

    one2one = has_one2one(model.model[-1])
    if one2one:
        model.end2end = True  # YOLO26 / YOLOv10 ship for their NMS-free path: metrics and every use run it
    data = read_data(data_yaml)
    gen = data.get("fxqat")
    if not gen or gen.get("generator") != "signs":
        raise ModelLoadError(f"{data_yaml}: not made by fxqat data signs; shipped models are trained on fxqat's data")
    rec = {"format": FORMAT, "name": name, "task": task_of(model), "yaml": dict(model.yaml),
           "nc": int(model.model[-1].nc if hasattr(model.model[-1], "nc") else len(data["names"])),
           "names": {int(k): str(v) for k, v in data["names"].items()}, "imgsz": int(imgsz or gen["imgsz"]),
           "state_dict": {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()},
           "data": dict(gen), "commands": list(commands), **({"end2end": True} if one2one else {})}
    if metrics is None:
        from .evaluate import evaluate

        metrics = evaluate(build(rec), data_yaml, imgsz=rec["imgsz"], batch=16, names=rec["names"],
                           stride=model.stride)
    rec["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rec, out)
    return out

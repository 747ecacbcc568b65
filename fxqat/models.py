"""Turn what a user hands fxqat (a model YAML name, a ``.pt`` checkpoint, a ``YOLO`` object, a ``DetectionModel``)
into an Ultralytics ``DetectionModel``, with one clear error line for anything else."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

from torch import nn

from .errors import ModelLoadError

SUPPORTED = ("a detection, segment, pose, OBB or classify model: a shipped model (fxqat-signs-yolov8n and its -seg, "
             "-pose, -obb, -cls siblings), a YAML name such as yolov8n.yaml … yolov8x.yaml, yolo11n.yaml, "
             "yolov8n-seg.yaml, yolo11n-pose.yaml, yolov8n-obb.yaml, yolov8n-cls.yaml, "
             "yolo26n(-seg|-pose|-obb|-cls).yaml or yolov10n.yaml, a .pt checkpoint, an "
             "ultralytics YOLO object or a DetectionModel (or its Segmentation/Pose/OBB subclass) or ClassificationModel")
TASKS = ("detect", "segment", "pose", "obb", "classify")  # the heads fxqat traces


def _detection_model_cls():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel


def _check_detection(model: nn.Module, source: str) -> nn.Module:
    DetectionModel = _detection_model_cls()
    from ultralytics.nn.tasks import ClassificationModel

    if isinstance(model, ClassificationModel):
        from ultralytics.nn.modules import Classify

        if not isinstance(model.model[-1], Classify):  # e.g. a torchvision backbone wrapped by Ultralytics
            raise ModelLoadError(f"{source}: a classify model without a YOLO Classify head ({SUPPORTED})")
        return model
    if not isinstance(model, DetectionModel):
        raise ModelLoadError(f"{source}: {type(model).__name__} is not an Ultralytics detection model ({SUPPORTED})")
    head = model.model[-1]
    from .modules.e2e import e2e_heads, has_one2one
    from .modules.e2e_tasks import e2e_task_heads

    if has_one2one(head) and type(head) not in (*e2e_heads(), *e2e_task_heads()):
        raise ModelLoadError(f"{source}: end-to-end (NMS-free) {type(head).__name__} heads are not supported; "
                             "fxqat traces YOLO26's (yolo26n.yaml, yolo26n-seg|pose|obb.yaml) and YOLOv10's "
                             "(yolov10n.yaml)")
    return model


def _from_yaml(spec: str, nc: int | None) -> nn.Module:
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    try:
        cfg = yaml_model_load(spec)
    except FileNotFoundError:
        raise ModelLoadError(f"{spec}: no such model YAML (file or Ultralytics built-in); {SUPPORTED}") from None
    except Exception as e:  # malformed YAML
        raise ModelLoadError(f"{spec}: cannot read model YAML ({type(e).__name__}: {e})") from None
    from ultralytics.nn.tasks import OBBModel, PoseModel, SegmentationModel

    task = guess_model_task(cfg)
    from ultralytics.nn.tasks import ClassificationModel

    classes = {"detect": _detection_model_cls(), "segment": SegmentationModel, "pose": PoseModel, "obb": OBBModel,
               "classify": ClassificationModel}
    if task not in classes:
        raise ModelLoadError(f"{spec}: is a {task} model; fxqat supports {', '.join(TASKS)} models ({SUPPORTED})")
    try:
        model = classes[task](cfg, nc=nc, verbose=False)
    except Exception as e:
        raise ModelLoadError(f"{spec}: Ultralytics could not build this model ({type(e).__name__}: {e})") from None
    return model


def _from_checkpoint(path: Path, trust: bool | None = None) -> nn.Module:
    from .checkpoint import claims_fxqat, load_file

    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint not found; {SUPPORTED}")
    if claims_fxqat(path):
        raise ModelLoadError(f"{path}: is an fxqat QAT checkpoint; load it with fxqat.checkpoint.load_checkpoint")
    ckpt = load_file(path, trust=trust)
    if isinstance(ckpt, dict) and "fxqat" in ckpt:
        raise ModelLoadError(f"{path}: is an fxqat QAT checkpoint; load it with fxqat.checkpoint.load_checkpoint")
    model = None
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") or ckpt.get("model")
    elif isinstance(ckpt, nn.Module):
        model = ckpt
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{path}: holds no Ultralytics model (expected a dict with 'model' or 'ema'); {SUPPORTED}")
    return model.float()


def load_model(spec, nc: int | None = None, trust: bool | None = None) -> nn.Module:
    """Return an Ultralytics ``DetectionModel`` for ``spec`` (see :data:`SUPPORTED`). Never downloads anything.

    A ``.pt`` is read by :func:`fxqat.checkpoint.load_file`: weights-only with an allow-list of Ultralytics / torch
    classes; ``trust=True`` (or ``FXQAT_TRUST_PICKLE=1``) unpickles a file that needs anything else.
    """
    if isinstance(spec, (str, Path)):
        s = str(spec)
        from .zoo import SHIPPED, load_shipped

        if s in SHIPPED:
            return load_shipped(s)
        if s.endswith((".yaml", ".yml")):
            return _check_detection(_from_yaml(s, nc), s)
        if s.endswith((".pt", ".pth")):
            return _check_detection(_from_checkpoint(Path(s), trust), s)
        raise ModelLoadError(f"{s}: unknown model file type; {SUPPORTED}")
    if isinstance(spec, nn.Module):
        inner = getattr(spec, "model", None)
        try:
            from ultralytics.engine.model import Model as YOLOObject
        except Exception:  # pragma: no cover - ultralytics layout changed
            YOLOObject = ()
        if isinstance(spec, YOLOObject):
            return _check_detection(inner, f"YOLO({getattr(spec, 'ckpt_path', None) or spec.cfg})")
        return _check_detection(spec, type(spec).__name__)
    raise ModelLoadError(f"{spec!r}: cannot load a model from a {type(spec).__name__}; {SUPPORTED}")


def transfer_weights(dst: nn.Module, src: nn.Module) -> tuple[int, int]:
    """Copy every tensor of ``src``'s state dict into ``dst``'s where the name and shape match (Ultralytics'
    ``intersect_dicts``: a detector's backbone, neck and box/class branches into a segment, pose or OBB model of the
    same size, its backbone into a classify model). Returns (tensors copied, tensors in ``dst``)."""
    from ultralytics.utils.torch_utils import intersect_dicts

    mine = dst.state_dict()
    same = intersect_dicts(src.state_dict(), mine)
    dst.load_state_dict(same, strict=False)  # copies into dst's tensors, in dst's dtype; src is left as it was
    return len(same), len(mine)

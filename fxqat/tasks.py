"""Every YOLO task as data: which Ultralytics model, trainer and validator class serve it, what its loss reads from
the head, and which validator metrics fxqat reports.

QAT training (:mod:`fxqat.training`), checkpoints (:mod:`fxqat.checkpoint`), ``fxqat eval`` (:mod:`fxqat.evaluate`)
look a task up here instead of assuming Detect:

    task      model class          trainer               validator              loss reads (head output / head)
    detect    DetectionModel       DetectionTrainer      DetectionValidator     boxes scores feats / stride nc reg_max
    segment   SegmentationModel    SegmentationTrainer   SegmentationValidator  + mask_coefficient proto
    pose      PoseModel            PoseTrainer           PoseValidator          + kpts / kpt_shape
    obb       OBBModel             OBBTrainer            OBBValidator           + angle (decoded, in the raw output)
    classify  ClassificationModel  ClassificationTrainer ClassificationValidator the logits (training output)

Classify data is a folder (``train/<class>/*``, ``val/<class>/*``, as Ultralytics reads it), not a YAML:
:func:`read_data` reads either form.

The head attributes the loss reads come from the QAT graph's ``meta`` (recorded by :func:`fxqat.trace`).
``fxqat analyze`` measures the head-output error on Detect's box and class outputs and, for a task model, on each of
the task's own outputs (``TaskSpec.outputs``: mask coefficients and prototypes, keypoints, angle logits).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from .errors import FxqatError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    model: str  # Ultralytics model class, "module:Class"
    trainer: str
    validator: str
    loss_reads: tuple[str, ...]  # keys of the head's training output the task's loss reads
    head_attrs: tuple[str, ...]  # attributes of model.model[-1] the loss reads beyond Detect's stride, nc, reg_max
    metrics: tuple[tuple[str, str], ...]  # fxqat metric name → Ultralytics validator key
    main: str  # the main metric (fxqat name)
    data_keys: tuple[str, ...] = ()  # keys the data YAML must hold for this task
    outputs: tuple[str, ...] = ()  # roles of the task's own head outputs, each measured on its own by fxqat analyze
    loss26: str = ""  # the loss of YOLO26's head of this task (Segment26, Pose26, OBB26), inside Ultralytics' E2ELoss

    def cls(self, what: str):
        """The Ultralytics class named by field ``what`` (model | trainer | validator | loss26), imported on use."""
        module, _, name = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), name)


_DET = ("boxes", "scores", "feats")


def _box_metrics(suffix: str, prefix: str = "") -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{k}", f"metrics/{k}({suffix})") for k in ("mAP50", "mAP50-95", "precision", "recall"))


TASKS: dict[str, TaskSpec] = {
    "detect": TaskSpec("detect", "ultralytics.nn.tasks:DetectionModel",
                       "ultralytics.models.yolo.detect:DetectionTrainer",
                       "ultralytics.models.yolo.detect:DetectionValidator", _DET, (), _box_metrics("B"), "mAP50-95"),
    "segment": TaskSpec("segment", "ultralytics.nn.tasks:SegmentationModel",
                        "ultralytics.models.yolo.segment:SegmentationTrainer",
                        "ultralytics.models.yolo.segment:SegmentationValidator",
                        (*_DET, "mask_coefficient", "proto"), (),
                        _box_metrics("B") + _box_metrics("M", "mask_"), "mask_mAP50-95",
                        outputs=("segment.mask_last", "segment.proto_last"),
                        loss26="ultralytics.utils.loss:SegmentLoss26"),
    "pose": TaskSpec("pose", "ultralytics.nn.tasks:PoseModel", "ultralytics.models.yolo.pose:PoseTrainer",
                     "ultralytics.models.yolo.pose:PoseValidator", (*_DET, "kpts"), ("kpt_shape",),
                     _box_metrics("B") + _box_metrics("P", "pose_"), "pose_mAP50-95", ("kpt_shape",),
                     outputs=("pose.kpt_last",), loss26="ultralytics.utils.loss:PoseLoss26"),
    "obb": TaskSpec("obb", "ultralytics.nn.tasks:OBBModel", "ultralytics.models.yolo.obb:OBBTrainer",
                    "ultralytics.models.yolo.obb:OBBValidator", (*_DET, "angle"), (), _box_metrics("B"), "mAP50-95",
                    outputs=("obb.angle_last",), loss26="ultralytics.utils.loss:v8OBBLoss"),
    "classify": TaskSpec("classify", "ultralytics.nn.tasks:ClassificationModel",
                         "ultralytics.models.yolo.classify:ClassificationTrainer",
                         "ultralytics.models.yolo.classify:ClassificationValidator", ("logits",), (),
                         (("top1", "metrics/accuracy_top1"), ("top5", "metrics/accuracy_top5")), "top1",
                         outputs=("classify.linear",)),
}


# An end-to-end (YOLO26) task head deployed on its one-to-one path: the roles of its task outputs there
ONE2ONE_ROLES = {"segment.mask_last": "e2e.mask_last", "pose.kpt_last": "e2e.kpt_last",
                 "obb.angle_last": "e2e.angle_last"}


def spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task``; an unknown task is one clear error naming the valid ones."""
    if task not in TASKS:
        raise FxqatError(f"task {task!r}: not supported here; valid: {', '.join(TASKS)}")
    return TASKS[task]


def task_metrics(task: str) -> tuple[str, str]:
    """(companion metric, main metric) of a task, fxqat's names: detect (mAP50, mAP50-95), segment (mask_mAP50,
    mask_mAP50-95), pose (pose_mAP50, pose_mAP50-95), obb (mAP50, mAP50-95), classify (top5, top1)."""
    main = spec(task).main
    return ("top5" if main == "top1" else main.replace("50-95", "50")), main


def head_values(meta: dict) -> dict:
    """The task head's attributes the loss reads (``TaskSpec.head_attrs``), from a QAT graph's ``meta``."""
    s = spec(meta.get("task", "detect"))
    missing = [a for a in s.head_attrs if a not in meta]
    if missing:
        raise FxqatError(f"{s.name} graph: meta lacks {missing}; re-trace the model with fxqat.trace")
    return {a: meta[a] for a in s.head_attrs}


def metrics_of(task: str, stats: dict) -> dict:
    """The validator's statistics as fxqat's metric names (``TaskSpec.metrics``)."""
    return {name: float(stats[key]) for name, key in spec(task).metrics}


def read_data(path) -> dict:
    """A data YAML (:func:`fxqat.data.images.read_data_yaml`) or a classify folder: ``names`` from the class
    folders of ``train/``, ``classify: True``, ``train`` / ``val`` folders."""
    from .data.images import read_data_yaml

    p = Path(path)
    if not p.is_dir():
        return read_data_yaml(p)
    classes = sorted(d.name for d in (p / "train").iterdir() if d.is_dir()) if (p / "train").is_dir() else []
    if not classes:
        raise FxqatError(f"{p}: a classify data folder holds train/<class>/ image folders (and val/<class>/); make "
                         "one with fxqat data signs OUT task=classify")
    info = {"names": dict(enumerate(classes)), "nc": len(classes), "path": p, "train": p / "train",
            "val": p / "val", "classify": True, "yaml_file": str(p)}
    if (p / "fxqat.yaml").is_file():  # fxqat's generator settings (a data YAML's ``fxqat:`` key)
        import yaml

        info["fxqat"] = yaml.safe_load((p / "fxqat.yaml").read_text())
    return info


def calibration_source(data: dict, given):
    """What to calibrate on: a classify folder's train/ images, else the data YAML itself."""
    return str(data["train"]) if data.get("classify") else given


def check_data(task: str, data: dict, meta: dict | None = None) -> None:
    """``data`` (from :func:`read_data`) has what ``task`` needs, and fits the model's head (``meta``)."""
    s = spec(task)
    where = data.get("yaml_file", "data")
    if bool(data.get("classify")) != (task == "classify"):
        need = "a class-folder dataset (train/<class>/, val/<class>/)" if task == "classify" else "a data YAML"
        raise FxqatError(f"{where}: a {task} model needs {need}; make one with fxqat data signs OUT task={task}")
    for key in s.data_keys:
        if key not in data:
            raise FxqatError(f"{where}: a {task} data YAML needs {key}: (e.g. kpt_shape: [4, 3]; make one with "
                             f"fxqat data signs OUT task={task})")
    if task == "pose" and meta is not None and list(meta["kpt_shape"]) != list(data["kpt_shape"]):
        raise FxqatError(f"{where}: kpt_shape={list(data['kpt_shape'])} but the model's head has "
                         f"kpt_shape={list(meta['kpt_shape'])}; start from the model YAML (its head is built for the "
                         "data) or from a model trained on this data")


def fp32_model(model, nc: int, data: dict, trust: bool | None = None):
    """The FP32 Ultralytics model for ``model`` (see :func:`fxqat.models.load_model`); a pose model YAML is built
    with the data's ``kpt_shape`` as Ultralytics' PoseTrainer builds it."""
    from .models import load_model

    if isinstance(model, Path):
        model = str(model)
    if isinstance(model, str) and model.endswith((".yaml", ".yml")) and "kpt_shape" in data:
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load

        try:
            cfg = yaml_model_load(model)
        except FileNotFoundError:
            cfg = None  # load_model names the problem
        if cfg is not None and guess_model_task(cfg) == "pose":
            cfg["kpt_shape"] = list(data["kpt_shape"])
            return load_model(spec("pose").cls("model")(cfg, nc=nc, verbose=False))
    return load_model(model, nc=nc, trust=trust)

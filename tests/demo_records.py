"""Tiny packed task models for the demo's tests: an untrained YAML-built model of the task, packed as fxqat ships
its models (:func:`fxqat.zoo.pack`), with generator settings that keep the demo small (64 px scenes)."""

from __future__ import annotations

from pathlib import Path

import torch

YAMLS = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml",
         "obb": "yolov8n-obb.yaml", "classify": "yolov8n-cls.yaml"}
SCENE = 64  # scene size of the tiny records' data
CLS_IMGSZ = 32  # the tiny classify record runs at this size


def tiny_record(tmp: Path, task: str) -> Path:
    """Pack an untrained ``task`` model into ``tmp/weights/<the shipped file name>`` and return that folder."""
    from ultralytics.nn.tasks import PoseModel

    from fxqat.data.signs import generate
    from fxqat.demo import MODELS
    from fxqat.models import load_model
    from fxqat.zoo import SHIPPED, pack

    tmp = Path(tmp)
    data = generate(tmp / f"data_{task}", train=40 if task == "classify" else 2, val=40 if task == "classify" else 1,
                    imgsz=SCENE, seed=0, progress=False, task=task, min_size=0.3, max_size=0.6)
    torch.manual_seed(0)
    if task == "pose":
        model = PoseModel(YAMLS[task], nc=10, verbose=False, data_kpt_shape=(4, 3))
    else:
        model = load_model(YAMLS[task], nc=10)
    torch.save({"model": model.half()}, tmp / f"best_{task}.pt")
    name = MODELS[task]
    out = tmp / "weights" / SHIPPED[name].file
    pack(tmp / f"best_{task}.pt", data, out, name, ["(test record)"], metrics={"m": 0.0},
         imgsz=CLS_IMGSZ if task == "classify" else SCENE)
    return out.parent

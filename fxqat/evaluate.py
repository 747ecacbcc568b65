"""The task's Ultralytics validator metrics for every form of a model, side by side: mAP (detect, OBB), box and
mask mAP (segment), box and pose mAP (pose) — the validator is the task's (:mod:`fxqat.tasks`).

    FP32 (Ultralytics .pt / YAML), fake-quant QAT graph (fxqat checkpoint or GraphModule),
    converted INT8 torch model, QDQ ONNX model in ONNX Runtime.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import FxqatError

os.environ.setdefault("YOLO_OFFLINE", "1")


class Predictor(nn.Module):
    """What Ultralytics' validator needs from a model: ``stride``, ``names``, ``yaml`` and decoded predictions."""

    def __init__(self, fn, names: dict, stride, label: str = "", task: str = "detect"):
        super().__init__()
        self.task = task  # picks the validator (fxqat.tasks)
        self.fn = fn
        self.names = dict(names)
        self.register_buffer("stride", torch.as_tensor(stride, dtype=torch.float32).reshape(-1))
        self.yaml = {"channels": 3}
        self.label = label
        self.end2end = False  # True: predictions are one-to-one top-k rows (B, k, 6); the validator then runs no NMS
        self._net = fn if isinstance(fn, nn.Module) else None  # registers parameters for .to()/.float()

    def forward(self, x, *args, **kwargs):
        out = self.fn(x)
        if isinstance(out, (tuple, list)) and isinstance(out[-1], dict):
            return out[0]  # a graph in eval mode: (predictions, raw head outputs); segment: ((y, proto), raw)
        return out  # y, or (y, proto) from a runtime


class BatchRunner:
    """A runtime session as a callable on torch tensors; a model exported with a fixed batch runs larger batches in
    chunks of that size. Subclasses set ``static_batch`` and implement :meth:`run`."""

    static_batch: int | None = None

    def __deepcopy__(self, memo):
        return self  # the session is stateless for inference; validators deep-copy models

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = self.static_batch
        if b is not None and x.shape[0] != b:  # a fixed-batch model: run in chunks of its batch size
            if x.shape[0] % b:
                raise ValueError(f"batch {x.shape[0]} is not a multiple of the model's fixed batch {b}")
            parts = [self(x[i:i + b]) for i in range(0, x.shape[0], b)]
            if isinstance(parts[0], tuple):  # several outputs (segment: predictions, prototypes)
                return tuple(torch.cat(p) for p in zip(*parts))
            return torch.cat(parts)
        return self.run(x.detach().cpu().float().numpy())

    def run(self, x: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class OnnxRunner(BatchRunner):
    """ONNX Runtime session as a callable on torch tensors (2 intra-op threads unless told otherwise)."""

    def __init__(self, path, threads: int | None = None, providers=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        dim0 = self.session.get_inputs()[0].shape[0]
        self.static_batch = dim0 if isinstance(dim0, int) else None

    def run(self, x: np.ndarray):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input: x.astype(np.float32)})]
        return outs[0] if len(outs) == 1 else tuple(outs)  # segment: (predictions, prototypes)


def as_predictor(model, names=None, stride=None, trust: bool | None = None) -> Predictor:
    """Wrap any supported model form (see module doc) as a :class:`Predictor` (``end2end`` from its metadata)."""
    pred = _as_predictor(model, names, stride, trust)
    if not isinstance(model, Predictor):
        pred.end2end = _end2end(model, pred.fn)
    return pred


def _end2end(model, fn) -> bool:
    """Whether a model form returns one-to-one top-k rows: ONNX metadata, a graph's meta, a model's own flag."""
    import torch.fx as fx

    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        from .deploy import read_onnx_metadata

        return bool(read_onnx_metadata(model).get("end2end", False))
    if isinstance(fn, fx.GraphModule):
        return bool(getattr(fn, "meta", {}).get("end2end", False))
    return bool(getattr(fn, "end2end", False))


def _as_predictor(model, names=None, stride=None, trust: bool | None = None) -> Predictor:
    import torch.fx as fx

    from .tracing import task_of

    if isinstance(model, Predictor):
        return model
    if isinstance(model, (str, Path)) and str(model).rstrip("/").endswith("_openvino_model"):
        from .deploy import openvino_predictor

        return openvino_predictor(model)
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        from .deploy import read_onnx_metadata

        meta = read_onnx_metadata(model)
        names = names or meta.get("names", {})
        stride = stride if stride is not None else meta.get("stride", 32)
        return Predictor(OnnxRunner(model), names, stride, "onnx", meta.get("task", "detect"))
    if isinstance(model, (str, Path)):
        from .checkpoint import is_checkpoint, load_checkpoint
        from .models import load_model

        model = load_checkpoint(model) if is_checkpoint(model) else load_model(Path(model), trust=trust)
    if isinstance(model, fx.GraphModule):
        meta = getattr(model, "meta", {})
        model.eval()
        return Predictor(model, names or meta.get("names", {}), stride if stride is not None else meta["stride"],
                         "graph", task_of(model))
    if isinstance(model, nn.Module) and hasattr(model, "model") and hasattr(model, "stride"):
        m = copy.deepcopy(model).float().eval()
        return Predictor(m, names or m.names, m.stride, "fp32", task_of(m))
    raise FxqatError(f"cannot evaluate a {type(model).__name__}; give a .pt, .onnx, YAML or a fxqat graph")


def evaluate(model, data, imgsz: int = 320, batch: int = 16, names=None, stride=None, verbose: bool = False,
             trust: bool | None = None, images: list | None = None) -> dict:
    """The task's validator metrics of ``model`` on ``data``'s val split (Ultralytics metrics): ``mAP50``,
    ``mAP50-95``, ``precision``, ``recall`` of the boxes, plus ``mask_*`` (segment) or ``pose_*`` (pose); see
    :data:`fxqat.tasks.TASKS`. ``trust``: see :func:`fxqat.models.load_model`. ``images``: see
    :func:`validation_stats`."""
    from .tasks import metrics_of

    pred = as_predictor(model, names, stride, trust)
    return metrics_of(pred.task, validation_stats(pred, data, imgsz, batch, verbose, images))


def validation_stats(model, data, imgsz: int, batch: int, verbose: bool = False, images: list | None = None) -> dict:
    """The task validator's own statistics (Ultralytics' keys and ``fitness``) of any model form on ``data``'s val
    split: every image letterboxed to the square ``imgsz``, in batches of ``batch``. :func:`evaluate` and the QAT
    trainer's validation (:mod:`fxqat.training`) both run this, so a checkpoint's stored mAP is what ``fxqat eval``
    reports for it at the run's ``imgsz`` and ``batch`` (a fake-quant model can move by a few 1e-4 mAP with the batch
    size: the float sums' rounding flips some values across a quantization step). ``images``: a list that gets one
    dict per validation image, in the validator's order, of its matching statistics (Ultralytics' ``tp``, ``conf``,
    ``pred_cls``, ``target_cls``, and ``tp_m`` / ``tp_p`` for masks / keypoints): what a per-image resampling of the
    mAP needs (:mod:`fxqat.analysis.bootstrap`); detect, segment, pose and OBB validators only."""
    from .tasks import check_data, read_data, spec

    pred = as_predictor(model)
    info = read_data(data)  # a data YAML, or a classify folder
    check_data(pred.task, info)
    dev = next((p.device for p in pred.parameters()), torch.device("cpu"))  # a graph on a GPU is evaluated there
    args = dict(data=str(data), imgsz=imgsz, batch=batch, plots=False, rect=False, verbose=verbose, save_json=False,
                workers=0, task=pred.task, device=str(dev.index or 0) if dev.type == "cuda" else "cpu")
    if getattr(pred, "end2end", False):  # one-to-one top-k predictions: validated without NMS (Ultralytics' nms=False)
        args["nms"] = False
    v = spec(pred.task).cls("validator")(args=args)
    seen: dict = {}
    if images is not None:
        from .analysis.bootstrap import tp_key

        try:
            tp_key(pred.task)
        except ValueError as e:
            raise FxqatError(str(e)) from None
        # the validator empties its statistics' lists when it computes the metrics: copy them after each batch
        v.add_callback("on_val_batch_end", lambda val: seen.update({k: list(x) for k, x in val.metrics.stats.items()}))
    with torch.no_grad():
        stats = dict(v(model=pred))
    if images is not None:
        images.extend({k: seen[k][i] for k in seen} for i in range(len(seen.get("tp", []))))
    return stats

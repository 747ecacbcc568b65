"""Training: FP32 baselines (thin over Ultralytics) and QAT through the Ultralytics trainer.

QAT uses Ultralytics' own loss, augmentation, EMA, LR schedule and validator on fxqat's QAT graph: the graph is
wrapped in :class:`QATDetectionModel` (an Ultralytics ``DetectionModel`` whose forward is the graph) and handed to
:class:`QATTrainer`, which adds fxqat checkpoints (atomic, no pickled classes), quantizer-aware EMA and the
BN / observer freeze schedule.

Default QAT recipe (a fine-tuning recipe for a converged model, chosen by measurement — see README): SGD, lr0 1e-4
(the learning rate Ultralytics' FP32 schedule ends on) decaying linearly to 1e-5, no warmup, no mosaic, BN statistics
frozen after half the epochs, observers frozen for the last epoch. On a converged yolov8n (signs, 320 px) one QAT
epoch at lr0 1e-4 kept mAP50-95 within 0.1 pt of FP32, while lr0 1e-3 lost 0.9 pt.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import FxqatError
from .passes.pipeline import freeze_bn, prepare_qat
from .quant.fake_quant import FakeQuant, set_observers

os.environ.setdefault("YOLO_OFFLINE", "1")

QAT_DEFAULTS = dict(optimizer="SGD", lr0=1e-4, lrf=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=0.0,
                    warmup_bias_lr=0.0, mosaic=0.0, close_mosaic=0, cos_lr=False, plots=False, amp=False,
                    patience=1000, cls_pw=0.0)


class _Head:
    """What Ultralytics' loss and trainer read from ``model.model[-1]``."""

    def __init__(self, meta: dict):
        self.stride = meta["stride"].clone()
        self.nc = int(meta["nc"])
        self.reg_max = int(meta.get("reg_max", 16))
        self.max_det = 300
        self.end2end = False


def _detection_model_base():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel


class QATDetectionModel(_detection_model_base()):
    """An Ultralytics ``DetectionModel`` whose forward runs fxqat's QAT graph (``self.gm``)."""

    def __init__(self, gm: fx.GraphModule):
        nn.Module.__init__(self)
        self.gm = gm
        self.model = [_Head(gm.meta)]  # plain list: not a submodule
        self.stride = gm.meta["stride"].clone()
        self.names = dict(gm.meta["names"])
        self.nc = int(gm.meta["nc"])
        self.yaml = copy.deepcopy(gm.meta.get("yaml") or {})
        self.save = []
        self.task = "detect"
        self.end2end = False

    def _predict_once(self, x, profile=False, visualize=False, embed=None):
        return self.gm(x)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.model[-1].stride = fn(self.model[-1].stride)
        return self

    def fuse(self, verbose=True):
        return self  # fused Conv+BN modules already; nothing to fuse

    def is_fused(self, thresh=10):
        return True


def _sync_quant_state(dst: nn.Module, src: nn.Module) -> None:
    """Quantizer state (scales, zero-points, observer ranges, flags) and BN freeze flags are copied, not averaged."""
    src_mods = dict(src.named_modules())
    for name, m in dst.named_modules():
        s = src_mods.get(name)
        if isinstance(m, FakeQuant) and isinstance(s, FakeQuant):
            with torch.no_grad():
                for v, sv in zip(m.state_dict().values(), s.state_dict().values()):
                    v.copy_(sv)
            m.observe_enabled, m.fake_quant_enabled = s.observe_enabled, s.fake_quant_enabled
        elif hasattr(m, "bn_frozen") and s is not None:
            m.bn_frozen = s.bn_frozen


def _trainer_cls():
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

    class FxqatEMA(ModelEMA):
        def update(self, model):
            super().update(model)
            _sync_quant_state(self.ema, unwrap_model(model))

    class QATTrainer(DetectionTrainer):
        """Ultralytics' DetectionTrainer on an fxqat QAT model."""

        def __init__(self, qat_model: QATDetectionModel, overrides: dict, freeze_bn_epoch: int | None = None,
                     freeze_observer_epoch: int | None = None, resume_state: dict | None = None):
            super().__init__(overrides=overrides)
            self.qat_model = qat_model
            self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch
            self.resume_state = resume_state
            self.add_callback("on_train_epoch_start", QATTrainer._schedule)

        def setup_model(self):
            self.model = self.qat_model
            return None

        def _setup_train(self):
            super()._setup_train()
            self.ema = FxqatEMA(self.model)
            if self.resume_state:
                rs = self.resume_state
                self.optimizer.load_state_dict(rs["optimizer"])
                self.ema.ema.gm.load_state_dict(rs["ema"])
                self.ema.updates = rs["updates"]
                self.start_epoch = rs["epoch"] + 1
                self.best_fitness = rs.get("best_fitness")
                self.scheduler.last_epoch = self.start_epoch - 1

        @staticmethod
        def _schedule(trainer):
            model = unwrap_model(trainer.model)
            if trainer.freeze_bn_epoch is not None and trainer.epoch >= trainer.freeze_bn_epoch:
                freeze_bn(model)
            if trainer.freeze_observer_epoch is not None and trainer.epoch >= trainer.freeze_observer_epoch:
                set_observers(model, False)

        def save_model(self):
            ema = self.ema.ema
            extra = dict(epoch=self.epoch, best_fitness=self.best_fitness, updates=self.ema.updates,
                         optimizer=self.optimizer.state_dict(), ema=ema.gm.state_dict(),
                         train_args={k: v for k, v in vars(self.args).items()
                                     if isinstance(v, (int, float, str, bool, type(None)))},
                         metrics={k: float(v) for k, v in (self.metrics or {}).items()})
            model_gm = copy.deepcopy(ema.gm)
            model_gm.meta = ema.gm.meta
            save_checkpoint(self.last, model_gm, **extra)
            if self.best_fitness == self.fitness:
                save_checkpoint(self.best, model_gm, **extra)
            return True

        def final_eval(self):
            if self.best.exists():
                gm = load_checkpoint(self.best)
                self.validator.args.plots = False
                self.metrics = self.validator(model=QATDetectionModel(gm).to(self.device))
                self.metrics.pop("fitness", None)

    return QATTrainer


def _fp32_model(model, nc):
    from .models import load_model

    return load_model(model, nc=nc)


def train_qat(model, data: str, epochs: int = 3, imgsz: int = 320, qconfig=None, batch: int = 16,
              project: str = "runs/fxqat", name: str = "qat", freeze_bn_epoch: int | None = None,
              freeze_observer_epoch: int | None = None, calib_batches: int = 8, resume: str | None = None,
              **overrides):
    """QAT fine-tuning of ``model`` (YAML name, Ultralytics ``.pt``, DetectionModel or prepared QAT graph).

    Returns ``(trainer, best_checkpoint_path)``. BN statistics freeze at ``freeze_bn_epoch`` (default: half the
    epochs), observers at ``freeze_observer_epoch`` (default: the last epoch). ``resume``: an fxqat ``last.pt``.
    """
    import yaml as _yaml

    from .calibrate import calibrate
    from .data.images import iter_image_batches
    from .tracing import refuse_task, task_of

    if not Path(data).is_file():
        raise FxqatError(f"data={data}: data YAML not found (make one with: fxqat data signs OUT)")
    names = _yaml.safe_load(Path(data).read_text())["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}
    nc = len(names)
    resume_state = None
    if resume:
        gm, ckpt = load_checkpoint(resume, with_extra=True)
        resume_state = ckpt
        epochs = int(ckpt.get("train_args", {}).get("epochs", epochs))
    elif isinstance(model, fx.GraphModule):
        gm = model
    else:
        det = _fp32_model(model, nc)
        refuse_task(task_of(det), "QAT training")
        if det.model[-1].nc != nc:
            raise FxqatError(f"model has {det.model[-1].nc} classes but data={data} has {nc}; train an FP32 model "
                             "on this data first (fxqat train) or start from a YAML")
        gm = prepare_qat(det, qconfig)
        calibrate(gm, iter_image_batches(data, imgsz=imgsz, batch=batch, split="train"), batches=calib_batches,
                  progress=True)
    refuse_task(task_of(gm), "QAT training")
    gm.meta["names"] = names
    args = dict(QAT_DEFAULTS)
    args.update(model="fxqat-qat.yaml", data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, project=project,
                name=name, exist_ok=True, device="cpu" if not torch.cuda.is_available() else overrides.pop("device", 0))
    args.update(overrides)
    fb = freeze_bn_epoch if freeze_bn_epoch is not None else max(1, epochs // 2)
    fo = freeze_observer_epoch if freeze_observer_epoch is not None else max(1, epochs - 1)
    trainer = _trainer_cls()(QATDetectionModel(gm), args, fb, fo, resume_state)
    trainer.train()
    return trainer, trainer.best if trainer.best.exists() else trainer.last


def train_fp32(model, data: str, epochs: int = 10, imgsz: int = 320, batch: int = 16, project: str = "runs/fxqat",
               name: str = "fp32", **overrides) -> Path:
    """Train an FP32 model with Ultralytics (plots off, offline) and return the path of its best.pt."""
    from ultralytics import YOLO

    yolo = YOLO(str(model)) if isinstance(model, (str, Path)) else model
    args = dict(data=str(data), epochs=epochs, imgsz=imgsz, batch=batch, project=project, name=name, exist_ok=True,
                plots=False, amp=False, device="cpu" if not torch.cuda.is_available() else 0)
    args.update(overrides)
    yolo.train(**args)
    best = Path(yolo.trainer.save_dir) / "weights" / "best.pt"
    return best if best.exists() else Path(yolo.trainer.save_dir) / "weights" / "last.pt"


def train(model, data: str, qat: bool = True, **kwargs):
    """``fxqat.train``: QAT (default) or FP32 training. See :func:`train_qat` and :func:`train_fp32`."""
    return train_qat(model, data, **kwargs) if qat else train_fp32(model, data, **kwargs)

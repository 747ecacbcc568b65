"""Training: FP32 baselines (thin over Ultralytics) and QAT through the Ultralytics trainer.

QAT uses Ultralytics' own loss, augmentation, EMA, LR schedule and validator on fxqat's QAT graph: the graph is
wrapped in :class:`QATDetectionModel` (an Ultralytics ``DetectionModel`` whose forward is the graph) and handed to
:class:`QATTrainer`, which adds fxqat checkpoints (atomic, no pickled classes), quantizer-aware EMA and the
BN / observer freeze schedule.

Default QAT recipe (a fine-tuning recipe for a converged model, chosen by measurement): SGD, lr0 1e-4
(the learning rate Ultralytics' FP32 schedule ends on) decaying linearly to 1e-5, no warmup, no mosaic, BN statistics
frozen after half the epochs, observers frozen for the last epoch. On a converged yolov8n (signs, 320 px) one QAT
epoch at lr0 1e-4 kept mAP50-95 within 0.1 pt of FP32, while lr0 1e-3 lost 0.9 pt (benchmarks/README.md, Accuracy).
The module is ``fxqat.training``; ``fxqat.train`` is its :func:`train` function.

Several processes (``fxqat qat ... device=0,1`` / ``device=cpu nproc=2``, or ``torchrun -m fxqat.cli qat``): each rank
joins the process group before prepare/calibrate (:mod:`fxqat.distributed`), the trainer runs Ultralytics' DDP loop
(its sampler shards the data, DDP averages gradients, rank 0 writes checkpoints and validates alone on every image,
as ``fxqat eval`` does) and :func:`fxqat.distributed.sync_quant_state` merges quantizer ranges and BN statistics after
every batch.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import (check_ranks_agree, cpu_ddp, rank_device, single_process_ultralytics,
                          sync_quant_state)
from .errors import FxqatError
from .passes.pipeline import freeze_bn, prepare_qat
from .quant.fake_quant import FakeQuant, set_observers
from .quant.oscillation import Dampening, Freezer, check_dampen, check_freeze, install_oscillation
from .tasks import head_values, spec

os.environ.setdefault("YOLO_OFFLINE", "1")

QAT_DEFAULTS = dict(optimizer="SGD", lr0=1e-4, lrf=0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=0.0,
                    warmup_bias_lr=0.0, mosaic=0.0, close_mosaic=0, cos_lr=False, plots=False, amp=False,
                    patience=1000, cls_pw=0.0)


class _Head:
    """What Ultralytics' loss and trainer read from ``model.model[-1]``."""

    def __init__(self, meta: dict):
        self.stride = meta["stride"].clone()
        self.nc = int(meta["nc"])
        self.reg_max = int(meta.get("reg_max") or 16)  # None: a Classify head (its loss reads no reg_max)
        self.max_det = 300
        self.end2end = bool(meta.get("end2end", False))  # the graph's eval output: one-to-one top-k rows
        if "end2end" in meta:  # an end-to-end head (YOLO26, YOLOv10): DetectionModel.init_criterion reads this
            self.one2one_cv2 = True  # attribute and picks E2ELoss (one-to-many + one-to-one terms), as Ultralytics
        for k, v in head_values(meta).items():  # the task head's attributes its loss reads (fxqat.tasks)
            setattr(self, k, copy.deepcopy(v))


def _detection_model_base():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel


class QATDetectionModel(_detection_model_base()):
    """An Ultralytics ``DetectionModel`` whose forward runs fxqat's QAT graph (``self.gm``); its task (the graph's
    ``meta["task"]``) picks the loss of the task's Ultralytics model class (:mod:`fxqat.tasks`)."""

    def __init__(self, gm: fx.GraphModule):
        nn.Module.__init__(self)
        self.gm = gm
        self.model = [_Head(gm.meta)]  # plain list: not a submodule
        self.stride = gm.meta["stride"].clone()
        self.names = dict(gm.meta["names"])
        self.nc = int(gm.meta["nc"])
        self.yaml = copy.deepcopy(gm.meta.get("yaml") or {})
        self.save = []
        self.task = gm.meta.get("task", "detect")
        self.end2end = False
        self.dampening = None  # fxqat.quant.oscillation.Dampening: added to the training loss (set by QATTrainer)
        if "kpt_shape" in gm.meta:
            self.kpt_shape = list(gm.meta["kpt_shape"])
        flow = next((m.flow_model for m in gm.modules() if getattr(m, "flow_model", None) is not None), None)
        if flow is not None:  # Pose26: PoseLoss26's RLE term reads the head's flow model (trained with the graph)
            self.model[-1].flow_model = flow

    def init_criterion(self):
        s = spec(self.task)
        if s.loss26 and self.gm.meta.get("head", "").endswith("26"):  # Segment26 / Pose26 / OBB26, as Ultralytics
            from ultralytics.utils.loss import E2ELoss  # picks them by head type (our head is a stand-in)

            return E2ELoss(self, s.cls("loss26"))
        return s.cls("model").init_criterion(self)  # the task's loss (v8SegmentationLoss, ...)

    def loss(self, batch, preds=None):
        loss, items = super().loss(batch, preds)
        if self.training and self.dampening is not None:  # the optimizer steps on it; the logged items stay the task's
            loss = loss.sum() + self.dampening(self.gm, batch["img"].shape[0])
        return loss, items

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


def scales_without_decay(opt: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Move learned quantizer scales (LSQ) out of ``opt``'s weight-decay groups into one group without decay:
    decay would pull every learned scale toward zero."""
    scales = {id(m.scale) for m in model.modules() if isinstance(m, FakeQuant) and m.spec.learnable}
    moved = []
    for g in opt.param_groups:
        if g.get("weight_decay", 0) > 0:
            moved += [p for p in g["params"] if id(p) in scales]
            g["params"] = [p for p in g["params"] if id(p) not in scales]
    if moved:
        opt.add_param_group({"params": moved, "weight_decay": 0.0})
    return opt


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


def _trainer_cls(task: str = "detect"):
    DetectionTrainer = spec(task).cls("trainer")  # the task's trainer: its loss, augmentation, validator
    from ultralytics.utils import LOGGER, RANK
    from ultralytics.utils.torch_utils import ModelEMA, unwrap_model

    class FxqatEMA(ModelEMA):
        def update(self, model):
            super().update(model)
            _sync_quant_state(self.ema, unwrap_model(model))

    class QATTrainer(DetectionTrainer):
        """Ultralytics' DetectionTrainer (or the task's SegmentationTrainer / PoseTrainer / OBBTrainer) on an fxqat
        QAT model."""

        def __init__(self, qat_model: QATDetectionModel, overrides: dict, freeze_bn_epoch: int | None = None,
                     freeze_observer_epoch: int | None = None, resume_state: dict | None = None,
                     run_args: dict | None = None, ptq_epoch0: bool = True, dampen: float = 0.0,
                     freeze_osc: float | None = None):
            if resume_state:  # Ultralytics keeps results.csv when args.resume is set; fxqat restores the state itself
                overrides = dict(overrides, resume=str(resume_state.get("_path", True)))
            super().__init__(overrides=overrides)
            if dist.is_available() and dist.is_initialized():  # a DDP rank (fxqat.distributed joined the group):
                self.world_size = dist.get_world_size()  # Ultralytics counts devices in args.device, one here
            self._quant_synced = False
            self.run_args = dict(run_args or {})
            self.qat_model = qat_model
            self.freeze_bn_epoch, self.freeze_observer_epoch = freeze_bn_epoch, freeze_observer_epoch
            self.resume_state = resume_state
            self.ptq_epoch0 = ptq_epoch0
            self.dampening = Dampening(dampen) if dampen else None
            self.freezer = Freezer(freeze_osc) if freeze_osc is not None else None
            self.add_callback("on_train_epoch_start", QATTrainer._schedule)
            self.add_callback("on_train_batch_end", QATTrainer._sync_after_batch)

        def check_resume(self, overrides):
            self.resume = False  # never let Ultralytics unpickle the checkpoint: resume_state holds it, read safely

        def setup_model(self):
            self.model = self.qat_model
            return None

        def _setup_ddp(self):
            """The process group is already joined (fxqat.distributed.rank_device, before prepare/calibrate); CPU ranks
            use gloo, which Ultralytics' own set-up (CUDA only) does not offer."""
            if self.device.type == "cuda":
                from ultralytics.utils.torch_utils import get_torch_device_backend

                self.accelerator = get_torch_device_backend(self.device)
                self.accelerator.set_device(self.device.index)

        def optimizer_step(self):
            self._sync_quant()  # before the EMA update inside, so the EMA copies the synced quantizer state
            super().optimizer_step()

        def _sync_quant(self):
            if self.world_size > 1:
                sync_quant_state(unwrap_model(self.model))
                self._quant_synced = True

        @staticmethod
        def _sync_after_batch(trainer):
            if not trainer._quant_synced:  # a batch without optimizer step (gradient accumulation)
                trainer._sync_quant()
            trainer._quant_synced = False

        def validate(self):
            """Each epoch is validated exactly as ``fxqat eval`` validates the checkpoint
            (:func:`fxqat.evaluate.validation_stats` on the EMA graph: one process, every image letterboxed
            to the square imgsz, batches of the run's ``batch``), so the mAP best.pt stores is the mAP ``fxqat eval``
            reports for it. Under DDP rank 0 validates alone; the other ranks wait for it at the trainer's next
            collective. (Ultralytics' own training validation shards the val set over the ranks, runs the model in
            another memory layout than its standalone validator, and in rectangular batches: each moved a fake-quant
            model's mAP by up to 1e-3.)"""
            if RANK > 0:
                return None, None  # as Ultralytics' validator returns on ranks > 0
            stats = self._stats(self.ema.ema.gm)
            fitness = stats.pop("fitness", None)
            if self.best_fitness is None or self.best_fitness < fitness:
                self.best_fitness = fitness
            return stats, fitness

        def _stats(self, gm):
            from .evaluate import validation_stats

            # the validator runs its own deep copy of the graph (the EMA graph is in eval mode already)
            with single_process_ultralytics():  # one rank alone: no gather from or barrier with the other ranks
                return validation_stats(gm, self.args.data, self.args.imgsz, self.args.batch)

        def build_optimizer(self, model, *args, **kwargs):
            """Ultralytics' optimizer, with learned quantizer scales (LSQ) moved out of the weight-decay group:
            decay would pull every learned scale toward zero."""
            return scales_without_decay(super().build_optimizer(model, *args, **kwargs), model)

        def _setup_train(self):
            with cpu_ddp(self.world_size > 1 and self.device.type == "cpu"):
                super()._setup_train()
            self.ema = FxqatEMA(self.model)
            install_oscillation(self, unwrap_model(self.model), self.dampening, self.freezer)  # after the EMA copy
            if self.resume_state:
                rs = self.resume_state
                self.optimizer.load_state_dict(rs["optimizer"])
                self.ema.ema.gm.load_state_dict(rs["ema"])
                self.ema.updates = rs["updates"]
                self.start_epoch = rs["epoch"] + 1
                self.best_fitness = rs.get("best_fitness")
                self.scheduler.last_epoch = self.start_epoch - 1
            elif self.ptq_epoch0:
                self._validate_start()

        def _validate_start(self):
            """Epoch 0: the PTQ-initialized model, before any QAT step, is validated and saved as best.pt. A QAT
            epoch replaces it only with a higher fitness, so QAT never ends below the PTQ model it starts from."""
            if RANK > 0:  # rank 0 validates alone (the others start training and wait for it at the first step)
                return
            metrics = self._stats(self.ema.ema.gm)
            self.best_fitness = self.fitness = metrics.pop("fitness", None)
            self.metrics = metrics
            save_checkpoint(self.best, self._gm_copy(self.ema.ema.gm), **self._extra(epoch=-1))
            LOGGER.info(f"fxqat: epoch 0 (PTQ start) fitness {self.fitness:.4f}, saved as best.pt; QAT epochs "
                        "replace it only when they do better")

        @staticmethod
        def _gm_copy(gm):
            out = copy.deepcopy(gm)
            out.meta = gm.meta
            return out

        def _extra(self, epoch: int) -> dict:
            return dict(epoch=epoch, best_fitness=self.best_fitness, updates=self.ema.updates,
                        optimizer=self.optimizer.state_dict(), ema=self.ema.ema.gm.state_dict(),
                        train_args={k: v for k, v in vars(self.args).items()
                                    if isinstance(v, (int, float, str, bool, type(None)))},
                        metrics={k: float(v) for k, v in (self.metrics or {}).items()},
                        run_args=self.run_args)

        @staticmethod
        def _schedule(trainer):
            model = unwrap_model(trainer.model)
            if trainer.freeze_bn_epoch is not None and trainer.epoch >= trainer.freeze_bn_epoch:
                freeze_bn(model)
            if trainer.freeze_observer_epoch is not None and trainer.epoch >= trainer.freeze_observer_epoch:
                set_observers(model, False)

        def save_model(self):
            extra = self._extra(epoch=self.epoch)
            model_gm = self._gm_copy(self.ema.ema.gm)
            save_checkpoint(self.last, model_gm, **extra)
            if self.best_fitness == self.fitness:
                save_checkpoint(self.best, model_gm, **extra)
            return True

        def final_eval(self):
            if self.best.exists() and RANK in (-1, 0):  # under DDP rank 0 validates alone, as every epoch
                self.metrics = self._stats(load_checkpoint(self.best).to(self.device))
                self.metrics.pop("fitness", None)

    return QATTrainer


RUN_DEFAULTS = dict(epochs=3, imgsz=320, batch=16, project="runs/fxqat", name="qat", dampen=0.0, freeze_osc=None)
# overrides a resumed run may change (they do not change what is learned); everything else must match or be omitted
RESUME_MAY_CHANGE = {"workers", "device", "verbose", "plots", "patience", "cache", "save_period", "exist_ok"}


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _same(key, a, b) -> bool:
    if key == "data":
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    if key == "model":
        return str(a) == str(b) or Path(str(a)).resolve() == Path(str(b)).resolve()
    return a == b


def _resume_args(resume, ckpt: dict, given: dict, overrides: dict) -> tuple[dict, dict]:
    """The run arguments of the checkpoint, checked against the ones the caller gave (conflicts are errors)."""
    saved = dict(ckpt.get("run_args") or {})
    if not saved:  # older checkpoints: Ultralytics' own record of the run
        ta = ckpt.get("train_args", {})
        saved = {k: ta[k] for k in ("data", "epochs", "imgsz", "batch", "project", "name") if k in ta}
    saved_over = dict(saved.pop("overrides", {}) or {})
    for key, val in given.items():
        if val is None or key not in saved:
            continue
        if key == "model" and _same(key, val, resume):
            continue
        if not _same(key, val, saved[key]):
            raise FxqatError(f"resume={resume}: {key}={val!r} conflicts with the checkpoint's {key}={saved[key]!r}; "
                             f"omit {key} to resume the run as it was, or start a new run")
    for key, val in overrides.items():
        if key in RESUME_MAY_CHANGE:
            saved_over[key] = val
        elif key in saved_over and saved_over[key] != val:
            raise FxqatError(f"resume={resume}: {key}={val!r} conflicts with the checkpoint's {key}={saved_over[key]!r}")
        elif key not in saved_over:
            raise FxqatError(f"resume={resume}: {key}={val!r} was not set in the interrupted run; resuming cannot "
                             "change it (start a new run)")
    return saved, saved_over


def train_qat(model=None, data: str | None = None, epochs: int | None = None, imgsz: int | None = None, qconfig=None,
              batch: int | None = None, project: str | None = None, name: str | None = None,
              freeze_bn_epoch: int | None = None, freeze_observer_epoch: int | None = None, calib_batches: int = 8,
              resume: str | None = None, trust: bool | None = None, ptq_epoch0: bool | None = None,
              dampen: float | None = None, freeze_osc: float | None = None, **overrides):
    """QAT fine-tuning of ``model`` (YAML name, Ultralytics ``.pt``, DetectionModel or prepared QAT graph).

    Returns ``(trainer, best_checkpoint_path)``. Defaults: epochs 3, imgsz 320, batch 16, project runs/fxqat, name
    qat. BN statistics freeze at ``freeze_bn_epoch`` (default: half the epochs), observers at
    ``freeze_observer_epoch`` (default: the last epoch). ``resume``: an fxqat ``last.pt``; every argument of the
    interrupted run is restored from it (in the same run folder, so results.csv keeps its rows), and an argument
    given here that differs from the checkpoint's is an error. ``trust``: see :func:`fxqat.models.load_model`.
    ``ptq_epoch0`` (default True): validate the PTQ-initialized model first and keep it as best.pt unless a QAT
    epoch does better. ``dampen`` (default 0: off): oscillation dampening weight for low-bit weights
    (:mod:`fxqat.quant.oscillation`), e.g. 0.001; ``freeze_osc`` (default None: off): iterative weight freezing,
    the oscillation frequency above which a weight's code is frozen, e.g. 0.02.
    """
    from .calibrate import calibrate
    from .data.images import iter_image_batches
    from .tasks import calibration_source, check_data, fp32_model, read_data
    from .tracing import task_of

    # where this process trains; under a launcher (torchrun, or fxqat qat device=0,1) this joins the process group
    device, trainer_device, _ = rank_device(overrides.pop("device", None), overrides.pop("nproc", None))
    given = dict(model=model if isinstance(model, (str, Path)) else None, data=data, epochs=epochs, imgsz=imgsz,
                 batch=batch, project=project, name=name, freeze_bn_epoch=freeze_bn_epoch,
                 freeze_observer_epoch=freeze_observer_epoch, ptq_epoch0=ptq_epoch0,
                 dampen=None if dampen is None else check_dampen(dampen), freeze_osc=check_freeze(freeze_osc))
    resume_state = None
    if resume:
        gm, ckpt = load_checkpoint(resume, with_extra=True)
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise FxqatError(f"resume={resume}: holds no training state (optimizer, epoch); resume from a last.pt "
                             "written by fxqat qat")
        saved, overrides = _resume_args(resume, ckpt, given, overrides)
        if qconfig is not None:
            from .qconfig import as_qconfig
            from .qconfig.io import dump_qconfig

            if dump_qconfig(as_qconfig(qconfig)) != ckpt["qconfig"]:
                raise FxqatError(f"resume={resume}: qconfig={qconfig} differs from the checkpoint's qconfig; omit "
                                 "qconfig to resume the run as it was")
        run = {**RUN_DEFAULTS, **{k: v for k, v in saved.items() if k != "model"}}
        resume_state = dict(ckpt, _path=str(resume))
        if int(ckpt["epoch"]) + 1 >= int(run["epochs"]):
            raise FxqatError(f"resume={resume}: the run already finished its {run['epochs']} epochs")
    else:
        if model is None:
            raise FxqatError("train_qat: give a model (YAML name, .pt, DetectionModel or QAT graph) or resume=")
        if data is None:
            raise FxqatError("train_qat: data= is required (an Ultralytics data YAML; make one with fxqat data signs)")
        run = {**RUN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}, "data": str(data),
               "calib_batches": calib_batches, "overrides": _scalars(overrides)}
        if isinstance(model, (str, Path)):
            run["model"] = str(model)
    data_info = read_data(run["data"])  # a data YAML, or a classify folder
    names, nc = data_info["names"], data_info["nc"]
    for key in ("epochs", "imgsz", "batch"):
        if not isinstance(run[key], int) or run[key] < 1:
            raise FxqatError(f"{key}={run[key]!r}: must be a positive integer")
    if run["imgsz"] % 32:
        raise FxqatError(f"imgsz={run['imgsz']}: must be a multiple of 32 (the model's largest stride)")
    if resume:
        if nc != int(ckpt["nc"]):
            raise FxqatError(f"resume={resume}: data={run['data']} has {nc} classes but the checkpoint has "
                             f"{ckpt['nc']}; resume with the run's own data")
    elif isinstance(model, fx.GraphModule):
        gm = model
    else:
        det = fp32_model(model, nc, data_info, trust)
        head = det.model[-1]
        model_nc = head.nc if hasattr(head, "nc") else head.linear.out_features  # Classify: its Linear's outputs
        if model_nc != nc:
            raise FxqatError(f"model has {model_nc} classes but data={run['data']} has {nc}; train an FP32 "
                             "model on this data first (fxqat train) or start from a YAML")
        gm = prepare_qat(det, qconfig).to(device)
        calibrate(gm, iter_image_batches(calibration_source(data_info, run["data"]), imgsz=run["imgsz"],
                                         batch=run["batch"], split="train"),
                  batches=calib_batches, progress=True)
    task = task_of(gm)
    check_data(task, data_info, gm.meta)
    gm.meta["names"] = names
    epochs = int(run["epochs"])
    fb = run.get("freeze_bn_epoch")
    fo = run.get("freeze_observer_epoch")
    run["freeze_bn_epoch"] = fb if fb is not None else max(1, epochs // 2)
    run["freeze_observer_epoch"] = fo if fo is not None else max(1, epochs - 1)
    over = dict(overrides)  # on resume: the interrupted run's overrides (+ the ones a resume may change)
    over.pop("device", None)  # this process's device (rank_device above), never a saved one
    run["overrides"] = _scalars(over)
    args = dict(QAT_DEFAULTS)
    args.update(model="fxqat-qat.yaml", data=str(run["data"]), epochs=epochs, imgsz=run["imgsz"], batch=run["batch"],
                project=run["project"], name=run["name"], exist_ok=True, device=trainer_device)
    args.update(over)
    trainer = _trainer_cls(task)(QATDetectionModel(gm.to(device)), args, run["freeze_bn_epoch"],
                                 run["freeze_observer_epoch"], resume_state, run_args=run,
                                 ptq_epoch0=run.get("ptq_epoch0", True) is not False, dampen=run["dampen"],
                                 freeze_osc=run["freeze_osc"])
    try:
        trainer.train()
        if trainer.world_size > 1:
            check_ranks_agree(trainer.model.module.gm if hasattr(trainer.model, "module") else trainer.model.gm)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return trainer, trainer.best if trainer.best.exists() else trainer.last


def train(model, data: str, qat: bool = True, **kwargs):
    """``fxqat.train``: QAT (default) or FP32 training. See :func:`train_qat` and
    :func:`fxqat.training_fp32.train_fp32`."""
    from .training_fp32 import train_fp32

    return train_qat(model, data, **kwargs) if qat else train_fp32(model, data, **kwargs)

"""Oscillation dampening for low-bit QAT (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training").

With the straight-through estimator, a latent weight sitting near a rounding threshold flips between two grid points
from step to step. Dampening adds ``lambda_t * D`` to the training loss, with

    D = mean over weight-quantized layers of sum over the layer's weights of (c - round(c))^2,
    c = clamp(w / s + zero_point, qmin, qmax)

where ``w`` is the tensor the weight quantizer actually rounds (in :class:`~fxqat.modules.conv_bn_act.ConvBnAct` the
BN-folded weight ``conv.weight * gamma / sqrt(running_var + eps)``) and ``s`` its per-channel scale. ``D`` is measured
in grid steps (scale-normalized: ``lambda`` means the same for a 4-bit and an 8-bit layer, a wide or a narrow one),
``round(c)`` and ``s`` are constants (the gradient pulls the latent weights, and BN's gamma through the fold, toward
their nearest grid point; it never moves the scale), and the clamp leaves weights outside the grid's range to the
clipping. ``lambda_t`` follows the paper's cosine schedule from 0 at the start of training to ``lambda`` at the end.
The trainer adds ``lambda_t * D * batch_size`` to Ultralytics' loss, which is the per-image loss times the batch size:
``lambda`` is relative to the per-image detection loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import FxqatError

DAMPEN_MAX = 10.0  # the largest dampening weight train_qat accepts (useful values are around 1e-3 .. 1e-1)


def check_dampen(value) -> float:
    """``value`` as a dampening weight, or FxqatError with the valid range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= DAMPEN_MAX:
        raise FxqatError(f"dampen={value!r}: must be a number from 0 (off) to {DAMPEN_MAX:g}; the oscillation "
                         "dampening weight, e.g. dampen=0.01")
    return float(value)


def quantized_convs(model: nn.Module) -> list[nn.Module]:
    """The conv units whose weights are fake-quantized (initialized quantizer, fake-quant on)."""
    from ..modules.conv_bn_act import ConvBnAct

    return [m for m in model.modules() if isinstance(m, ConvBnAct) and m.weight_fq is not None
            and m.weight_fq.fake_quant_enabled and bool(m.weight_fq.initialized)]


def _grid(m: nn.Module, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of ``m``'s weight quantizer, constants shaped to broadcast over ``w``."""
    fq = m.weight_fq
    s, zp = fq.effective_scale().detach().float(), fq.zero_point.float()
    shape = [1] * w.dim()
    if fq.ch_axis is not None:
        shape[fq.ch_axis] = -1
    return s.reshape(shape), zp.reshape(shape)


def latent_codes(m: nn.Module) -> torch.Tensor:
    """``w / s + zero_point`` of the weight ``m``'s quantizer rounds (the BN-folded weight), differentiable in the
    weights (and gamma), with the scale a constant."""
    w = m.folded()[0]
    s, zp = _grid(m, w)
    return w.float() / s + zp


def dampening_term(model: nn.Module) -> torch.Tensor:
    """``D`` of the module docstring: 0 when every weight is on its grid, at most ``0.25 * weights`` per layer."""
    terms = []
    for m in quantized_convs(model):
        fq = m.weight_fq
        c = latent_codes(m).clamp(fq.qmin, fq.qmax)
        terms.append((c - torch.round(c).detach()).pow(2).sum())
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).mean()


def install_oscillation(trainer, model: nn.Module, dampening: Dampening | None, freezer: Freezer | None) -> None:
    """Hook into an fxqat QAT trainer (``model``: its unwrapped ``QATDetectionModel``, once the EMA copy exists, so
    the EMA model never adds the term): dampening into the model's training loss with its progress set before each
    batch, freezing right after each optimizer step (before the EMA update reads the weights)."""
    if dampening is not None:
        model.dampening = dampening
        trainer.add_callback("on_train_batch_start",
                             lambda t: dampening.on_batch_start(t.epoch, t.epochs, len(t.train_loader)))
    if freezer is not None:
        trainer.optimizer.register_step_post_hook(lambda *_: freezer.after_step(model.gm))


def cosine_ramp(final: float, progress: float) -> float:
    """The paper's cosine schedule: 0 at ``progress`` 0, ``final`` at 1 (clamped outside [0, 1])."""
    p = min(max(float(progress), 0.0), 1.0)
    return final * 0.5 * (1.0 - math.cos(math.pi * p))


class Dampening:
    """The dampening loss of one QAT run: ``weight`` (lambda) and the training progress the trainer sets."""

    def __init__(self, weight: float):
        self.weight = check_dampen(weight)
        self.progress = 0.0
        self.last = None  # the last term added (D, lambda_t): for logs and tests
        self._epoch, self._batch = None, 0

    def set_progress(self, epoch: int, batch: int, batches: int, epochs: int) -> None:
        self.progress = (epoch + batch / max(batches, 1)) / max(epochs, 1)

    def on_batch_start(self, epoch: int, epochs: int, batches: int) -> None:
        """Called before each training batch: counts the epoch's batches and sets the progress."""
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0
        self.set_progress(epoch, self._batch, batches, epochs)
        self._batch += 1

    def lam(self) -> float:
        return cosine_ramp(self.weight, self.progress)

    def __call__(self, model: nn.Module, batch_size: int) -> torch.Tensor:
        d, lam = dampening_term(model), self.lam()
        self.last = (float(d.detach()), lam)
        return d * (lam * batch_size)


# ------------------------------------------------------------------------------------------- iterative freezing
FREEZE_MOMENTUM = 0.01  # the EMA momentum of the oscillation frequency and of the integer code (the paper's)


def check_freeze(value) -> float | None:
    """``value`` as a freezing threshold (None: off), or FxqatError with the valid range."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise FxqatError(f"freeze_osc={value!r}: must be a number between 0 and 1 (exclusive), the oscillation "
                         "frequency above which a weight's integer code is frozen, e.g. freeze_osc=0.02; or None (off)")
    return float(value)


class Freezer:
    """Iterative weight freezing: after every optimizer step, each quantized weight's integer code is compared with
    the previous step's; a change in the opposite direction of the last change is an oscillation. An EMA (momentum
    :data:`FREEZE_MOMENTUM`) of that indicator is the weight's oscillation frequency; once it exceeds ``threshold``
    the weight is frozen at the EMA of its codes (rounded: the code it held most) and, from then on, its latent
    weight is written back after every step so that the BN-folded weight sits on that grid point: the code stays
    constant whatever the optimizer, BN's gamma or the learned scale do. The state lives in this object (a resumed
    run starts tracking afresh; frozen weights then start on their grid point)."""

    def __init__(self, threshold: float, momentum: float = FREEZE_MOMENTUM):
        self.threshold = check_freeze(threshold)
        self.momentum = momentum
        self.state: dict[str, dict] = {}

    def frozen(self) -> int:
        """How many weights are frozen."""
        return sum(int(s["frozen"].sum()) for s in self.state.values())

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        units = {id(m) for m in quantized_convs(model)}
        for name, m in model.named_modules():
            if id(m) not in units:
                continue
            codes = m.weight_fq.codes(m.folded()[0])
            st = self.state.get(name)
            if st is None or st["prev"].shape != codes.shape:
                self.state[name] = dict(prev=codes, dir=torch.zeros_like(codes), freq=torch.zeros_like(codes,
                                        dtype=torch.float32), ema=codes.float(), frozen=torch.zeros_like(codes,
                                        dtype=torch.bool), code=codes.clone())
                continue
            d = torch.sign(codes - st["prev"])
            osc = (d != 0) & (st["dir"] != 0) & (d != st["dir"])
            st["dir"] = torch.where(d != 0, d, st["dir"])
            st["prev"] = codes
            st["freq"].mul_(1 - self.momentum).add_(osc.float(), alpha=self.momentum)
            st["ema"].mul_(1 - self.momentum).add_(codes.float(), alpha=self.momentum)
            new = (st["freq"] > self.threshold) & ~st["frozen"]
            if new.any():
                fq = m.weight_fq
                st["code"] = torch.where(new, st["ema"].round().clamp(fq.qmin, fq.qmax).to(codes.dtype), st["code"])
                st["frozen"] |= new
            if st["frozen"].any():
                self._hold(m, st)

    @staticmethod
    def _hold(m: nn.Module, st: dict) -> None:
        """Write the frozen weights' latent values so the folded weight is ``(code - zero_point) * scale``."""
        w = m.conv.weight
        s, zp = _grid(m, w)
        f = m._bn_factor().detach().float().reshape(-1, *[1] * (w.dim() - 1)) if m.bn is not None \
            else torch.ones((), device=w.device)
        ok = st["frozen"] & (f.abs() > 1e-12)  # a zero gamma folds every weight to 0: nothing to hold
        target = (st["code"].float() - zp) * s / torch.where(f.abs() > 1e-12, f, torch.ones_like(f))
        w.copy_(torch.where(ok, target.to(w.dtype), w))

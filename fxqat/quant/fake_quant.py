"""``FakeQuant``: quantize→dequantize in the forward pass with straight-through gradients.

One instance may serve several graph nodes (shared quantizer: every input of a Concat, MaxPool in/out). It observes
only while training or calibrating (never in plain eval), and exports to ONNX QuantizeLinear/DequantizeLinear
through the aten ``fake_quantize_per_{tensor,channel}_affine`` ops.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn

from .. import native
from . import fast_fq
from .backend import make_observer
from .spec import QuantSpec

SCALE_EPS = 1e-8
# Min/max and moving-average observers update in place with a few tensor ops (fast path, below) instead of torch.ao's
# observer call + calculate_qparams: the same operations, so the same bits (tested), without their per-call Python
# work and their host syncs (``min_val == inf``, ``all(min_val <= max_val)``: one GPU→CPU wait each). False: the
# observer path, kept as the reference the tests and benchmarks/qat_step.py compare against.
FAST_OBSERVE = True
FAST_KINDS = ("minmax", "moving_average")
# Per-tensor 8-bit activations on CPU fake-quantize through the vectorized quantize / dequantize kernels
# (:mod:`fxqat.quant.fast_fq`: same values and gradients). False: torch's fake-quant kernel, the reference.
FAST_KERNEL = True
# The fast observer's update and qparams in one call of fxqat.native's ``fxqat_observe`` where the library is built
# (float32 contiguous CPU input, per tensor or per channel on axis 0, a running range already set): the same
# float32 operations, so the same bits (tested). False: the tensor ops below.
NATIVE_OBSERVE = True


class FakeQuant(nn.Module):
    def __init__(self, spec: QuantSpec, channels: int | None = None):
        super().__init__()
        self.spec = spec
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.ch_axis = spec.per_channel
        n = channels if spec.per_channel is not None else 1
        self.observer = make_observer(spec.observer, spec.qmin, spec.qmax, spec.symmetric, spec.per_channel,
                                      percentile=spec.percentile)
        scale = torch.ones(n)
        zp = torch.zeros(n, dtype=torch.int32)
        if spec.fixed is not None:
            scale.fill_(spec.fixed[0])
            zp.fill_(spec.fixed[1])
        if spec.learnable:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.register_buffer("initialized", torch.tensor(spec.fixed is not None))
        self.observe_enabled = spec.fixed is None
        self.fake_quant_enabled = True
        self.calibrating = False
        self.always_observe = False  # weight quantizers: the scale always follows the current weights
        self._ready = bool(self.initialized)  # host copy of ``initialized`` once it is True (no device read per call)
        self._fast = spec.observer in FAST_KINDS and not spec.learnable

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # re-read ``initialized`` on the next call

    def extra_repr(self) -> str:
        obs = f"percentile({self.spec.percentile})" if self.spec.observer == "percentile" else self.spec.observer
        return f"{self.spec.label()}, observer={obs}, learnable={self.spec.learnable}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the observer and take its scale/zero-point. A learnable scale is initialized from the observer (on
        the first batch, or over every batch of :func:`fxqat.calibrate`), then the optimizer owns it: later calls
        return at once (no observer work, the learned scale is kept), also for weight quantizers that otherwise always
        follow the current weights."""
        if self.spec.learnable and bool(self.initialized) and not self.calibrating:
            return
        self.observer(x.detach().float())
        self.refresh_qparams()

    @torch.no_grad()
    def refresh_qparams(self) -> None:
        """Take scale / zero-point from the observer's current state (after observing, or after
        :func:`fxqat.distributed.sync_quant_state` merged the ranks' observers)."""
        scale, zp = self.observer.calculate_qparams()
        scale = scale.to(self.scale.device).reshape(-1).clamp_min(SCALE_EPS)
        self.scale.data.copy_(scale.expand_as(self.scale) if scale.numel() == 1 else scale)
        self.zero_point.copy_(zp.to(self.zero_point).reshape(-1).expand_as(self.zero_point))
        self.initialized.fill_(True)
        self._ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # fake-quant in float32 under AMP: a float16 /
                return self._forward(x.float())  # bfloat16 grid value is not the INT8 model's value
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_range = None  # (min, max) of x when the fast observer measures it: the fast kernel's mask reads it
        if self.observe_enabled and (self.training or self.calibrating or self.always_observe):
            if self._fast and FAST_OBSERVE:
                batch_range = self._observe_fast(x)
            else:
                self.observe(x)
        if not self.fake_quant_enabled or not self._initialized():
            return x
        return self.fake_quant(x, batch_range)

    def _initialized(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    @torch.no_grad()
    def _observe_fast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """torch.ao's MinMax / MovingAverageMinMax (per-tensor or per-channel) observer update and its
        ``_calculate_qparams``, op for op, then the scale / zero-point copy of :meth:`refresh_qparams`. Returns
        ``x``'s own (min, max) when it measured them per tensor without a cast, else None."""
        obs = self.observer
        if x.numel() == 0:
            return None
        lo0, hi0 = obs.min_val, obs.max_val
        rng = self._observe_native(x, lo0, hi0) if NATIVE_OBSERVE else None
        if rng is not None:
            return (rng[0], rng[1]) if self.ch_axis is None else None
        y = x.detach().to(lo0.dtype)
        batch_range = None
        if self.ch_axis is None:
            lo, hi = torch.aminmax(y)
            if x.dtype == y.dtype:
                batch_range = (lo, hi)
        else:
            lo, hi = torch.aminmax(torch.flatten(y.transpose(0, self.ch_axis) if self.ch_axis else y, 1), dim=1)
        if self.ch_axis is None or lo0.numel():
            if self.spec.observer == "minmax":
                lo, hi = torch.min(lo, lo0), torch.max(hi, hi0)
            else:
                c = obs.averaging_constant
                nlo, nhi = lo0 + c * (lo - lo0), hi0 + c * (hi - hi0)
                if self.ch_axis is None:  # the first observation takes the batch's range
                    first = torch.isposinf(lo0) & torch.isneginf(hi0)
                    nlo, nhi = torch.where(first, lo, nlo), torch.where(first, hi, nhi)
                lo, hi = nlo, nhi
        if self.ch_axis is not None:
            lo0.resize_(lo.shape)
            hi0.resize_(hi.shape)
        lo0.copy_(lo)
        hi0.copy_(hi)
        qmin, qmax = obs.quant_min, obs.quant_max
        lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
        if self.spec.symmetric:
            scale = torch.max(torch.max(-lo, hi) / (float(qmax - qmin) / 2), obs.eps)
            zp = torch.full_like(scale, 0 if qmin < 0 else (qmin + qmax) // 2, dtype=torch.int32)
        else:
            scale = torch.max((hi - lo) / float(qmax - qmin), obs.eps)
            zp = torch.clamp(qmin - torch.round(lo / scale).to(torch.int), qmin, qmax)
        scale = scale.reshape(-1).clamp_min(SCALE_EPS)
        self.scale.data.copy_(scale.expand_as(self.scale) if scale.numel() == 1 else scale)
        self.zero_point.copy_(zp.reshape(-1).expand_as(self.zero_point))
        self.mark_initialized()
        return batch_range

    def _observe_native(self, x: torch.Tensor, lo0: torch.Tensor, hi0: torch.Tensor):
        """:meth:`_observe_fast` in one native call where it applies: returns the batch's (min, max) of the last
        row (a ctypes pair), or None with nothing done (then the tensor ops run)."""
        rows = 1 if self.ch_axis is None else x.shape[0] if self.ch_axis == 0 and x.dim() else 0
        sc, zp = self.scale, self.zero_point
        if not (rows and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous()
                and lo0.numel() == hi0.numel() == sc.numel() == zp.numel() == rows
                and lo0.dtype == hi0.dtype == sc.dtype == torch.float32 and zp.dtype == torch.int32
                and lo0.device.type == hi0.device.type == sc.device.type == zp.device.type == "cpu"):
            return None
        lib = native.library()
        if lib is None:
            return None
        rng = (ctypes.c_float * 2)()
        ema, c, qmin, qmax, symmetric, eps = self.native_observer_args()
        if lib.fxqat_observe(x.data_ptr(), rows, x.numel() // rows, lo0.data_ptr(), hi0.data_ptr(), ema, c,
                             int(self.ch_axis is None), qmin, qmax, symmetric, eps, sc.data_ptr(), zp.data_ptr(),
                             rng, torch.get_num_threads()):
            return None  # a NaN or an infinity in x: torch's ops define those cases
        self.mark_initialized()
        return rng

    def native_observer_args(self) -> tuple[int, float, int, int, int, float]:
        """(moving average?, its constant, qmin, qmax, symmetric?, eps): what fxqat.native's observer update takes
        besides the buffers (``fxqat_observe``, ``fxqat_fold_fq``)."""
        obs = self.observer
        ema = self.spec.observer == "moving_average"
        return (int(ema), obs.averaging_constant if ema else 0.0, obs.quant_min, obs.quant_max,
                int(self.spec.symmetric), self._eps())

    def mark_initialized(self) -> None:
        """The quantizer has observed data (``initialized``, and its host copy)."""
        if not self._ready:
            self.initialized.fill_(True)
            self._ready = True

    def _eps(self) -> float:
        """The observer's ``eps`` (a constant buffer) as a float, read from the tensor once."""
        eps = self.__dict__.get("_eps_value")
        if eps is None:
            eps = self.__dict__["_eps_value"] = float(self.observer.eps)
        return eps

    def effective_scale(self) -> torch.Tensor:
        """The scale the forward pass uses: a learned scale is kept positive (``|s|``, at least 1e-8)."""
        if self.spec.learnable:
            return self.scale.abs().clamp_min(SCALE_EPS)
        return self.scale

    @torch.no_grad()
    def fix_learned_scale(self) -> bool:
        """A learned scale becomes a constant buffer holding its positive value (``effective_scale``), for export:
        ONNX Q/DQ then reads a constant scale instead of ``max(|s|, 1e-8)`` computed in the graph (which the weight
        folding and the runtimes' QDQ fusions cannot read). Returns whether this quantizer had a learned scale."""
        if not self.spec.learnable:
            return False
        scale = self.effective_scale().detach().clone()
        del self.scale
        self.register_buffer("scale", scale)
        self.spec = self.spec.with_(learnable=False)
        self._fast = False  # keep the observer path it had (export never observes)
        return True

    def grad_factor(self, x: torch.Tensor) -> float:
        """LSQ's gradient scale 1 / sqrt(N * qmax), N = elements per scale (the tensor, or one channel)."""
        n = x.numel() if self.ch_axis is None else x.numel() // max(x.shape[self.ch_axis], 1)
        return 1.0 / (max(n, 1) * self.qmax) ** 0.5

    def fake_quant(self, x: torch.Tensor, batch_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Quantize → dequantize ``x`` on the current grid, without observing. ``batch_range``: ``x``'s (min, max) if
        already measured (see :func:`fast_fq.fake_quant_per_tensor`).

        A learnable scale trains through LSQ's kernels whenever autograd needs it; otherwise (eval without grad,
        ONNX export, which has no symbolic for the LSQ ops) the plain kernels run on the same (learned) scale —
        their forward values are identical."""
        scale = self.effective_scale()
        learn = self.spec.learnable and torch.is_grad_enabled() and self.scale.requires_grad \
            and not torch.onnx.is_in_onnx_export()
        if learn:  # the LSQ kernels' backward takes float32 only: AMP's float16 activations go through float32
            zp, xf = self.zero_point.float(), x.float()
            if self.ch_axis is None:
                y = torch._fake_quantize_learnable_per_tensor_affine(
                    xf, scale.float(), zp, self.qmin, self.qmax, self.grad_factor(x))
            else:
                y = torch._fake_quantize_learnable_per_channel_affine(
                    xf, scale.float(), zp, self.ch_axis, self.qmin, self.qmax, self.grad_factor(x))
            return y.to(x.dtype)
        scale = scale.detach()
        if self.ch_axis is not None:
            fast = self.ch_axis == 0 and FAST_KERNEL and not torch.onnx.is_in_onnx_export()
            y = fast_fq.fake_quant_per_channel(x, scale, self.zero_point, self.qmin, self.qmax) if fast else None
            if y is not None:
                return y
            return torch.fake_quantize_per_channel_affine(x, scale, self.zero_point, self.ch_axis,
                                                          self.qmin, self.qmax)
        if FAST_KERNEL and fast_fq.eligible(x, self.qmin, self.qmax) and not torch.onnx.is_in_onnx_export():
            return fast_fq.fake_quant_per_tensor(x, scale, self.zero_point, self.qmin, self.qmax,
                                                 batch_range=batch_range)
        return torch.fake_quantize_per_tensor_affine(x, scale, self.zero_point, self.qmin, self.qmax)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) as the forward pass uses them (a learned scale: its positive value)."""
        return self.effective_scale().detach().clone(), self.zero_point.clone()

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes this quantizer gives ``x`` (int32), exactly as its forward rounds them.

        The fake-quant kernels round ``x * (1 / scale)``; ``round(x / scale)`` differs where ``x / scale`` sits on
        a .5 — which per-channel symmetric weights do by construction (scale = max|w| / 127.5): recomputing
        codes by division flipped the extreme weight of some channels by one step (0.8 of an output step)."""
        y = self.fake_quant(x)
        scale = self.effective_scale().detach()
        if self.ch_axis is None:
            scale, zp = scale.reshape(()), self.zero_point.reshape(())
        else:
            shape = [1] * x.dim()
            shape[self.ch_axis] = -1
            scale, zp = scale.reshape(shape), self.zero_point.reshape(shape)
        return (torch.round(y / scale) + zp).to(torch.int32)


def fake_quants(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, FakeQuant)]


def set_observers(model: nn.Module, enabled: bool) -> None:
    for m in fake_quants(model):
        if m.spec.fixed is None:
            m.observe_enabled = enabled

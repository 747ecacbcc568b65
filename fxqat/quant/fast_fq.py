"""Per-tensor 8-bit fake-quantization on CPU through the vectorized quantize / dequantize kernels.

torch's CPU ``fake_quantize_per_tensor_affine`` kernel is scalar: on a yolov8n QAT step it took 17 % of the step,
7× the time of the SiLU it follows. ``quantize_per_tensor`` + ``dequantize`` compute the same values with AVX2 (the
same ``nearbyint(x * (1 / scale)) + zero_point``, clamped, then ``(q - zero_point) * scale``; bit-identical, tested
with ties and odd zero points). The straight-through mask — elements whose unclamped code lies in [qmin, qmax] —
is an interval of ``x`` (the code is monotone in ``x``), so it is two comparisons with thresholds found exactly once
per (scale, zero point) in float32 arithmetic, the kernel's own, and fewer where the batch's min / max show a side
that clips nothing. Where :mod:`fxqat.native` is built, one pass of its fused kernel writes the values and the mask
together (torch's kernel's values, NaN included: quantize + dequantize give a NaN the grid's highest value).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import native

# the dtype whose whole range is (qmin, qmax): only those ranges take this path (others: torch's kernel)
DTYPES = {(0, 255): torch.quint8, (-128, 127): torch.qint8}
_THRESHOLDS: dict[tuple[float, int, int, int], tuple[float, float]] = {}
MASK_SHORTCUT = True  # False: always both comparisons (the path before the batch-range shortcut; benchmarks A/B it)
# True: one pass of fxqat.native's fused kernel (fake-quantized values and the mask together) where the library is
# built and x is contiguous; False: quantize_per_tensor + dequantize + the comparisons (same values, same mask)
NATIVE = True
# True: per-channel fake-quant (QAT's weights) through fxqat.native's kernel (values and mask in one pass; torch's
# per-channel kernel is scalar: 10 ms of a yolov8n step); False: torch's kernel
NATIVE_CHANNEL = True
# True: the backward's masked gradient through fxqat.native (masked_grad); False: torch.where / grad * mask
NATIVE_GRAD = True
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")


def eligible(x: torch.Tensor, qmin: int, qmax: int) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and (qmin, qmax) in DTYPES


def _code(x: np.float32, inv: np.float32, zp: int) -> float:
    return zp + float(np.rint(np.float32(x * inv)))  # the kernel: z + nearbyint(float(x * inv_scale))


def thresholds(scale: float, zp: int, qmin: int, qmax: int) -> tuple[float, float]:
    """(lo, hi): the smallest and largest float32 ``x`` whose code ``z + nearbyint(x * (1 / scale))`` lies in
    [qmin, qmax]; every x between them does too."""
    key = (scale, zp, qmin, qmax)
    if key in _THRESHOLDS:
        return _THRESHOLDS[key]
    s = np.float32(scale)
    inv = np.float32(1.0) / s
    hi = np.float32((qmax - zp + 0.5) * float(s))
    while _code(hi, inv, zp) > qmax:
        hi = np.nextafter(hi, np.float32(-np.inf))
    while _code(np.nextafter(hi, np.float32(np.inf)), inv, zp) <= qmax:
        hi = np.nextafter(hi, np.float32(np.inf))
    lo = np.float32((qmin - zp - 0.5) * float(s))
    while _code(lo, inv, zp) < qmin:
        lo = np.nextafter(lo, np.float32(np.inf))
    while _code(np.nextafter(lo, np.float32(-np.inf)), inv, zp) >= qmin:
        lo = np.nextafter(lo, np.float32(-np.inf))
    if len(_THRESHOLDS) > 4096:  # moving-average scales change every step: keep the cache small
        _THRESHOLDS.clear()
    _THRESHOLDS[key] = (float(lo), float(hi))
    return _THRESHOLDS[key]


def masked_grad(grad: torch.Tensor, mask: torch.Tensor, mul: bool) -> torch.Tensor:
    """The straight-through gradient: ``torch.where(mask, grad, 0.0)`` (``mul=False``) or ``grad * mask`` (``mul``:
    torch's per-channel backward, where a NaN gradient stays NaN), in one pass of fxqat.native's kernel where the
    library is built and both tensors are contiguous CPU tensors of the same shape (torch.where ran at 2-8x the time
    of a copy); the same values bit for bit (tested)."""
    lib = native.library() if NATIVE_GRAD else None
    if lib is None or not (grad.dtype == torch.float32 and grad.device.type == "cpu" and grad.is_contiguous()
                           and mask.is_contiguous() and grad.shape == mask.shape):
        return grad * mask if mul else torch.where(mask, grad, 0.0)
    y = torch.empty_like(grad)
    lib.fxqat_mask_grad(grad.data_ptr(), mask.data_ptr(), y.data_ptr(), grad.numel(), int(mul), torch.get_num_threads())
    return y


class _FakeQuant8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, batch_range=None):
        s, z = float(scale.reshape(())), int(zero_point.reshape(()))
        lo = hi = 0.0
        below = above = False  # which sides of the range the straight-through mask checks
        if ctx.needs_input_grad[0]:
            lo, hi = thresholds(s, z, qmin, qmax)
            if MASK_SHORTCUT:
                bmin, bmax = (float(v) for v in (batch_range if batch_range is not None else torch.aminmax(x)))
                below, above = not bmin >= lo, not bmax <= hi  # NaN: neither holds, so both sides are checked
            else:
                below = above = True
        ctx.pass_all = not (below or above)  # nothing clips (or no gradient): the identity
        lib = native.library() if NATIVE and x.is_contiguous() else None
        if lib is not None:  # values and mask in one pass
            y = torch.empty_like(x)
            mask = torch.empty_like(x, dtype=torch.bool) if below or above else None
            lib.fxqat_fq8(x.data_ptr(), y.data_ptr(), None if mask is None else mask.data_ptr(), x.numel(), s, z,
                          qmin, qmax, lo, hi, int(below) | 2 * int(above), torch.get_num_threads())
        else:
            y = torch.quantize_per_tensor(x, s, z, DTYPES[(qmin, qmax)]).dequantize()
            if below and above:
                mask = torch.ge(x, lo).logical_and_(torch.le(x, hi))
            else:  # one side of the range clips in this batch: one comparison
                mask = torch.ge(x, lo) if below else torch.le(x, hi) if above else None
        if mask is not None:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.pass_all:
            return grad, None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return masked_grad(grad, mask, mul=False), None, None, None, None, None


def fake_quant_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                          qmax: int, batch_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)`` for an :func:`eligible` ``x``:
    the same values and the same straight-through gradient. ``batch_range``: ``x``'s (min, max) when already known
    (the observer's ``aminmax`` of this very tensor); it decides which sides of the range need the mask: on a batch
    that clips on one side only (SiLU outputs never go below the range) the mask is one comparison, and on one that
    clips nowhere there is none."""
    return _FakeQuant8.apply(x, scale, zero_point, qmin, qmax, batch_range)


class _FakeQuantChannel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, lib):
        rows = x.shape[0]
        y = torch.empty_like(x)
        mask = torch.empty_like(x, dtype=torch.bool) if ctx.needs_input_grad[0] else None
        lib.fxqat_fq8c(x.data_ptr(), y.data_ptr(), None if mask is None else mask.data_ptr(), rows, x.numel() // rows,
                       scale.data_ptr(), zero_point.data_ptr(), qmin, qmax, torch.get_num_threads())
        if mask is not None:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad, mask, mul=True), None, None, None, None, None  # torch's cachemask backward


def fake_quant_per_channel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """``torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, qmin, qmax)`` (channels on axis 0: QAT's
    weights) in one pass of fxqat.native's kernel, values and mask together: the same values and gradient, bit for bit
    (tested). None where it does not apply (the caller then runs torch's op): no native library, or ``x`` not a
    contiguous float32 CPU tensor with float32 scales and int32 zero points, one per row."""
    if not (NATIVE_CHANNEL and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() and x.is_contiguous()
            and scale.dtype == torch.float32 and zero_point.dtype == torch.int32 and scale.is_contiguous()
            and zero_point.is_contiguous() and scale.numel() == zero_point.numel() == x.shape[0] > 0
            and scale.device.type == zero_point.device.type == "cpu"):
        return None
    lib = native.library()
    return None if lib is None else _FakeQuantChannel.apply(x, scale, zero_point, qmin, qmax, lib)

"""QAT's BN-folded weight, observed and fake-quantized in one native pass per step.

A :class:`~fxqat.modules.conv_bn_act.ConvBnAct` training with live BatchNorm convolves with ``q(w · f) / f``, ``f`` =
``gamma / sqrt(running_var + eps)`` per output channel. As tensor ops that is a multiply, the observer's min / max,
the per-channel fake-quant and a divide forward, and about nine passes over the weight backward (the divide's and
the multiply's gradients for ``w`` and ``f``, the straight-through mask, two reductions): about 20 of the 47 ms of a
64 × 1 yolov8n QAT step on a 2-core EPYC went there. ``fxqat_fold_fq`` does the forward in two passes per row (range,
then values and mask) and ``fxqat_fold_fq_grad`` the backward in one.

Same results: the forward (values, mask, the observer's state, scale and zero point) and the weight's gradient equal
the tensor ops' bit for bit; ``f``'s gradient is summed in double, so it agrees with torch's float sums within their
rounding (tested). Where the path does not apply (no native library, a learnable or non-min/max observer, hooks,
autocast, a NaN or an infinity in ``w · f``, one of the fast-path switches off) the caller runs the tensor ops.
"""

from __future__ import annotations

import torch

from .. import native
from . import fake_quant as fqmod
from . import fast_fq

NATIVE_FOLD = True  # False: the tensor ops (benchmarks/qat_step.py A/Bs it)


class _Fails(Exception):
    """``w · f`` holds a NaN or an infinity: nothing was written; the tensor ops define those cases."""


class _FoldedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, f, fq, lib, observe: bool):
        rows, cols = w.shape[0], w.numel() // w.shape[0]
        obs = fq.observer
        y = torch.empty_like(w)
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        mask = torch.empty_like(w, dtype=torch.bool) if grad else None
        if lib.fxqat_fold_fq(w.data_ptr(), f.data_ptr(), rows, cols, int(observe), obs.min_val.data_ptr(),
                             obs.max_val.data_ptr(), *fq.native_observer_args(), fq.scale.data_ptr(),
                             fq.zero_point.data_ptr(), y.data_ptr(), None if mask is None else mask.data_ptr(),
                             torch.get_num_threads()):
            raise _Fails
        if observe:
            fq.mark_initialized()
        if mask is not None:
            ctx.save_for_backward(w, f, y, mask)
        ctx.lib = lib
        return y

    @staticmethod
    def backward(ctx, g):
        w, f, y, mask = ctx.saved_tensors
        g = g.contiguous()
        dw, df = torch.empty_like(w), torch.empty_like(f)
        ctx.lib.fxqat_fold_fq_grad(g.data_ptr(), w.data_ptr(), y.data_ptr(), mask.data_ptr(), f.data_ptr(),
                                   w.shape[0], w.numel() // w.shape[0], dw.data_ptr(), df.data_ptr(),
                                   torch.get_num_threads())
        return dw, df, None, None, None


def _applies(fq, w: torch.Tensor, f: torch.Tensor) -> bool:
    from torch.nn.modules import module as m

    obs = fq.observer
    hooks = fq._forward_hooks or fq._forward_pre_hooks or m._global_forward_hooks or m._global_forward_pre_hooks
    return (NATIVE_FOLD and fqmod.FAST_OBSERVE and fqmod.NATIVE_OBSERVE and fqmod.FAST_KERNEL
            and fast_fq.NATIVE_CHANNEL and fq.ch_axis == 0 and fq._fast and fq.fake_quant_enabled
            and not hooks and not torch.onnx.is_in_onnx_export()
            and w.device.type == "cpu" and w.dtype == f.dtype == torch.float32 and w.is_contiguous()
            and f.is_contiguous() and w.dim() > 1 and f.shape == (w.shape[0],)
            and not torch.is_autocast_enabled("cpu")
            and obs.min_val.shape == obs.max_val.shape == fq.scale.shape == (w.shape[0],)
            and fq.scale.dtype == obs.min_val.dtype == torch.float32 and fq.zero_point.dtype == torch.int32)


def folded_fake_quant(fq, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor | None:
    """``fq(w * f4) / f4`` (``f4`` = ``f`` per output channel) with ``fq`` a per-channel weight
    :class:`~fxqat.quant.fake_quant.FakeQuant`, observing as ``fq`` would; None where it does not apply (see the
    module docstring): the caller then runs those ops."""
    if not _applies(fq, w, f):
        return None
    lib = native.library()
    if lib is None:
        return None
    observe = fq.observe_enabled and (fq.training or fq.calibrating or fq.always_observe)
    if not observe and not fq._initialized():
        return None
    try:
        return _FoldedFakeQuant.apply(w, f, fq, lib, observe)
    except _Fails:
        return None

"""Every import of ``torch.ao.quantization`` lives here.

``torch.ao.quantization`` is deprecated upstream (pytorch/ao#2259) but present in torch 2.14.1; fxqat uses its
observers (min/max, moving-average, histogram) and, where a user asks for one, a torch.ao ``QConfigMapping``.
If it is missing, fxqat fails here with one clear message instead of deep inside a pass.
"""

from __future__ import annotations

import warnings

from ..errors import BackendError

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import QConfig as AOQConfig
        from torch.ao.quantization import QConfigMapping
        from torch.ao.quantization.observer import (
            HistogramObserver,
            MinMaxObserver,
            MovingAverageMinMaxObserver,
            MovingAveragePerChannelMinMaxObserver,
            PerChannelMinMaxObserver,
        )
except ImportError as e:  # pragma: no cover - depends on the installed torch
    raise BackendError(
        f"fxqat needs torch.ao.quantization (observers, QConfigMapping), which this torch lacks ({e}); "
        "install torch 2.4 … 2.14.1: pip install torch==2.14.1 torchvision==0.29.1") from e

import torch

OBSERVERS = ("minmax", "moving_average", "histogram", "percentile", "mse")


def make_observer(kind: str, qmin: int, qmax: int, symmetric: bool, ch_axis: int | None,
                  averaging_constant: float = 0.01):
    """A torch.ao observer computing scale/zero-point for the integer range [qmin, qmax]."""
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    if ch_axis is not None:
        qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        if kind == "moving_average":
            return MovingAveragePerChannelMinMaxObserver(ch_axis=ch_axis, dtype=dtype, qscheme=qscheme,
                                                         quant_min=qmin, quant_max=qmax,
                                                         averaging_constant=averaging_constant)
        return PerChannelMinMaxObserver(ch_axis=ch_axis, dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    if kind == "minmax":
        return MinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    if kind == "moving_average":
        return MovingAverageMinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax,
                                           averaging_constant=averaging_constant)
    if kind in ("histogram", "percentile", "mse"):
        # torch.ao's HistogramObserver searches the clipping range minimizing the L2 quantization error.
        return HistogramObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    raise BackendError(f"observer {kind!r}: valid choices are {', '.join(OBSERVERS)}")


__all__ = ["AOQConfig", "QConfigMapping", "make_observer", "OBSERVERS"]

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
        from torch.ao.quantization.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
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

from .observers import MSEObserver, PercentileObserver

OBSERVERS = ("minmax", "moving_average", "histogram", "percentile", "mse")


# torch.ao observer classes → fxqat observer names (the torch.ao bridge maps by class, not by name). Subclasses
# first: a MovingAverageMinMaxObserver is a MinMaxObserver.
AO_OBSERVER_KINDS = (
    (FusedMovingAvgObsFakeQuantize, "moving_average"),  # torch.ao's default QAT fake-quant
    (MovingAveragePerChannelMinMaxObserver, "moving_average"),
    (MovingAverageMinMaxObserver, "moving_average"),
    (PerChannelMinMaxObserver, "minmax"),
    (MinMaxObserver, "minmax"),
    (HistogramObserver, "histogram"),
)


def ao_observer_kind(obj) -> str | None:
    """fxqat's observer name for a torch.ao observer or fake-quantize instance (its activation_post_process for a
    ``FakeQuantize``), or None when fxqat has no equivalent."""
    if isinstance(obj, FakeQuantize) and not isinstance(obj, FusedMovingAvgObsFakeQuantize):
        obj = obj.activation_post_process
    for cls, kind in AO_OBSERVER_KINDS:
        if isinstance(obj, cls):
            return kind
    return None


def make_observer(kind: str, qmin: int, qmax: int, symmetric: bool, ch_axis: int | None,
                  averaging_constant: float = 0.01, percentile: float = 99.99):
    """An observer computing scale/zero-point for the integer range [qmin, qmax] (torch.ao's, or fxqat's clipping
    observers for ``percentile`` and ``mse``)."""
    # torch.ao's observers check the range against the dtype: wider than 8 bits needs qint32
    dtype = torch.qint32 if qmax - qmin > 255 else torch.qint8 if qmin < 0 else torch.quint8
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
    if kind == "histogram":  # torch.ao's: searches the clipping range minimizing the L2 quantization error
        return HistogramObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
    if kind == "percentile":
        return PercentileObserver(qmin, qmax, symmetric, percentile)
    if kind == "mse":
        return MSEObserver(qmin, qmax, symmetric)
    raise BackendError(f"observer {kind!r}: valid choices are {', '.join(OBSERVERS)}")


__all__ = ["AOQConfig", "QConfigMapping", "make_observer", "ao_observer_kind", "OBSERVERS"]

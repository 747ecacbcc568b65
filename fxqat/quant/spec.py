"""Quantization specs: what one tensor (weights or an activation) is quantized to. Frozen and validated."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import QConfigError
from .backend import OBSERVERS


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (+ '…'): error messages quote user values, never whole documents."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "…"


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = False
    per_channel: int | None = None  # channel axis for per-channel scales, None = per-tensor
    observer: str = "moving_average"
    learnable: bool = False  # LSQ-style trainable scale
    fixed: tuple[float, int] | None = None  # fixed (scale, zero_point), e.g. [0, 1] images: (1/255, 0)
    percentile: float = 99.99  # observer "percentile": clip at this percentile of |x| (of x at 100 - p and p)

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 16:
            raise QConfigError(f"bits={short(self.bits)}: must be an integer from 2 to 16")
        if not isinstance(self.observer, str) or self.observer not in OBSERVERS:
            raise QConfigError(f"observer={short(self.observer)}: valid choices are {', '.join(OBSERVERS)}")
        for name in ("symmetric", "learnable"):
            if not isinstance(getattr(self, name), bool):
                raise QConfigError(f"{name}={short(getattr(self, name))}: must be true or false")
        if self.per_channel is not None and (not isinstance(self.per_channel, int) or isinstance(
                self.per_channel, bool) or self.per_channel < 0):
            raise QConfigError(f"per_channel={short(self.per_channel)}: a channel axis (0, 1, ...) or null")
        if self.per_channel is not None and self.observer in ("histogram", "percentile", "mse"):
            raise QConfigError(f"observer={self.observer!r} is per-tensor only; use minmax or moving_average "
                               "with per_channel")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) or \
                not 90 <= self.percentile <= 100:
            raise QConfigError(f"percentile={short(self.percentile)}: a number from 90 to 100")
        if self.fixed is not None:
            f = self.fixed
            ok = isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], (int, float)) and \
                not isinstance(f[0], bool) and math.isfinite(f[0]) and f[0] > 0 and isinstance(f[1], int) and \
                not isinstance(f[1], bool)
            if not ok:
                raise QConfigError(f"fixed={short(f)}: a [scale, zero_point] pair, scale > 0, zero_point an integer")
            if not self.qmin <= f[1] <= self.qmax:
                raise QConfigError(f"fixed={short(f)}: zero_point outside the {self.label()} grid "
                                   f"[{self.qmin}, {self.qmax}]")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def label(self) -> str:
        return f"{'s' if self.symmetric else 'u'}{self.bits}{'c' if self.per_channel is not None else ''}"

    def with_(self, **kw) -> QuantSpec:
        return replace(self, **kw)


WEIGHT_INT8 = QuantSpec(bits=8, symmetric=True, per_channel=0, observer="minmax")
ACT_UINT8 = QuantSpec(bits=8, symmetric=False, observer="moving_average")


def image_grid(spec: QuantSpec) -> QuantSpec:
    """The image input's grid: [0, 1] fixed onto 0..qmax (8-bit unsigned: scale 1/255; signed: 1/127, zp 0)."""
    return spec.with_(fixed=(1.0 / spec.qmax, 0))


IMAGE_INPUT = image_grid(QuantSpec(bits=8, symmetric=False, observer="minmax"))


def sigmoid_grid(spec: QuantSpec) -> QuantSpec:
    """A sigmoid output's grid: fixed over (0, 1) by bits and signedness (8-bit unsigned: scale 1/255, zp 0)."""
    return spec.with_(fixed=(1.0 / (spec.qmax - spec.qmin), spec.qmin))


SIGMOID_UINT8 = sigmoid_grid(QuantSpec(bits=8, symmetric=False, observer="minmax"))


@dataclass(frozen=True)
class NodeQSpec:
    """The per-node quantization decision, ``node.meta["fxqat"].qspec``: written by ``AnnotateQConfig``, read by
    quantizer insertion, INT8 lowering and the ONNX export (and nothing else decides).

    ``weight``: spec of the node's weights (convs) or None; ``output``: spec of the grid its output lies on, or None
    to leave the output float. ``grid``: name of the node that owns that grid (torchao's SharedQuantizationSpec
    idea): the node itself, or the first producer of its sharing class. ``shared``: the output lies on its input's
    grid with no quantizer of its own (concat, maxpool, nearest upsample, split).
    """

    weight: QuantSpec | None = None
    output: QuantSpec | None = None
    shared: bool = False
    grid: str | None = None
    preact: QuantSpec | None = None  # conv output before its activation (ONNX Runtime's QLinearConv needs it)
    sigmoid: QuantSpec | None = None  # SiLU's sigmoid output (ONNX Runtime's QLinearSigmoid + QLinearMul)
    source: str = "default"  # which rule set it (for reports)

    def label(self) -> str:
        if self.shared:
            return "shared"
        if self.weight is None and self.output is None:
            return "float"
        w = f"w{self.weight.label()}" if self.weight else "wf"
        a = f"a{self.output.label()}" if self.output else "af"
        return f"{w}/{a}"

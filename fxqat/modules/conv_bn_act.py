"""``ConvBnAct``: the fused QAT module an Ultralytics ``Conv`` (conv → BatchNorm → SiLU) becomes.

BN folding for training (as in Jacob et al. 2018 and torch.ao's ``_ConvBnNd``): the conv runs with the folded,
fake-quantized weight ``w * gamma / sqrt(running_var + eps)``; its output is rescaled back and passed through the
BatchNorm, which keeps using batch statistics and updating its running statistics — until :meth:`freeze_bn`, after
which (and in eval mode) the module computes exactly the folded conv ``conv(x, q(w_fold)) + b_fold`` that
:func:`fxqat.convert` lowers to an INT8 kernel. ``bn`` and ``act`` are optional (SPPF ``cv1`` has no activation,
Detect's last 1×1 convs have neither).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.fake_quant import FakeQuant
from ..quant.folded_fq import folded_fake_quant
from ..quant.spec import QuantSpec


class SplitSiLU(nn.Module):
    """SiLU as ``x * q(sigmoid(x))``: the sigmoid output on its own grid, so that ONNX Runtime runs the activation
    as QLinearSigmoid + QLinearMul instead of dequantize → float SiLU → quantize."""

    def __init__(self, sigmoid_fq: FakeQuant):
        super().__init__()
        self.sigmoid_fq = sigmoid_fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid_fq(torch.sigmoid(x))


ACT_KINDS = {nn.SiLU: "swish", SplitSiLU: "swish", nn.ReLU: "relu", nn.Identity: "none"}


class ConvBnAct(nn.Module):
    # training with live BN: rescale the fake-quantized folded weight by 1 / f instead of the conv output (float32
    # rounding differs: ~1e-6 relative, tested). False: torch.ao's order (output / f), the reference for the tests and
    # benchmarks/qat_step.py.
    RESCALE_WEIGHT = True

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: nn.Module | None,
                 weight_spec: QuantSpec | None = None):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.act = act if act is not None else nn.Identity()
        self.weight_fq = None
        self.preact_fq = None
        self.bn_frozen = False
        if weight_spec is not None:
            self.set_weight_spec(weight_spec)

    def set_weight_spec(self, spec: QuantSpec | None) -> None:
        if spec is None:
            self.weight_fq = None
            return
        self.weight_fq = FakeQuant(spec, channels=self.conv.weight.shape[spec.per_channel] if spec.per_channel is not None
                                   else None)
        self.weight_fq.always_observe = True

    def set_preact_spec(self, spec: QuantSpec | None, sigmoid: QuantSpec | None = None) -> None:
        """Quantize the conv(+BN) output before the activation too (None: don't); with ``sigmoid``, SiLU becomes
        :class:`SplitSiLU` with its sigmoid output quantized to that spec."""
        self.preact_fq = FakeQuant(spec) if spec is not None and self.act_kind != "none" else None
        if isinstance(self.act, SplitSiLU) and (sigmoid is None or self.preact_fq is None):
            self.act = nn.SiLU()
        elif sigmoid is not None and self.preact_fq is not None and self.act_kind == "swish":
            self.act = SplitSiLU(FakeQuant(sigmoid))

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        return self.act(self.preact_fq(y) if self.preact_fq is not None else y)

    @property
    def act_kind(self) -> str:
        """The activation as oneDNN's post-op names it: swish | relu | none | other."""
        return next((k for cls, k in ACT_KINDS.items() if isinstance(self.act, cls)), "other")

    def freeze_bn(self, frozen: bool = True) -> ConvBnAct:
        """Stop (or resume) BatchNorm statistics updates; frozen, training computes the folded conv exactly."""
        self.bn_frozen = frozen
        return self

    def _bn_factor(self) -> torch.Tensor:
        bn = self.bn
        return bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with BatchNorm folded in, from the running statistics."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, (b if b is not None else torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))
        f = self._bn_factor()
        b = torch.zeros_like(self.bn.running_mean) if b is None else b
        return w * f.reshape(-1, 1, 1, 1), self.bn.bias + (b - self.bn.running_mean) * f

    @torch.no_grad()
    def _deploy_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(folded weight, folded bias) with the weight quantizer's grid set from the folded weight, as the QAT
        forward in eval sets it (the one place convert and export fold BN)."""
        w, b = self.folded()
        if self.weight_fq is not None:
            self.weight_fq.observe(w)
        return w, b.detach()

    @torch.no_grad()
    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(int32 codes, per-output-channel float scales, folded bias): what an INT8 kernel needs. The codes are the
        ones the fake-quantizer rounds to (``FakeQuant.codes``), not ``round(w / scale)``, which differs on .5."""
        w, b = self._deploy_weight()
        fq = self.weight_fq
        scale = fq.qparams()[0].reshape(-1).float()  # a learned scale: its positive value
        if scale.numel() == 1:
            scale = scale.expand(w.shape[0]).contiguous()
        if bool((fq.zero_point != 0).any()):
            from ..errors import ConvertError

            raise ConvertError("INT8 conversion needs symmetric weights (zero_point 0); set weight symmetric: true")
        return fq.codes(w), scale, b

    @torch.no_grad()
    def deploy_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(folded weight on the weight quantizer's grid, folded bias): the constants a QDQ export stores. ONNX's
        round(w / scale) of a value already on the grid gives exactly the QAT model's codes."""
        w, b = self._deploy_weight()
        return (self.weight_fq.fake_quant(w) if self.weight_fq is not None else w).detach(), b

    def _qw(self, w: torch.Tensor) -> torch.Tensor:
        return self.weight_fq(w) if self.weight_fq is not None else w

    def _conv(self, x, w, b):
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None or not self.training or self.bn_frozen:
            w, b = self.folded()
            return self._act(self._conv(x, self._qw(w), b))
        f = self._bn_factor()
        if ConvBnAct.RESCALE_WEIGHT:  # conv(x, q(w f) / f) = conv(x, q(w f)) / f per output channel: the division
            # runs on the weight, not on the activation (no full-size pass forward nor backward)
            w = folded_fake_quant(self.weight_fq, self.conv.weight, f) if self.weight_fq is not None else None
            if w is None:  # the tensor ops (folded_fake_quant: the same values in one native pass, where it applies)
                f4 = f.reshape(-1, *[1] * (self.conv.weight.dim() - 1))
                w = self._qw(self.conv.weight * f4) / f4
            return self._act(self.bn(self._conv(x, w, self.conv.bias)))
        y = self._conv(x, self._qw(self.conv.weight * f.reshape(-1, 1, 1, 1)), None)
        y = y / f.reshape(1, -1, 1, 1)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        return self._act(self.bn(y))

    def extra_repr(self) -> str:
        return f"act={self.act_kind}, bn={'frozen' if self.bn_frozen else ('yes' if self.bn is not None else 'no')}"


class FrozenConvBnAct(nn.Module):
    """A :class:`ConvBnAct`'s eval forward with its folded, fake-quantized weight computed once: the same arithmetic
    bit for bit, without folding BatchNorm and fake-quantizing the weight on every call. ``fxqat.convert`` runs the
    convs that stay float (weights wider than the INT8 kernels take, float qconfig rules) as this."""

    def __init__(self, m: ConvBnAct):
        super().__init__()
        w, b = m.deploy_weight()
        self.register_buffer("weight", w.detach().clone())
        self.register_buffer("bias", b.detach().clone())
        c = m.conv
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups
        self.act, self.preact_fq = m.act, m.preact_fq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.act(self.preact_fq(y) if self.preact_fq is not None else y)

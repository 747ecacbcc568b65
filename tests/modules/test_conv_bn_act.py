import copy

import pytest
import torch
from ultralytics.nn.modules.conv import Conv

from fxqat.modules import ConvBnAct
from fxqat.modules.conv_bn_act import SplitSiLU
from fxqat.quant.spec import ACT_UINT8, SIGMOID_UINT8, WEIGHT_INT8

# tolerance: folding reorders float32 products (w*f then conv vs conv then *f): |err| <= 1e-4 on O(1) outputs


def _pair(act=True, seed=0):
    torch.manual_seed(seed)
    c = Conv(8, 16, 3, 2, act=act)
    with torch.no_grad():
        c.bn.running_mean.normal_()
        c.bn.running_var.uniform_(0.5, 2)
        c.bn.weight.uniform_(0.5, 1.5)
        c.bn.bias.normal_()
    ref = copy.deepcopy(c)
    fused = ConvBnAct(copy.deepcopy(c.conv), copy.deepcopy(c.bn), c.act if act else None)
    return ref, fused


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_fused_equals_float_conv_bn_act(act, train):
    ref, fused = _pair(act)
    ref.train(train)
    fused.train(train)
    x = torch.randn(4, 8, 16, 16)
    assert torch.allclose(ref(x), fused(x), atol=1e-4)
    assert torch.allclose(ref.bn.running_mean, fused.bn.running_mean, atol=1e-6)
    assert torch.allclose(ref.bn.running_var, fused.bn.running_var, atol=1e-6)


def test_freeze_bn_stops_statistics_and_folds_exactly():
    ref, fused = _pair()
    fused.train()
    fused.freeze_bn()
    before = fused.bn.running_mean.clone(), fused.bn.running_var.clone()
    x = torch.randn(4, 8, 16, 16)
    y = fused(x)
    assert torch.equal(before[0], fused.bn.running_mean) and torch.equal(before[1], fused.bn.running_var)
    ref.eval()
    assert torch.allclose(y, ref(x), atol=1e-4)


def test_weight_fake_quant_and_gradients():
    _, fused = _pair()
    fused.set_weight_spec(WEIGHT_INT8)
    fused.train()
    x = torch.randn(2, 8, 16, 16)
    fused(x).sum().backward()
    assert fused.conv.weight.grad is not None and fused.conv.weight.grad.abs().sum() > 0
    assert fused.bn.weight.grad is not None
    w, _ = fused.folded()
    scale = fused.weight_fq.scale
    assert scale.shape == (16,)
    q = fused.weight_fq(w.detach())
    steps = (q / scale.view(-1, 1, 1, 1))  # per-channel symmetric: integer multiples of the scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)


def test_split_silu_quantizes_the_sigmoid_on_its_fixed_grid():
    _, fused = _pair()
    fused.set_preact_spec(ACT_UINT8, SIGMOID_UINT8)
    assert isinstance(fused.act, SplitSiLU) and fused.act_kind == "swish"
    fused.eval()
    fused.preact_fq.observe(torch.linspace(-6, 6, 100))
    x = torch.randn(2, 8, 16, 16)
    y = fused(x)
    w, b = fused.folded()
    pre = fused.preact_fq(torch.nn.functional.conv2d(x, w, b, 2, 1))
    s = torch.sigmoid(pre)
    qs = torch.round(s * 255) / 255  # the fixed grid 1/255, zero point 0
    assert torch.allclose(y, pre * qs, atol=1e-6)
    assert (y - pre * s).abs().max() <= pre.abs().max() / 510 + 1e-6  # at most half a step of the sigmoid grid
    fused.set_preact_spec(ACT_UINT8, None)  # back to a plain SiLU
    assert isinstance(fused.act, torch.nn.SiLU)


@pytest.mark.parametrize("bias", [False, True])
def test_weight_side_rescale_matches_output_rescale(bias, monkeypatch):
    """Training with live BN: conv(x, q(w f) / f) against torch.ao's conv(x, q(w f)) / f — outputs, BN statistics
    and gradients agree to float32 rounding (rtol 1e-5 after BN's normalization; the quantized codes are the same
    because q(w f) is computed identically)."""
    _, a = _pair()
    if bias:
        a.conv.bias = torch.nn.Parameter(torch.randn(16) * 0.1)
    a.set_weight_spec(WEIGHT_INT8)
    a.set_preact_spec(None)
    b = copy.deepcopy(a)
    a.train(), b.train()
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(ConvBnAct, "RESCALE_WEIGHT", True)
    ya = a(x)
    (ya * torch.linspace(-1, 1, ya.numel()).reshape(ya.shape)).sum().backward()
    monkeypatch.setattr(ConvBnAct, "RESCALE_WEIGHT", False)
    yb = b(x)
    (yb * torch.linspace(-1, 1, yb.numel()).reshape(yb.shape)).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.bn.running_mean, b.bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.bn.running_var, b.bn.running_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.weight_fq.scale, b.weight_fq.scale)
    for pa, pb in zip(a.parameters(), b.parameters()):  # (a conv bias before BN has a zero gradient in exact
        # arithmetic: both give float32 noise of ~1e-5 there, hence atol 1e-4; the other gradients are O(1)-O(100))
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [None, 8, 16])
@pytest.mark.parametrize("preact", [False, True])
def test_frozen_equals_eval_forward_bit_for_bit(bits, preact):
    """FrozenConvBnAct (what convert runs for convs that stay float) computes the eval forward exactly (tolerance 0)."""
    from fxqat.modules.conv_bn_act import FrozenConvBnAct

    _, fused = _pair(seed=3)
    if bits is not None:
        fused.set_weight_spec(WEIGHT_INT8.with_(bits=bits))
    if preact:
        fused.set_preact_spec(ACT_UINT8, SIGMOID_UINT8)
    x = torch.randn(2, 8, 16, 16)
    fused.train()
    fused(x)  # observers see data
    fused.eval()
    frozen = FrozenConvBnAct(fused)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), fused(x), rtol=0, atol=0)
    assert not list(frozen.parameters())  # constants: nothing left to train or fold

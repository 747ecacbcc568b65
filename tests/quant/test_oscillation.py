"""Oscillation dampening (fxqat.quant.oscillation): the term, its gradient, its schedule, its validation, and that
train_qat(dampen=...) puts it into the loss the optimizer steps on."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fxqat.errors import FxqatError
from fxqat.modules.conv_bn_act import ConvBnAct
from fxqat.quant.oscillation import (DAMPEN_MAX, Dampening, check_dampen, cosine_ramp, dampening_term,
                                     latent_codes)
from fxqat.quant.spec import QuantSpec

W4 = QuantSpec(bits=4, symmetric=True, per_channel=0, observer="minmax", learnable=True)


def unit(bn: bool = True, seed: int = 0) -> ConvBnAct:
    torch.manual_seed(seed)
    m = ConvBnAct(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4) if bn else None, nn.SiLU(), W4)
    if bn:
        with torch.no_grad():
            m.bn.weight.uniform_(0.5, 2.0)
            m.bn.running_var.uniform_(0.5, 2.0)
    m.eval()
    m(torch.rand(1, 3, 8, 8))  # the weight quantizer takes its per-channel scale from the folded weight
    return m


def put_on_grid(m: ConvBnAct, offset: float = 0.0) -> None:
    """Set the latent weights so the folded weight sits ``offset`` grid steps from its grid points."""
    fq = m.weight_fq
    s = fq.effective_scale().detach().reshape(-1, 1, 1, 1)
    f = m._bn_factor().detach().reshape(-1, 1, 1, 1) if m.bn is not None else 1.0
    codes = torch.randint(fq.qmin + 1, fq.qmax - 1, m.conv.weight.shape).float()
    with torch.no_grad():
        m.conv.weight.copy_((codes + offset) * s / f)


def test_the_term_is_zero_on_the_grid_and_positive_off_it():
    m = unit()
    put_on_grid(m)
    assert dampening_term(m).item() == pytest.approx(0.0, abs=1e-8)
    put_on_grid(m, 0.3)  # every weight 0.3 steps off: 0.09 per weight
    assert dampening_term(m).item() == pytest.approx(0.09 * m.conv.weight.numel(), rel=1e-4)


def test_the_term_is_measured_on_the_bn_folded_weight():
    """The quantizer rounds conv.weight * gamma / sqrt(var + eps): on that grid the term is 0 even though the raw
    conv weights are not on any grid."""
    m = unit()
    put_on_grid(m)
    f = m._bn_factor().detach()
    assert not torch.allclose(f, torch.ones_like(f), atol=0.1)
    raw = m.conv.weight / m.weight_fq.effective_scale().detach().reshape(-1, 1, 1, 1)
    assert ((raw - raw.round()) ** 2).sum() > 0.5  # the unfolded weights are off the grid
    assert dampening_term(m).item() == pytest.approx(0.0, abs=1e-8)


def test_weights_beyond_the_grid_range_are_left_to_the_clipping():
    m = unit(bn=False)
    put_on_grid(m)
    with torch.no_grad():
        m.conv.weight.mul_(5.0)  # codes up to 5 * 6 = 30, far outside [-8, 7]
    codes = latent_codes(m)
    inside = (codes >= -8) & (codes <= 7)
    expect = ((codes - codes.round()) ** 2)[inside].sum()  # only the in-range weights count (all on 5 * integers)
    assert dampening_term(m).item() == pytest.approx(expect.item(), abs=1e-4)
    m.conv.weight.grad = None
    dampening_term(m).backward()
    assert torch.all(m.conv.weight.grad[~inside] == 0)


def test_the_gradient_moves_latent_weights_toward_the_nearest_grid_point_not_the_scale():
    m = unit()
    put_on_grid(m, 0.0)
    with torch.no_grad():
        m.conv.weight.add_(torch.empty_like(m.conv.weight).uniform_(-1, 1) * 0.3 * m.conv.weight.abs().mean())
    before = latent_codes(m).detach()
    dist0 = (before - before.round()).abs()
    dampening_term(m).backward()
    assert m.weight_fq.scale.grad is None  # the scale is a constant in the term
    with torch.no_grad():
        m.conv.weight.sub_(0.05 * m.conv.weight.grad / m.conv.weight.grad.abs().max() * m.conv.weight.abs().mean())
    after = latent_codes(m).detach()
    moved = (after - before).abs() > 1e-6
    assert moved.float().mean() > 0.9
    dist1 = (after - before.round()).abs()
    assert torch.all(dist1[moved] < dist0[moved] + 1e-6)  # each weight got closer to its own nearest grid point
    assert (dist1 < dist0 - 1e-6).float().mean() > 0.9


def test_cosine_schedule_rises_from_zero_to_the_weight():
    assert cosine_ramp(0.01, 0.0) == 0.0
    assert cosine_ramp(0.01, 1.0) == pytest.approx(0.01)
    assert cosine_ramp(0.01, 0.5) == pytest.approx(0.005)
    assert cosine_ramp(0.01, 2.0) == pytest.approx(0.01) and cosine_ramp(0.01, -1) == 0.0
    d = Dampening(0.02)
    lams = []
    for epoch in range(2):
        for _ in range(4):
            d.on_batch_start(epoch, 2, 4)
            lams.append(d.lam())
    assert lams[0] == 0.0 and all(a < b for a, b in zip(lams, lams[1:]))
    assert lams[-1] == pytest.approx(0.02 * 0.5 * (1 - math.cos(math.pi * 7 / 8)))


def test_the_loss_term_scales_with_lambda_t_and_the_batch():
    m = unit()
    d = Dampening(0.1)
    d.progress = 1.0
    assert d(m, 8).item() == pytest.approx(0.1 * 8 * dampening_term(m).item(), rel=1e-5)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-100, 100), st.text(max_size=3),
                 st.booleans(), st.none()))
def test_dampen_values_are_checked(v):
    ok = not isinstance(v, (bool, str, type(None))) and math.isfinite(v) and 0 <= v <= DAMPEN_MAX
    if ok:
        assert check_dampen(v) == float(v)
    else:
        with pytest.raises(FxqatError, match=r"dampen=.*from 0 \(off\) to 10"):
            check_dampen(v)


def _codes(m):
    return m.weight_fq.codes(m.folded()[0])


def test_freezing_freezes_oscillating_weights_and_keeps_their_codes_across_optimizer_steps():
    from fxqat.quant.oscillation import Freezer

    m = unit()
    m.train()
    m.bn_frozen = True  # the folded conv; gamma still trains
    put_on_grid(m, 0.4)  # 0.4 steps above each grid point: a +0.2 step crosses the threshold, -0.2 comes back
    fz = Freezer(0.3, momentum=0.5)
    fz.after_step(m)  # first call: takes the codes
    osc = torch.zeros_like(m.conv.weight, dtype=torch.bool)
    osc[0, :, 0] = True  # these weights flip up and down every step
    step = 0.2 * m.weight_fq.effective_scale().detach().reshape(-1, 1, 1, 1) / m._bn_factor().detach().reshape(
        -1, 1, 1, 1)
    start = _codes(m)
    for k in range(4):
        with torch.no_grad():
            m.conv.weight.add_(torch.where(osc, step * (1 if k % 2 == 0 else -1), torch.zeros_like(step)))
        fz.after_step(m)
    frozen = fz.state[""]["frozen"].clone()
    assert torch.equal(frozen, osc) and fz.frozen() == int(osc.sum())  # only the oscillating weights froze
    held = _codes(m)[frozen].clone()
    assert torch.equal(held, start[frozen]) or torch.equal(held, start[frozen] + 1)
    opt = torch.optim.SGD([m.conv.weight, m.bn.weight, m.weight_fq.scale], lr=0.05, momentum=0.9)
    x = torch.rand(2, 3, 8, 8)
    fz.threshold = 0.99  # no new freezing from here: the free weights show the steps move codes
    for _ in range(5):  # real optimizer steps on weights, gamma and the learned scale
        opt.zero_grad()
        (m(x) ** 2).mean().mul(100).backward()
        opt.step()
        fz.after_step(m)
        assert torch.equal(_codes(m)[frozen], held)
    free = ~fz.state[""]["frozen"]
    assert torch.equal(~free, frozen) and not torch.equal(_codes(m)[free], start[free])  # the free weights did move


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.booleans()))
def test_freeze_values_are_checked(v):
    from fxqat.quant.oscillation import check_freeze

    if not isinstance(v, (bool, str)) and 0 < v < 1:
        assert check_freeze(v) == v
    else:
        with pytest.raises(FxqatError, match=r"freeze_osc=.*between 0 and 1"):
            check_freeze(v)
    assert check_freeze(None) is None

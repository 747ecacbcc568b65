"""fxqat.quant.folded_fq: the BN-folded weight's multiply, observer, fake-quant and divide in one native pass, against
the tensor ops (``NATIVE_FOLD = False``).

Tolerances: the forward (values, the observer's state, scale and zero point) and the conv weight's gradient are
equal bit for bit (NaN where both are NaN). The BN factor's gradient is a sum over each output channel's weights:
the native pass sums in double, torch in float32, so they agree within 1e-4 relative plus 1e-5 of the largest."""

import copy

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fxqat

from fxqat import native
from fxqat.models import load_model
from fxqat.modules.conv_bn_act import ConvBnAct
from fxqat.quant import folded_fq
from fxqat.quant.spec import WEIGHT_INT8

needs_native = pytest.mark.skipif(native.library() is None, reason=f"fxqat.native unavailable: {native.status()}")


def _module(cin, cout, k, groups=1, observer="minmax", seed=0, zero_gamma=False):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
    bn = torch.nn.BatchNorm2d(cout)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        bn.weight.copy_(torch.randn(cout, generator=g))  # negative factors too
        if zero_gamma:
            bn.weight[0] = 0.0  # folds its channel to 0 / 0: NaN on both paths
        bn.running_var.copy_(torch.rand(cout, generator=g) + 0.1)
    m = ConvBnAct(conv, bn, torch.nn.SiLU(), WEIGHT_INT8.with_(observer=observer)).train()
    m.weight_fq.observer.averaging_constant = 0.25
    return m


def _step(m, x, fold: bool):
    folded_fq.NATIVE_FOLD = fold
    try:
        y = m(x)
        y.square().sum().backward()
        return y
    finally:
        folded_fq.NATIVE_FOLD = True


@needs_native
@pytest.mark.parametrize("cin,cout,k,groups,observer,zero_gamma", [
    (16, 32, 3, 1, "minmax", False), (32, 32, 1, 1, "moving_average", False), (24, 24, 3, 24, "minmax", False),
    (64, 128, 3, 1, "moving_average", True)])
def test_native_fold_equals_the_tensor_ops(cin, cout, k, groups, observer, zero_gamma, monkeypatch):
    m = _module(cin, cout, k, groups, observer, zero_gamma=zero_gamma)
    ref = copy.deepcopy(m)
    used = []
    orig = folded_fq.folded_fake_quant
    monkeypatch.setattr("fxqat.modules.conv_bn_act.folded_fake_quant",
                        lambda *a: used.append(1) or orig(*a))
    for step in range(3):  # the observer's state carries over steps
        x = torch.randn(2, cin, 10, 10, generator=torch.Generator().manual_seed(step))
        for t in (m, ref):
            t.zero_grad(set_to_none=True)
        ya, yb = _step(m, x, True), _step(ref, x, False)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(m.weight_fq.state_dict().values(), ref.weight_fq.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(m.conv.weight.grad, ref.conv.weight.grad, rtol=0, atol=0, equal_nan=True)
        ga, gb = m.bn.weight.grad, ref.bn.weight.grad
        ok = torch.isfinite(gb)
        assert torch.equal(torch.isfinite(ga), ok)
        top = gb[ok].abs().max() if ok.any() else 0.0
        assert ((ga - gb)[ok].abs() <= 1e-4 * gb[ok].abs() + 1e-5 * top).all()
    assert len(used) == 6 and folded_fq._applies(m.weight_fq, m.conv.weight, m._bn_factor())


@needs_native
def test_a_nan_or_a_hook_or_a_learnable_scale_takes_the_tensor_ops():
    """Nothing is written when w * f holds a NaN (the tensor ops define it); hooks and learnable scales are left to
    FakeQuant's own call."""
    m = _module(8, 8, 3)
    m(torch.randn(1, 8, 6, 6))
    fq, f = m.weight_fq, m._bn_factor()
    state = copy.deepcopy(fq.state_dict())
    w = m.conv.weight.detach().clone()
    w[3, 0, 1, 1] = float("nan")
    assert folded_fq.folded_fake_quant(fq, w, f) is None
    assert all(torch.equal(a, b) for a, b in zip(state.values(), fq.state_dict().values()))
    assert folded_fq.folded_fake_quant(fq, m.conv.weight, f) is not None
    handle = fq.register_forward_hook(lambda *a: None)
    try:
        assert folded_fq.folded_fake_quant(fq, m.conv.weight, f) is None
    finally:
        handle.remove()
    lsq = _module(8, 8, 3)
    lsq.set_weight_spec(WEIGHT_INT8.with_(learnable=True))
    assert folded_fq.folded_fake_quant(lsq.weight_fq, lsq.conv.weight, lsq._bn_factor()) is None


@needs_native
def test_a_whole_qat_step_matches_the_tensor_ops(monkeypatch):
    """A prepared yolov8n, one training forward and backward: outputs, the input's gradient and every conv weight's
    gradient bit for bit; every BN weight's gradient within the stated tolerance; the native pass ran for every
    conv with live BatchNorm."""
    torch.manual_seed(0)
    gm = fxqat.prepare_qat(load_model("yolov8n.yaml", nc=3), example_inputs=(torch.rand(1, 3, 64, 64),))
    fxqat.calibrate(gm, [torch.rand(2, 3, 64, 64)], progress=False)
    x = torch.rand(2, 3, 64, 64)
    ran, orig = [], folded_fq._FoldedFakeQuant.apply
    monkeypatch.setattr(folded_fq._FoldedFakeQuant, "apply", lambda *a: ran.append(1) or orig(*a))
    results = []
    for fold in (False, True):
        folded_fq.NATIVE_FOLD = fold
        try:
            m = copy.deepcopy(gm).train()
            xi = x.clone().requires_grad_()
            outs = [o for o in tree_leaves(m(xi)) if torch.is_tensor(o)]
            sum(o.float().square().mean() for o in outs).backward()
        finally:
            folded_fq.NATIVE_FOLD = True
        results.append((outs, xi.grad, dict((n, p.grad) for n, p in m.named_parameters() if p.grad is not None)))
    (o0, g0, w0), (o1, g1, w1) = results
    live = [mod for mod in gm.modules() if isinstance(mod, ConvBnAct) and mod.bn is not None and mod.weight_fq]
    assert len(ran) == len(live) > 50
    assert all(torch.equal(a, b) for a, b in zip(o0, o1)) and torch.equal(g0, g1) and w0.keys() == w1.keys()
    for name in w0:
        a, b = w1[name], w0[name]
        if name.endswith("bn.weight"):
            assert ((a - b).abs() <= 1e-4 * b.abs() + 1e-5 * b.abs().max()).all(), name
        else:
            assert torch.equal(a, b), name

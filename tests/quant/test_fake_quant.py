import io
import math

import pytest
import torch
import torch.nn.functional as F

from fxqat.quant.fake_quant import FakeQuant
from fxqat.quant.spec import QuantSpec

W_LSQ = QuantSpec(bits=8, symmetric=True, per_channel=0, observer="minmax", learnable=True)
A_LSQ = QuantSpec(bits=8, symmetric=False, observer="moving_average", learnable=True)


def _weight_fq(channels=4):
    fq = FakeQuant(W_LSQ, channels=channels)
    fq.always_observe = True  # as ConvBnAct sets it for weights
    return fq


def test_learnable_scales_are_parameters_and_train():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
    wfq, afq = _weight_fq(), FakeQuant(A_LSQ)
    names = dict(wfq.named_parameters()) | {f"a.{k}": v for k, v in afq.named_parameters()}
    assert set(names) == {"scale", "a.scale"}  # in parameters() → the optimizer and the EMA see them
    assert "scale" in wfq.state_dict() and "scale" in afq.state_dict()
    x = torch.rand(2, 3, 8, 8) * 3
    opt = torch.optim.SGD([w, wfq.scale, afq.scale], lr=0.1)
    wfq.train(), afq.train()
    F.conv2d(afq(x), wfq(w)).square().mean().backward()
    ws0, as0 = wfq.scale.detach().clone(), afq.scale.detach().clone()
    assert wfq.scale.grad.shape == (4,) and bool((wfq.scale.grad != 0).all())  # every channel's scale learns
    assert afq.scale.grad.shape == (1,) and bool((afq.scale.grad != 0).all())
    opt.step()
    assert not torch.equal(wfq.scale.detach(), ws0) and not torch.equal(afq.scale.detach(), as0)
    learned_w, learned_a = wfq.scale.detach().clone(), afq.scale.detach().clone()
    opt.zero_grad()
    F.conv2d(afq(x), wfq(w)).square().mean().backward()  # observing again must not overwrite the learned scales
    assert torch.equal(wfq.scale.detach(), learned_w) and torch.equal(afq.scale.detach(), learned_a)


def test_learnable_observer_runs_once():
    afq = FakeQuant(A_LSQ).train()
    calls = []
    afq.observer.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(5):
        afq(torch.randn(64))
    assert len(calls) == 1  # initialized once, then the optimizer owns the scale (no observer work per step)
    s0 = float(afq.scale)
    afq.calibrating = True  # fxqat.calibrate: the initial scale comes from every calibration batch
    afq(torch.linspace(-50, 50, 64))
    assert len(calls) == 2 and float(afq.scale) > s0


def _lsq_grad(x, s, qmin, qmax, g, gf):
    """LSQ (Esser et al. 2020) d y / d s by hand: round(x/s) - x/s inside the grid, qmin / qmax when clipped."""
    v = x / s
    d = torch.where(v <= qmin, torch.full_like(v, qmin), torch.where(v >= qmax, torch.full_like(v, qmax),
                                                                       torch.round(v) - v))
    return d * g * gf


def test_per_channel_gradient_matches_lsq_formula():
    x = torch.tensor([[0.12, -0.31, 0.05, 2.0, -0.77], [0.4, 0.013, -0.29, 0.18, -5.0]])
    fq = FakeQuant(QuantSpec(bits=4, symmetric=True, per_channel=0, observer="minmax", learnable=True), channels=2)
    fq.scale.data = torch.tensor([0.1, 0.05])
    fq.initialized.fill_(True)
    g = torch.tensor([[1.0, -2.0, 0.5, 1.5, 1.0], [0.3, 1.0, -1.0, 2.0, -0.7]])
    (fq.fake_quant(x) * g).sum().backward()
    gf = 1 / math.sqrt(5 * 7)  # LSQ's gradient scale: 1 / sqrt(elements per channel * qmax)
    expected = torch.stack([_lsq_grad(x[c], fq.scale[c].detach(), -8, 7, g[c], gf).sum() for c in range(2)])
    # float32 kernels vs the float32 formula: agree to ~1e-6 relative; 1e-5 leaves room for summation order
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-5, atol=1e-6)
    assert fq.grad_factor(x) == pytest.approx(gf)


def test_per_tensor_gradient_matches_lsq_formula():
    x = torch.tensor([0.12, -0.31, 0.05, 2.0, 0.77, 0.33])
    fq = FakeQuant(QuantSpec(bits=4, symmetric=False, observer="minmax", learnable=True))
    fq.scale.data = torch.tensor([0.1])
    fq.initialized.fill_(True)
    g = torch.tensor([1.0, -2.0, 0.5, 1.5, 1.0, -0.25])
    (fq.fake_quant(x) * g).sum().backward()
    expected = _lsq_grad(x, torch.tensor(0.1), 0, 15, g, 1 / math.sqrt(6 * 15)).sum()
    torch.testing.assert_close(fq.scale.grad, expected.reshape(1), rtol=1e-5, atol=1e-6)


def test_learnable_scale_trains_on_float16_activations():
    """Under CUDA AMP activations arrive as float16; the LSQ kernels' backward accepts float32 only."""
    afq = FakeQuant(A_LSQ).train()
    x = (torch.rand(64) * 4).half().requires_grad_()
    y = afq(x)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and afq.scale.grad is not None and x.grad.dtype == torch.float16


def test_negative_learned_scale_is_used_as_positive():
    fq = _weight_fq(2)
    fq.scale.data = torch.tensor([-0.1, 0.0])  # an optimizer step overshot
    fq.initialized.fill_(True)
    x = torch.tensor([[0.25, -0.3], [0.5, 1.0]])
    y = fq.fake_quant(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[0], torch.tensor([0.2, -0.3]))  # |s| = 0.1: round half to even 2.5 → 2
    assert fq.qparams()[0].min() > 0


def test_codes_and_onnx_use_the_learned_scale():
    fq = _weight_fq(2).eval()
    x = torch.tensor([[0.25, -0.3, 0.9], [0.5, 1.0, -0.04]])
    fq(x)  # always_observe: initializes from min/max
    fq.scale.data = torch.tensor([0.01, 0.02])  # "learned"
    fq(x)  # observing again keeps it
    assert torch.equal(fq.codes(x), torch.tensor([[25, -30, 90], [25, 50, -2]], dtype=torch.int32))
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    buf = io.BytesIO()
    torch.onnx.export(fq, (x,), buf, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    consts = [numpy_helper.to_array(i) for i in model.graph.initializer]
    consts += [numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"]
    assert any(c.shape == (2,) and c.dtype.kind == "f" and abs(c - [0.01, 0.02]).max() < 1e-9 for c in consts)
    assert {n.op_type for n in model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out
    return [t for o in items for t in _tensors(o)]


def test_learnable_scales_train_in_a_prepared_yolov8n():
    """Every learnable scale of a QAT yolov8n (per-channel weights, per-tensor activations) gets a non-zero gradient
    and changes in one optimizer step; the EMA copy (fxqat.training) takes the learned values."""
    import copy

    import fxqat
    from fxqat.training import _sync_quant_state

    gm = fxqat.prepare_qat("yolov8n.yaml", {"weight": {"learnable": True}, "activation": {"learnable": True}})
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fxqat.calibrate(gm, [x], progress=False)
    fqs = {p: m for p, m in gm.named_modules() if isinstance(m, FakeQuant) and m.spec.fixed is None}
    assert len(fqs) > 100 and all(m.spec.learnable and bool(m.initialized) for m in fqs.values())
    assert sum(m.ch_axis is not None for m in fqs.values()) == 63  # every conv's weight quantizer: per-channel
    scales = [m.scale for m in fqs.values()]
    params = {id(p) for p in gm.parameters()}
    assert all(id(s) in params for s in scales)
    before = [s.detach().clone() for s in scales]
    gm.train()
    sum(o.float().square().mean() for o in _tensors(gm(x))).backward()
    no_grad = [p for p, m in fqs.items() if m.scale.grad is None or not bool((m.scale.grad != 0).any())]
    assert no_grad == []
    torch.optim.SGD(scales, lr=1e-3).step()
    unchanged = [p for (p, m), b in zip(fqs.items(), before) if torch.equal(m.scale.detach(), b)]
    assert unchanged == []
    ema = copy.deepcopy(gm)
    with torch.no_grad():
        for s in scales:
            s.mul_(1.5)
    _sync_quant_state(ema, gm)
    ema_fqs = dict(ema.named_modules())
    assert all(torch.equal(ema_fqs[p].scale, m.scale) for p, m in fqs.items())

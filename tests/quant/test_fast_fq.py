"""The CPU fake-quant path through quantize / dequantize (fxqat.quant.fast_fq) against torch's fake-quant kernel:
the same values bit for bit, the same straight-through gradient, on ties, odd zero points and both 8-bit ranges."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_leaves

import fxqat
import fxqat.quant.fake_quant as fqmod
from fxqat.quant import fast_fq
from fxqat.quant.fake_quant import FakeQuant
from fxqat.quant.spec import QuantSpec
from fxqat.models import load_model

RANGES = [(0, 255), (-128, 127)]


def _inputs(scale: float, zp: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale * 120 - (zp - 128) * scale * 0.5
    k = torch.randint(-400, 400, (n // 2,), generator=g).float()
    x[: n // 2] = (k + 0.5) * torch.tensor(scale)  # exact ties: x / scale ends in .5 (half-even rounding matters)
    return x


@settings(max_examples=150, deadline=None)
@given(scale=st.floats(1e-5, 2.0), zp_frac=st.floats(0, 1), n=st.integers(1, 3000), r=st.sampled_from(RANGES),
       seed=st.integers(0, 2**16))
def test_values_and_gradient_equal_torch_kernel(scale, zp_frac, n, r, seed):
    qmin, qmax = r
    zp = int(qmin + round(zp_frac * (qmax - qmin)))
    s, z = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    x = _inputs(float(s), zp, n, seed)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(xa, s, z, qmin, qmax)
    out = fast_fq.fake_quant_per_tensor(xb, s, z, qmin, qmax)
    assert torch.equal(out, ref)
    g = torch.randn(n)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(xb.grad, xa.grad)  # the straight-through mask: in range ⇔ unclamped code in [qmin, qmax]


@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("clips", ["none", "below", "above", "both", "nan"])
@pytest.mark.parametrize("known_range", [False, True])
def test_mask_shortcuts_keep_the_kernels_gradient(qmin, qmax, clips, known_range):
    """A batch that clips on no side / one side / both (or holds a NaN) takes no / one / two comparisons for the
    mask, with the batch range measured here or given (the observer's); the gradient equals torch's kernel's."""
    scale, zp = 0.05, (qmin + qmax + 1) // 2
    lo, hi = fast_fq.thresholds(scale, zp, qmin, qmax)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4000, generator=g) * (hi - lo) * 0.98 + lo * 0.99  # inside [lo, hi]
    if clips in ("below", "both"):
        x[::7] = lo - 1.0 - torch.rand(len(x[::7]), generator=g)
    if clips in ("above", "both"):
        x[3::11] = hi + 1.0 + torch.rand(len(x[3::11]), generator=g)
    if clips == "nan":
        x[5] = float("nan")
    s, z = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(xa, s, z, qmin, qmax)
    rng = torch.aminmax(x) if known_range else None
    out = fast_fq.fake_quant_per_tensor(xb, s, z, qmin, qmax, batch_range=rng)
    ok = ~x.isnan()  # a NaN's code is undefined (the two kernels differ there); every other value is compared
    assert torch.equal(out[ok], ref[ok])
    assert out.grad_fn.pass_all == (clips == "none")  # which shortcut ran: no mask at all ...
    assert len(out.grad_fn.saved_tensors) == (0 if clips == "none" else 1)  # ... or one mask tensor
    go = torch.randn(len(x), generator=g)
    ref.backward(go)
    out.backward(go)
    assert torch.equal(xb.grad, xa.grad)


@pytest.mark.parametrize("qmin,qmax", RANGES)
def test_thresholds_bound_the_kernels_mask_exactly(qmin, qmax):
    """Every float32 just inside a threshold is in the torch kernel's mask, the next one out is not."""
    for scale, zp in [(0.05, 128 if qmin == 0 else 0), (0.0137, 3 if qmin == 0 else -7), (1.7, qmax), (3e-4, qmin)]:
        lo, hi = fast_fq.thresholds(scale, zp, qmin, qmax)
        edge = torch.tensor([lo, hi])
        out = torch.tensor([torch.nextafter(edge[0], torch.tensor(-float("inf"))),
                            torch.nextafter(edge[1], torch.tensor(float("inf")))])
        _, mask_in = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            edge, torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), torch.tensor([1], dtype=torch.uint8),
            qmin, qmax)
        _, mask_out = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            out, torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32), torch.tensor([1], dtype=torch.uint8),
            qmin, qmax)
        assert mask_in.all() and not mask_out.any(), (scale, zp)


def test_eligible_only_for_cpu_float32_and_whole_8bit_ranges():
    x = torch.zeros(3)
    assert fast_fq.eligible(x, 0, 255) and fast_fq.eligible(x, -128, 127)
    assert not fast_fq.eligible(x, 0, 15)  # 4-bit: torch's kernel
    assert not fast_fq.eligible(x, -127, 127)
    assert not fast_fq.eligible(x.half(), 0, 255)


def test_fake_quant_module_takes_the_fast_path(monkeypatch):
    """FakeQuant uses the fast kernel for 8-bit per-tensor activations (counted), not for 4-bit or per-channel."""
    calls = []
    real = fast_fq.fake_quant_per_tensor
    monkeypatch.setattr(fast_fq, "fake_quant_per_tensor", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
    x = torch.randn(2, 4, 8, 8)
    for spec, ch in [(QuantSpec(), None), (QuantSpec(symmetric=True), None), (QuantSpec(bits=4), None),
                     (QuantSpec(symmetric=True, per_channel=0), 2)]:
        FakeQuant(spec, channels=ch).train()(x)
    assert calls == [(0, 255), (-128, 127)]


def test_qat_model_step_equals_torch_kernel(monkeypatch):
    """A whole prepared yolov8n: forward outputs, input gradient and weight gradients with the fast kernel equal
    torch's fake-quant kernel's (float32 sums in the same order: bit-identical). The BN-folded weight's native pass
    (whose BN-scale gradient sums in double) stays off here: tests/quant/test_folded_fq.py compares it."""
    from fxqat.quant import folded_fq

    monkeypatch.setattr(folded_fq, "NATIVE_FOLD", False)
    torch.manual_seed(0)
    gm = fxqat.prepare_qat(load_model("yolov8n.yaml", nc=3), example_inputs=(torch.rand(1, 3, 64, 64),))
    fxqat.calibrate(gm, [torch.rand(2, 3, 64, 64)], progress=False)
    x = torch.rand(2, 3, 64, 64)
    results = []
    for fast in (False, True):
        monkeypatch.setattr(fqmod, "FAST_KERNEL", fast)
        m = copy.deepcopy(gm).train()
        xi = x.clone().requires_grad_()
        out = m(xi)
        outs = [o for o in tree_leaves(out) if torch.is_tensor(o)]
        sum(o.float().square().mean() for o in outs).backward()
        results.append((outs, xi.grad, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (o0, g0, w0), (o1, g1, w1) = results
    assert len(o0) == len(o1) > 0 and all(torch.equal(a, b) for a, b in zip(o0, o1))
    assert torch.equal(g0, g1) and len(w0) == len(w1) > 0
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))


@pytest.mark.parametrize("native_observer", [False, True])
def test_fake_quant_module_hands_the_observers_range_to_the_mask(native_observer, monkeypatch):
    """In training the observer's min / max of the very tensor decide the mask: a first batch sets the range, so
    nothing clips and no mask is kept; ``MASK_SHORTCUT = False`` keeps the two-comparison mask; the gradient is the
    same either way. x is measured once, by the observer (by its tensor ops, or inside the native observer call)."""
    monkeypatch.setattr(fqmod, "NATIVE_OBSERVE", native_observer)
    measured_by_torch = 0 if native_observer and fxqat.native.library() is not None else 1
    x = torch.rand(2, 4, 8, 8) * 3
    grads = []
    real, calls = torch.aminmax, []
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    for shortcut in (True, False):
        monkeypatch.setattr(fast_fq, "MASK_SHORTCUT", shortcut)
        fq = FakeQuant(QuantSpec()).train()
        xi = x.clone().requires_grad_()
        calls.clear()
        y = fq(xi)
        assert len(calls) == measured_by_torch  # the fast kernel reuses the observer's range, never measures again
        assert y.grad_fn.pass_all is shortcut and len(y.grad_fn.saved_tensors) == (0 if shortcut else 1)
        y.sum().backward()
        grads.append(xi.grad)
    assert torch.equal(*grads)


@pytest.mark.skipif(fxqat.native.library() is None, reason=f"fxqat.native unavailable: {fxqat.native.status()}")
@pytest.mark.parametrize("qmin,qmax", RANGES)
@pytest.mark.parametrize("clips", ["none", "above", "both"])
def test_native_one_pass_kernel_equals_torchs_kernel(qmin, qmax, clips, monkeypatch):
    """fxqat.native's fused kernel (values and mask in one pass, instead of quantize + dequantize + comparisons):
    torch's fake-quant kernel's values and gradient bit for bit, over several threads' chunks, with ties, odd zero
    points, NaN (the grid's lowest value, as torch's kernel; quantize + dequantize give the highest) and infinities."""
    scale, zp = 0.0173, qmin + 77
    x = _inputs(scale, zp, 7 * 14287, 3).reshape(1, 7, 14287, 1)  # 6 chunks of the kernel
    lo, hi = fast_fq.thresholds(scale, zp, qmin, qmax)
    if clips == "none":
        x = x.clamp(lo, hi)
    elif clips == "above":
        x = x.clamp(min=lo)
    else:
        x[0, 0, :4, 0] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    s, z = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    monkeypatch.setattr(fast_fq, "NATIVE", True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(xa, s, z, qmin, qmax)
    with monkeypatch.context() as m:  # the fused kernel runs instead of torch's quantize / dequantize
        m.setattr(torch, "quantize_per_tensor", lambda *a, **k: pytest.fail("the two-kernel path ran"))
        out = fast_fq.fake_quant_per_tensor(xb, s, z, qmin, qmax)
    assert torch.equal(out, ref)
    ref.backward(torch.ones_like(ref))
    out.backward(torch.ones_like(out))
    assert torch.equal(xb.grad, xa.grad)
    assert clips != "none" or bool((xb.grad == 1).all())  # nothing clips: the identity gradient
    assert clips == "none" or bool((xb.grad == 0).any())


@pytest.mark.skipif(fxqat.native.library() is None, reason=f"fxqat.native unavailable: {fxqat.native.status()}")
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 80), cols=st.integers(1, 2000), r=st.sampled_from(RANGES + [(-8, 7), (0, 15)]),
       zp_frac=st.floats(0, 1), seed=st.integers(0, 2**16), threads=st.sampled_from([1, 2]))
def test_native_per_channel_kernel_equals_torchs(rows, cols, r, zp_frac, seed, threads):
    """Per-channel fake-quant (QAT's weights) through fxqat.native against torch's kernel: the same values and
    gradient bit for bit, on ties, odd zero points, 4- and 8-bit ranges, clipping on both sides, and on NaN, infinities
    and codes past 2^63 (where torch's int64 cast sends them to qmin)."""
    qmin, qmax = r
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, generator=g) * 0.1 + 1e-4
    zp = torch.full((rows,), int(qmin + round(zp_frac * (qmax - qmin))), dtype=torch.int32)
    x = torch.randn(rows, cols, generator=g) * scale[:, None] * (qmax - qmin) * 0.4
    k = torch.randint(-300, 300, (rows, cols // 2), generator=g).float()
    x[:, : cols // 2] = (k + 0.5) * scale[:, None]  # exact ties
    special = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e15]
    x.view(-1)[: len(special)] = torch.tensor(special)[: x.numel()]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = torch.fake_quantize_per_channel_affine(xa, scale, zp, 0, qmin, qmax)
        out = fast_fq.fake_quant_per_channel(xb, scale, zp, qmin, qmax)
        assert out is not None
        assert torch.equal(ref, out)  # tolerance: exact
        grad = torch.randn(rows, cols, generator=g)
        ref.backward(grad)
        out.backward(grad)
        assert torch.equal(xa.grad, xb.grad)  # tolerance: exact
        with torch.no_grad():  # no gradient wanted: no mask, same values
            assert torch.equal(fast_fq.fake_quant_per_channel(x, scale, zp, qmin, qmax), ref.detach())
    finally:
        torch.set_num_threads(old)


def test_per_channel_path_declines_what_it_does_not_cover():
    """Not contiguous, not float32, int64 zero points, a scale per another axis: None (the caller runs torch's op)."""
    w = torch.randn(4, 3, 3, 3)
    s, z = torch.full((4,), 0.01), torch.zeros(4, dtype=torch.int32)
    assert fast_fq.fake_quant_per_channel(w.transpose(0, 1), s, z, -128, 127) is None
    assert fast_fq.fake_quant_per_channel(w.double(), s, z, -128, 127) is None
    assert fast_fq.fake_quant_per_channel(w, s, z.long(), -128, 127) is None
    assert fast_fq.fake_quant_per_channel(w, s[:3], z[:3], -128, 127) is None


@pytest.mark.skipif(fxqat.native.library() is None, reason=f"fxqat.native unavailable: {fxqat.native.status()}")
def test_weight_quantizer_takes_the_native_per_channel_path(monkeypatch):
    """A QAT weight quantizer runs the native per-channel kernel when ``NATIVE_CHANNEL`` is on and torch's op when off,
    with the same values and gradient."""
    fq = FakeQuant(QuantSpec(symmetric=True, per_channel=0, observer="minmax"), channels=8).train()
    fq.always_observe = True
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    outs = {}
    for flag in (True, False):
        monkeypatch.setattr(fast_fq, "NATIVE_CHANNEL", flag)
        wi = w.clone().requires_grad_()
        y = fq(wi)
        assert (type(y.grad_fn).__name__ == "_FakeQuantChannelBackward") is flag
        y.backward(torch.ones_like(y))
        outs[flag] = (y.detach(), wi.grad)
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])


@pytest.mark.skipif(fxqat.native.library() is None, reason=f"fxqat.native unavailable: {fxqat.native.status()}")
@pytest.mark.parametrize("mul", [False, True])
@pytest.mark.parametrize("n", [1, 1000, 3 * 2**15 + 7])
def test_native_masked_gradient_equals_torchs(mul, n, monkeypatch):
    """masked_grad through fxqat.native against torch.where(mask, g, 0) / g * mask: bit for bit, with NaN, infinities
    and negative gradients (g * 0 is -0 or NaN there, where gives +0), over several OpenMP chunks; non-contiguous
    gradients take torch's op."""
    g = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=g)
    grad[: min(n, 3)] = torch.tensor([float("nan"), float("inf"), -2.0])[: min(n, 3)]
    mask = torch.rand(n, generator=g) > 0.3
    ref = grad * mask if mul else torch.where(mask, grad, 0.0)
    calls = []
    lib = fxqat.native.library()

    class Spy:
        def __getattr__(self, name):
            return getattr(lib, name)

        def fxqat_mask_grad(self, *a):
            calls.append(1)
            return lib.fxqat_mask_grad(*a)

    monkeypatch.setattr(fxqat.native, "library", lambda: Spy())
    out = fast_fq.masked_grad(grad, mask, mul)
    assert calls and torch.equal(ref.nan_to_num(), out.nan_to_num())  # tolerance: exact
    assert torch.equal(ref.isnan(), out.isnan()) and torch.equal(ref.signbit(), out.signbit())
    g2 = torch.randn(4, 9, generator=g).t()  # not contiguous: torch's op
    m2 = torch.rand(9, 4, generator=g) > 0.5
    calls.clear()
    assert torch.equal(fast_fq.masked_grad(g2, m2, mul), g2 * m2 if mul else torch.where(m2, g2, 0.0)) and not calls

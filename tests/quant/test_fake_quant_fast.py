"""The fast observer path (FakeQuant._observe_fast) against torch.ao's observers (FAST_OBSERVE = False), and the
fake-quant under autocast."""

import copy

import pytest
import torch

import fxqat.quant.fake_quant as fqmod
from fxqat.quant.fake_quant import FakeQuant
from fxqat.quant.spec import QuantSpec

SPECS = {
    "u8 minmax": (QuantSpec(observer="minmax"), None),
    "u8 moving_average": (QuantSpec(observer="moving_average"), None),
    "s8 moving_average": (QuantSpec(symmetric=True, observer="moving_average"), None),
    "u4 minmax": (QuantSpec(bits=4, observer="minmax"), None),
    "s8c minmax (weights)": (QuantSpec(symmetric=True, per_channel=0, observer="minmax"), 4),
    "s8c moving_average": (QuantSpec(symmetric=True, per_channel=0, observer="moving_average"), 4),
    "u8c axis 1": (QuantSpec(per_channel=1, observer="moving_average"), 3),
}


def _inputs(ch_axis):
    g = torch.Generator().manual_seed(0)
    shape = (4, 3, 5, 5) if ch_axis != 1 else (2, 3, 4, 4)
    yield torch.rand(shape, generator=g) * 3  # all positive
    yield -torch.rand(shape, generator=g) * 0.5  # all negative
    yield torch.randn(shape, generator=g) * 7 + 1
    yield torch.zeros(shape)
    yield torch.randn(shape, generator=g) * 1e-3


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("always_observe", [False, True])
def test_fast_observer_is_bit_identical_to_torch_ao(name, always_observe, monkeypatch):
    spec, ch = SPECS[name]
    ref = FakeQuant(spec, channels=ch).train()
    ref.always_observe = always_observe
    fast = copy.deepcopy(ref)
    assert fast._fast
    for i, x in enumerate(_inputs(spec.per_channel)):
        if i == 3:  # a calibration-style averaging constant, as fxqat.calibrate sets it
            for m in (ref, fast):
                if hasattr(m.observer, "averaging_constant"):
                    m.observer.averaging_constant = 0.25
        monkeypatch.setattr(fqmod, "FAST_OBSERVE", False)
        y_ref = ref(x)
        monkeypatch.setattr(fqmod, "FAST_OBSERVE", True)
        y_fast = fast(x)
        assert torch.equal(y_ref, y_fast), (name, i)  # tolerance: exact (same ops, same order)
        for (k, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, i, k)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out
    return [t for o in items for t in _tensors(o)]


def test_fast_path_in_a_prepared_model_matches_reference(monkeypatch):
    """A QAT yolov8n training forward: identical outputs and quantizer state with and without the fast path."""
    import fxqat

    gm = fxqat.prepare_qat("yolov8n.yaml")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fxqat.calibrate(gm, [x], progress=False)
    ref = copy.deepcopy(gm).train()
    fast = copy.deepcopy(gm).train()
    x2 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(fqmod, "FAST_OBSERVE", False)
    out_ref = ref(x2)
    monkeypatch.setattr(fqmod, "FAST_OBSERVE", True)
    out_fast = fast(x2)
    flat = [_tensors(o) for o in (out_ref, out_fast)]
    assert len(flat[0]) == len(flat[1]) > 0 and all(torch.equal(a, b) for a, b in zip(*flat))
    sa, sb = ref.state_dict(), fast.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loaded_uninitialized_state_is_reread():
    fq = FakeQuant(QuantSpec(observer="minmax")).train()
    fq(torch.rand(8))
    assert fq._ready
    fresh = FakeQuant(QuantSpec(observer="minmax")).eval()
    fq.load_state_dict(fresh.state_dict())
    fq.eval()
    x = torch.rand(8) * 3
    assert torch.equal(fq(x), x)  # uninitialized again: passes through, as before the fast flag existed


def test_fake_quant_runs_in_float32_under_cpu_autocast():
    """Under torch.autocast (here CPU bfloat16; CUDA float16 in training) the quantizer computes in float32: its
    output equals the float32 fake-quant of the float32 input, while the plain bfloat16 op would not."""
    fq = FakeQuant(QuantSpec(observer="minmax")).train()
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = fq(h)
    assert y.dtype == torch.float32
    ref = FakeQuant(QuantSpec(observer="minmax")).train()
    expected = ref(h.float())
    assert torch.equal(y, expected)  # tolerance: exact, same float32 computation
    assert torch.equal(fq.scale, ref.scale)
    assert not torch.equal(expected.bfloat16().float(), expected)  # grid values rounded to bfloat16 would move
    y.sum().backward()  # and gradients flow back through the cast
    assert conv.weight.grad is not None


NATIVE_SPECS = {k: SPECS[k] for k in ("u8 moving_average", "u8 minmax", "s8 moving_average", "u4 minmax",
                                      "s8c minmax (weights)", "s8c moving_average")}


@pytest.mark.parametrize("name", list(NATIVE_SPECS))
@pytest.mark.parametrize("threads", [1, 2])
def test_native_observer_is_bit_identical_to_the_tensor_ops(name, threads, monkeypatch):
    """``fxqat_observe`` (one native call) against the fast path's tensor ops: same outputs and the same quantizer
    state, bit for bit, on maps large enough to split over threads (3.3 M values: 100 chunks), on one-sided and
    tiny ranges; and it really runs (torch.aminmax is never called on its path)."""
    from fxqat import native

    if native.library() is None:
        pytest.skip(f"fxqat.native unavailable: {native.status()}")
    spec, _ = NATIVE_SPECS[name]
    shape = (8, 16, 160, 160) if spec.per_channel is None else (64, 32, 3, 3)
    ref = FakeQuant(spec, channels=shape[0] if spec.per_channel is not None else None).train()
    nat = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    aminmax, native_calls = torch.aminmax, []
    try:
        for i, (mul, add) in enumerate([(3.0, 0.5), (1e-3, 0.0), (40.0, -9.0), (1e4, 1e4), (0.7, -2.0)]):
            x = torch.randn(shape, generator=g) * mul + add
            if i == 1:
                x = x.abs()  # nothing below zero
            monkeypatch.setattr(fqmod, "NATIVE_OBSERVE", False)
            y_ref = ref(x)
            monkeypatch.setattr(fqmod, "NATIVE_OBSERVE", True)
            first_per_channel = i == 0 and spec.per_channel is not None  # the running range is not set yet
            monkeypatch.setattr(torch, "aminmax", aminmax if first_per_channel else None)
            y_nat = nat(x)
            monkeypatch.setattr(torch, "aminmax", aminmax)
            native_calls.append(not first_per_channel)
            assert torch.equal(y_ref, y_nat), (name, i)  # tolerance: exact (the same float32 operations)
            for (k, a), b in zip(ref.state_dict().items(), nat.state_dict().values()):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (name, i, k)
    finally:
        torch.set_num_threads(old)
    assert sum(native_calls) >= 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_native_observer_leaves_nonfinite_batches_to_torch(bad, monkeypatch):
    """A NaN or an infinity in the batch: the native call writes nothing and the tensor ops decide, as before."""
    spec = QuantSpec(observer="moving_average")
    ref = FakeQuant(spec).train()
    nat = copy.deepcopy(ref)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for fq, flag in ((ref, False), (nat, True)):
        monkeypatch.setattr(fqmod, "NATIVE_OBSERVE", flag)
        fq(x)
    x[1, 2, 3, 4] = bad
    monkeypatch.setattr(fqmod, "NATIVE_OBSERVE", False)
    y_ref = ref(x)
    monkeypatch.setattr(fqmod, "NATIVE_OBSERVE", True)
    y_nat = nat(x)
    assert torch.equal(y_ref.nan_to_num(), y_nat.nan_to_num())
    for (k, a), b in zip(ref.state_dict().items(), nat.state_dict().values()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), k

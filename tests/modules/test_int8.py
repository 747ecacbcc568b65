import os

import pytest
import torch
import torch.nn as nn

from fxqat.modules.int8 import (Dequantize, Int8Act, Int8Add, Int8ConvBnAct, Int8GlobalAvgPool, Int8MaxPool,
                                Quantize, _as_q, _codes, _dup, _quantize, _quantize_dup, cpu_has_vnni,
                                u8s8_conv_saturates)

CL = torch.channels_last


def _u8(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).contiguous(memory_format=CL)


def test_codes_and_quint8_views_share_storage():
    x = _u8(2, 8, 5, 5)
    half = x.chunk(2, 1)[1]  # a strided channel slice, as a C2f split makes
    q = _as_q(half, (0.1, 3))
    assert q.q_scale() == 0.1 and q.q_zero_point() == 3 and torch.equal(q.int_repr(), half)
    assert q.data_ptr() == half.data_ptr()
    c = _codes(q)
    assert c.dtype == torch.uint8 and c.data_ptr() == half.data_ptr() and torch.equal(c, half)


@pytest.mark.parametrize("strided", [False, True])
def test_int8_add_equals_the_float_reference(strided):
    a, b = _u8(2, 16, 6, 6, seed=1), _u8(2, 32, 6, 6, seed=2)
    b = b.chunk(2, 1)[1] if strided else b[:, :16].contiguous(memory_format=CL)
    sa, sb, so = (0.05, 5), (0.04, 7), (0.06, 6)
    out = Int8Add(sa, sb, so)(a, b)
    ref = ((a.float() - 5) * 0.05 + (b.float() - 7) * 0.04) / 0.06 + 6
    # tolerance: the integer kernel may round a tie the other way: at most one code apart
    assert (out.float() - ref.round().clamp(0, 255)).abs().max() <= 1
    assert out.is_contiguous(memory_format=CL)


def test_int8_add_differs_from_the_exact_sum_only_on_rounding_ties():
    # every pair of codes: quantized::add rounds each sum as float64 arithmetic does, except exact .5 ties
    a = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 8, 256, 256).contiguous(memory_format=CL)
    b = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(1, 8, 256, 256).contiguous(memory_format=CL)
    for sa, sb, so in [((0.05, 5), (0.04, 7), (0.06, 6)), ((0.031, 130), (0.017, 3), (0.045, 70))]:
        out = Int8Add(sa, sb, so)(a, b).double()
        ref = ((a.double() - sa[1]) * sa[0] + (b.double() - sb[1]) * sb[0]) / so[0] + so[1]
        tie = (ref - ref.floor() - 0.5).abs() < 1e-6
        d = (out - ref.round().clamp(0, 255)).abs()
        assert d.max() <= 1 and not bool(((d > 0) & ~tie).any())


@pytest.mark.parametrize("keep_layout", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_dequantize_is_the_float_arithmetic_bit_for_bit(keep_layout, strided):
    """torch's quint8 dequantize on the codes, in one pass, against ``(x - zp) * scale`` in float32 (what the
    fake-quant model computes), for many scales: equal bit for bit; NCHW unless the layout is kept."""
    x = _u8(2, 64, 9, 7, seed=5)
    x = x.chunk(2, 1)[1] if strided else x
    g = torch.Generator().manual_seed(0)
    for scale, zp in [(0.1, 120), (1 / 255, 0), (0.0173, 255)] + [
            (float(torch.rand(1, generator=g)) * 0.3 + 1e-4, int(torch.randint(0, 256, (1,), generator=g)))
            for _ in range(20)]:
        y = Dequantize(scale, zp, keep_layout=keep_layout)(x)
        ref = (x.to(torch.float32) - zp) * scale
        assert y.dtype == torch.float32 and torch.equal(y, ref), (scale, zp)
        assert y.is_contiguous(memory_format=CL) if keep_layout else y.is_contiguous()
    a, b = _u8(1, 8, 5, 5, seed=6), _u8(1, 8, 5, 5, seed=7)
    assert torch.equal(Int8Add((0.05, 5), (0.04, 7), None)(a, b),
                       ((a.float() - 5) * 0.05 + (b.float() - 7) * 0.04).contiguous())
    assert torch.equal(Int8Act((0.05, 5), None, nn.SiLU())(a), nn.functional.silu((a.float() - 5) * 0.05).contiguous())


@pytest.mark.parametrize("shape", [(1, 1280, 7, 7), (2, 64, 5, 9)])
def test_global_avg_pool_on_codes(shape):
    """Exact integer sums, one float scaling: the exact mean (float64) rounded once, within 1 float32 ulp; and within
    2e-7 relative of the float reference (dequantize, then average); float NCHW (N, C, 1, 1) out."""
    x = _u8(*shape, seed=8)
    for scale, zp in [(0.0173, 17), (1 / 255, 0), (0.3, 250)]:
        y = Int8GlobalAvgPool((scale, zp))(x)
        exact = (x.double().mean((2, 3), keepdim=True) - zp) * scale
        assert y.dtype == torch.float32 and y.shape == (shape[0], shape[1], 1, 1) and y.is_contiguous()
        assert torch.allclose(y.double(), exact, rtol=1.2e-7, atol=1e-12)
        ref = nn.functional.adaptive_avg_pool2d((x.float() - zp) * scale, 1)
        assert ((y - ref).abs() / ref.abs().clamp_min(1e-6)).max() <= 2e-7 * 2


def test_int8_maxpool_is_exact_on_codes():
    x = _u8(2, 8, 20, 20, seed=3)
    out = Int8MaxPool(nn.MaxPool2d(5, 1, 2))(x)
    assert torch.equal(out, nn.functional.max_pool2d(x.float(), 5, 1, 2).to(torch.uint8))


def test_quantize_is_channels_last_and_rounds_half_to_even():
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 254.5, 300.0]).view(1, 1, 2, 3) * 0.5  # exact binary fractions
    out = Quantize(0.5, 0)(x)
    assert out.flatten().tolist() == [0, 0, 2, 2, 254, 255]  # as torch.fake_quantize_per_tensor_affine rounds
    assert Quantize(1 / 255, 0)(torch.rand(1, 3, 8, 8)).is_contiguous(memory_format=CL)


def test_int8_conv_packs_for_the_input_shape_and_pickles_after_use(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, 1, 1)
    w = torch.randint(-100, 100, (16, 8, 3, 3), dtype=torch.int8)
    m = Int8ConvBnAct(w, torch.full((16,), 0.002), torch.zeros(16), conv, (0.02, 128), (0.03, 100), "swish")
    x = _u8(1, 8, 12, 12, seed=4)
    y = m(x)
    ref = nn.functional.silu(nn.functional.conv2d((x.float() - 128) * 0.02, w.float() * 0.002, None, 1, 1))
    assert (y.float() - (ref / 0.03 + 100).round().clamp(0, 255)).abs().max() <= 1  # one code (rounding ties)
    assert m._packed[0] == (1, 8, 12, 12)
    m(_u8(2, 8, 6, 6, seed=5))  # another shape repacks
    assert m._packed[0] == (2, 8, 6, 6)
    torch.save(m, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert again._packed is None and torch.equal(again(x), y)


def test_int8_conv_call_honours_hooks_and_tracing():
    conv = nn.Conv2d(8, 8, 1)
    w = torch.randint(-100, 100, (8, 8, 1, 1), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    m = Int8ConvBnAct(w, torch.full((8,), 0.002), torch.zeros(8), conv, (0.02, 128), (0.03, 100), "swish")
    x = _u8(1, 8, 4, 4, seed=6)
    y = m(x)  # the direct path: no hooks registered
    seen = []
    h = m.register_forward_hook(lambda mod, args, out: seen.append(out))
    assert torch.equal(m(x), y) and len(seen) == 1 and torch.equal(seen[0], y)  # hooks still run
    h.remove()


    class Leaves(torch.fx.Tracer):  # as GraphModule's unpickling re-traces: every module a leaf
        def is_leaf_module(self, mod, qualname):
            return True

    seq = nn.Sequential(m)
    gm = torch.fx.GraphModule(seq, Leaves().trace(seq))  # torch.fx still intercepts the call: one call_module node
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert torch.equal(gm(x), y)


@pytest.mark.parametrize("shape", [(1, 3, 64, 48), (2, 3, 17, 33), (1, 5, 8, 8)])
def test_quantize_dup_is_quantize_then_dup(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2
    ref = _dup(_quantize(x, 0.013, 37), 1)
    out = _quantize_dup(x, 0.013, 37)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=CL) and torch.equal(out, ref)


def _conv_case(cin, cout, k, groups, seed):
    """Inputs that saturate vpmaddubsw's int16 pair sums: codes near 255 against weights near ±127 of one sign
    per output channel (255·127·2 = 64 770 > 32 767), mixed with random ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, cin, 9, 9), dtype=torch.uint8, generator=g)
    x[0] = torch.randint(240, 256, (cin, 9, 9), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (cout, cin // groups, k, k), dtype=torch.int8, generator=g)
    sign = torch.where(torch.arange(cout) % 2 == 0, 1, -1).view(-1, 1, 1, 1)
    w[: cout // 2] = (torch.randint(100, 128, (cout // 2, cin // groups, k, k), generator=g) * sign[: cout // 2]).to(
        torch.int8)
    return x.contiguous(memory_format=CL), w


def _exact(x, w, zp, groups, k):
    """The convolution of the codes in float64: exact integers."""
    return nn.functional.conv2d(x.double() - zp, w.double(), None, 1, k // 2, 1, groups)


@pytest.mark.parametrize("split", [None, True, False])
@pytest.mark.parametrize("cin,cout,k,groups", [(16, 8, 3, 1), (8, 16, 1, 1), (3, 8, 3, 1), (16, 8, 3, 2), (16, 16, 3, 16)])
def test_int8_conv_is_exact_where_u8s8_pair_sums_saturate(split, cin, cout, k, groups):
    x, w = _conv_case(cin, cout, k, groups, seed=cin + k)
    conv = nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups)
    ws = torch.linspace(0.001, 0.003, cout)
    acc = _exact(x, w, 10, groups, k)  # in units of x_scale * w_scale
    f = Int8ConvBnAct(w, ws, torch.zeros(cout), conv, (0.02, 10), None, "none", split_weights=split)
    wrong_acc = ((f(x).double() / (0.02 * ws.double().view(1, -1, 1, 1)) - acc).abs() > 0.5).float().mean()
    q = Int8ConvBnAct(w, ws, torch.zeros(cout), conv, (0.02, 10), (0.5, 128), "none", split_weights=split)
    codes = (acc * 0.02 * ws.double().view(1, -1, 1, 1) / 0.5 + 128).round().clamp(0, 255)
    wrong_codes = ((q(x).double() - codes).abs() > 1).float().mean()  # tolerance: one code (rounding ties)
    saturates = _layer_saturates(f, x)
    if split is False and saturates:
        # the case does saturate the unsplit kernel on this CPU: the test would catch an exactness regression
        assert wrong_acc > 0.05 and wrong_codes > 0.05
    else:
        # float out: the integer sum scaled in float32, within half an accumulator unit
        assert wrong_acc == 0 and wrong_codes == 0
    assert q._packed[2] == (split if split is not None else saturates)


def _layer_saturates(m, x):
    """The probe of ``m``'s own geometry on input ``x``, as ``Int8ConvBnAct`` calls it."""
    return u8s8_conv_saturates(tuple(x.shape), tuple(m.w_int8.shape), tuple(m.stride), tuple(m.padding),
                               tuple(m.dilation), m.groups, m.x_zp != 0)


def test_depthwise_convs_run_unsplit_and_exact():
    # oneDNN's depthwise kernels add u8×s8 products in int32 even without VNNI (measured on an AVX2-only EPYC, where
    # the split weights, two input channels per group, fell to a kernel 40-250x slower): the probe of that geometry
    # says so, the layer runs its weights unsplit, and its codes are exact where dense layers' pair sums saturate
    x, w = _conv_case(16, 16, 3, 16, seed=3)
    conv = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
    m = Int8ConvBnAct(w, torch.full((16,), 0.002), torch.zeros(16), conv, (0.02, 10), None, "none")
    out = m(x)
    assert not _layer_saturates(m, x) and not m._packed[2]
    assert torch.allclose(out.double() / 0.00004, _exact(x, w, 10, 16, 3), rtol=0, atol=0.5)
    # the dense geometry of the same size is the one that saturates on this kind of CPU: the probes tell them apart
    dense = Int8ConvBnAct(w.repeat(1, 16, 1, 1), torch.full((16,), 0.002), torch.zeros(16), nn.Conv2d(16, 16, 3, 1, 1),
                          (0.02, 10), None, "none")
    assert _layer_saturates(dense, x) == u8s8_conv_saturates()


def test_u8s8_saturation_probe_contract(tmp_path):
    assert isinstance(u8s8_conv_saturates(), bool) and isinstance(cpu_has_vnni(), bool)
    hits = u8s8_conv_saturates.cache_info().hits
    u8s8_conv_saturates()
    assert u8s8_conv_saturates.cache_info().hits == hits + 1  # measured once per process
    if not any(k in os.environ for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")):
        # without VNNI (int8 dot products into int32) oneDNN's u8×s8 kernels saturate int16 pair sums
        assert u8s8_conv_saturates() == (not cpu_has_vnni())
    # auto: split only where needed; weights within ±64 never split (no pair sum can exceed 255·64·2)
    x, w = _conv_case(16, 8, 3, 1, seed=0)
    conv = nn.Conv2d(16, 8, 3, 1, 1)
    small = (w // 2).clamp(-64, 64)
    edge = small.clone()
    edge[0, 0, 0, 0] = -128  # int8 abs(-128) is -128: the check must not miss it
    for weight, expect in ((w, u8s8_conv_saturates()), (small, False), (edge, u8s8_conv_saturates())):
        m = Int8ConvBnAct(weight, torch.full((8,), 0.002), torch.zeros(8), conv, (0.02, 10), (0.5, 128), "none")
        m(x)
        assert m._packed[2] == expect
    # the decision is the running machine's: a pickle carries the setting (auto), never the measured answer
    torch.save(m, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert again.split_weights is None and again._packed is None
    again.split_weights = True  # forcing the split on a VNNI CPU gives the same codes
    assert torch.equal(again(x), m(x)) and again._packed[2]


@pytest.mark.parametrize("spec,n_convs", [("yolov8n.yaml", 63),
                                          pytest.param("yolo11n.yaml", 87, marks=pytest.mark.slow)])  # depthwise, C2PSA
def test_every_conv_of_a_converted_model_is_exact_on_its_own_activations(spec, n_convs):
    # the model-level parity tests compare final scores and boxes, which a few saturated codes per layer barely
    # move (on an AVX2-only CPU the unsplit kernel put 9 % of yolov8n's conv outputs off, up to 12 codes):
    # check each INT8 conv against its float64 integer reference on the activations it really sees
    import fxqat
    from fxqat.models import load_model

    from ..conftest_helpers import liven, signs_like_images

    gm = fxqat.prepare_qat(liven(load_model(spec, nc=10)))
    fxqat.calibrate(gm, [signs_like_images(1, 160, seed=0)], progress=False)
    q = fxqat.convert(gm.eval())
    seen = []
    convs = {n: m for n, m in q.named_modules() if isinstance(m, Int8ConvBnAct)}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.append((n, m, a[0], out))) for n, m in convs.items()]
    with torch.no_grad():
        q(signs_like_images(1, 160, seed=1))
    for h in hooks:
        h.remove()
    assert len(seen) == len(convs) == n_convs
    act = {"swish": nn.functional.silu, "relu": nn.functional.relu, "none": lambda t: t}
    for name, m, x, out in seen:
        if m.quantize_input:  # the image: quantized inside the first conv (QuantizeIntoConv)
            x = _quantize(x, m.x_scale, m.x_zp)
        acc = nn.functional.conv2d(x.double() - m.x_zp, m.w_int8.double(), None, m.stride, m.padding, m.dilation,
                                   m.groups)
        y = act[m.attr](acc * m.x_scale * m.w_scale.double().view(1, -1, 1, 1) + m.bias.double().view(1, -1, 1, 1))
        if m.float_out:  # tolerance: float32 scaling of sums up to ~1e6 accumulator units
            assert torch.allclose(out.double(), y, rtol=1e-5, atol=1e-4), name
        else:  # tolerance: one code (the fused requantization rounds in float32; ties)
            err = (out.double() - (y / m.o_scale + m.o_zp).round().clamp(0, 255)).abs().max()
            assert err <= 1, f"{name}: {err:.0f} codes off"

import pytest
import torch
import torch.nn as nn

from fxqat.modules.int8 import Int8Add, Int8ConvBnAct, Int8MaxPool, Quantize, _as_q, _codes

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

"""fxqat.native: direct oneDNN convolutions for the INT8 torch model, against torch's ``onednn::qconv2d_pointwise``.

Tolerances: uint8 outputs equal torch's op's on at least 99.99 % of the elements and differ by at most one code
(oneDNN 3.2's kernels may round a requantization tie the other way); float32 outputs within 1e-5 relative."""

import copy
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fxqat
from fxqat import native
from fxqat.models import load_model
from fxqat.modules.int8 import Int8ConvBnAct

CL = torch.channels_last
needs_native = pytest.mark.skipif(native.library() is None, reason=f"fxqat.native unavailable: {native.status()}")


def _layer(cin, cout, k, s, groups=1, dilation=1, act="swish", float_out=False, x_zp=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, s, padding=dilation * (k // 2), dilation=dilation, groups=groups)
    w = torch.randint(-127, 128, (cout, cin // groups, k, k), dtype=torch.int8, generator=g)
    w_scale = torch.rand(cout, generator=g) * 0.004 + 5e-4
    bias = torch.randn(cout, generator=g)
    return Int8ConvBnAct(w, w_scale, bias, conv, (0.02, x_zp), None if float_out else (0.05, 7), act)


def _pair(layer, x):
    """(torch's op output, direct output, the module that ran direct)."""
    ref, direct = copy.deepcopy(layer), copy.deepcopy(layer)
    native.ENABLED = False
    try:
        a = ref(x)
    finally:
        native.ENABLED = True
    b = direct(x)
    return a, b, direct


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.dtype == torch.uint8:
        d = (a.int() - b.int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() <= 1e-4
    else:
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("cin,cout,k,s,groups,dilation,act,float_out,x_zp", [
    (16, 32, 3, 1, 1, 1, "swish", False, 3),
    (32, 64, 3, 2, 1, 1, "swish", False, 0),
    (64, 64, 1, 1, 1, 1, "swish", False, 3),
    (64, 64, 3, 1, 64, 1, "swish", False, 3),  # depthwise
    (32, 32, 3, 1, 1, 2, "swish", False, 3),  # dilated
    (32, 16, 3, 1, 1, 1, "relu", False, 3),
    (32, 16, 1, 1, 1, 1, "none", True, 3),  # a head's last 1x1 conv: float out
    (64, 10, 1, 1, 1, 1, "none", True, 0),
])
def test_direct_conv_equals_torchs_op(cin, cout, k, s, groups, dilation, act, float_out, x_zp):
    layer = _layer(cin, cout, k, s, groups, dilation, act, float_out, x_zp)
    x = torch.randint(0, 256, (2, cin, 20, 20), dtype=torch.uint8).contiguous(memory_format=CL)
    a, b, direct = _pair(layer, x)
    assert direct.runs_direct
    _close(a, b)


@needs_native
@pytest.mark.parametrize("float_out,keep_layout", [(False, False), (True, False), (True, True)])
def test_repeat_calls_take_the_inline_path_with_the_first_calls_result(float_out, keep_layout, monkeypatch):
    """The first call builds the primitive through forward; later calls run it inline in __call__ (forward is not
    called) with the same values and the same layout; a registered hook still sees every call."""
    layer = _layer(16, 8, 3, 1, float_out=float_out).with_options(keep_layout=keep_layout)
    x = torch.randint(0, 256, (1, 16, 12, 12), dtype=torch.uint8).contiguous(memory_format=CL)
    first = layer(x)
    calls = []
    monkeypatch.setattr(Int8ConvBnAct, "forward", lambda self, x: calls.append(1) or first)
    again = layer(x)
    assert not calls and torch.equal(first, again) and again.stride() == first.stride()
    assert first.is_contiguous(memory_format=CL) if (keep_layout or not float_out) else first.is_contiguous()
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    layer(x)
    assert len(seen) == 1 and calls == [1]  # hooked: nn.Module.__call__ → forward


@needs_native
@pytest.mark.parametrize("size", [16, 64])
def test_the_3_channel_image_conv_runs_direct(size):
    """The first conv (3 input channels, stride 2: oneDNN's jit_int8 kernel) runs direct, and on the float image
    (``quantize_input``) as on its codes."""
    x = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8).contiguous(memory_format=CL)
    a, b, direct = _pair(_layer(3, 16, 3, 2, x_zp=0), x)
    assert direct.runs_direct
    _close(a, b)
    layer = _layer(3, 16, 3, 2, x_zp=0).with_options(quantize_input=True)
    image = torch.rand(1, 3, size, size)
    a, b, direct = _pair(layer, image)
    assert direct.runs_direct
    _close(a, b)


def _int8_model(spec="yolov8n", imgsz=96):
    torch.manual_seed(0)
    qat = fxqat.prepare_qat(load_model(f"{spec}.yaml", nc=4).eval())
    fxqat.calibrate(qat, [torch.rand(2, 3, imgsz, imgsz)], progress=False)
    return fxqat.convert(qat.eval())


def _leaves(t):
    return [t] if torch.is_tensor(t) else [z for u in t for z in _leaves(u)]


@needs_native
@pytest.mark.parametrize("spec", ["yolov8n", "yolov8n-cls"])
def test_whole_model_direct_equals_torchs_op(spec):
    """Every conv runs direct; the outputs match torch's op (float decode outputs within 1e-4 of their scale: a
    requantization tie rounded the other way moves one code)."""
    model = _int8_model(spec)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        a, b, direct = _pair(model, x)
    ran = [m.runs_direct for m in direct.modules() if isinstance(m, Int8ConvBnAct)]
    # convs that quantize a float input (the image; the classifier's Linear after pooling) quantize it, then run direct
    assert ran and all(ran)
    for p, q in zip(_leaves(a), _leaves(b)):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-4 * float(p.abs().max()))


@needs_native
def test_saved_model_rebuilds_its_primitives_and_threads_take_turns():
    """A model that ran direct pickles without its primitives (they are process-local) and builds them again on
    load; four threads running one model at once all get the single-thread result."""
    model = _int8_model("yolov8n-cls")
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert any(getattr(m, "runs_direct", False) for m in loaded.modules())
    outs = []

    def work():
        with torch.no_grad():
            outs.extend(model(x) for _ in range(10))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == 40 and all(torch.equal(o, ref) for o in outs)


def test_unavailable_path_falls_back_to_torchs_op_and_says_why(monkeypatch):
    """Without a compiler the library is None, status() names the cause, and an INT8 layer runs torch's op."""
    def no_compiler():
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")

    monkeypatch.setattr(native, "_compiler", no_compiler)
    monkeypatch.setattr(native, "_cache_dir", lambda: native.Path(os.devnull).parent / "fxqat-test-no-cache")
    native._load.cache_clear()
    try:
        assert native.library() is None and "no C++ compiler" in native.status()
        layer = _layer(16, 16, 3, 1)
        x = torch.randint(0, 256, (1, 16, 8, 8), dtype=torch.uint8).contiguous(memory_format=CL)
        layer(x)
        assert not layer.runs_direct
    finally:
        native._load.cache_clear()


def test_env_switch_turns_the_direct_path_off():
    code = ("import torch; from fxqat import native; from fxqat.modules.int8 import Int8ConvBnAct as C; "
            "conv = torch.nn.Conv2d(16, 16, 3, 1, 1); w = torch.randint(-100, 100, (16, 16, 3, 3), dtype=torch.int8); "
            "m = C(w, torch.full((16,), 0.01), torch.zeros(16), conv, (0.02, 0), (0.05, 0), 'swish'); "
            "m(torch.randint(0, 255, (1, 16, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)); "
            "print(native.status(), m.runs_direct)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                         "FXQAT_NATIVE": "0"}, check=True).stdout
    assert "turned off (FXQAT_NATIVE=0) False" in out


@needs_native
def test_build_is_cached():
    path = native.build()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime


@needs_native
def test_one_openmp_runtime_in_the_process():
    """oneDNN from PyPI binds to the libgomp torch already loaded: one OpenMP runtime, so torch.set_num_threads
    governs the direct convolutions too."""
    layer = _layer(16, 16, 3, 1)
    layer(torch.randint(0, 256, (1, 16, 8, 8), dtype=torch.uint8).contiguous(memory_format=CL))
    assert layer.runs_direct
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp


@needs_native
def test_a_refused_geometry_falls_back_with_a_warning(monkeypatch):
    """If oneDNN refuses a layer's primitive, that layer warns once and runs torch's op; the output is torch's."""
    def refuse(*a, **k):
        raise RuntimeError("oneDNN refused the convolution: could not create a primitive descriptor")

    layer = _layer(16, 16, 3, 1)
    x = torch.randint(0, 256, (1, 16, 8, 8), dtype=torch.uint8).contiguous(memory_format=CL)
    ref, _, _ = _pair(layer, x)
    monkeypatch.setattr(native, "Conv", refuse)
    with pytest.warns(UserWarning, match="could not create a primitive descriptor.*runs torch's op"):
        out = layer(x)
    assert not layer.runs_direct and torch.equal(out, ref)


@needs_native
def test_read_only_cache_builds_into_the_temp_dir(monkeypatch, tmp_path):
    """A cache directory the process cannot write (a read-only home) sends the build to the temp dir."""
    cache = tmp_path / "home" / ".cache" / "fxqat" / "native"
    monkeypatch.setattr(native, "_cache_dir", lambda: cache)
    monkeypatch.setattr(native.os, "access", lambda path, mode: Path(path) != cache)  # as if read-only
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = native.build()
    assert path.parent == tmp_path / "tmp" / f"fxqat-native-{os.getuid()}" and path.exists()
    assert not any(cache.iterdir())


def test_summary_names_the_path_and_the_reason(monkeypatch):
    """What ``fxqat bench`` prints: the direct path when the library loads, else torch's op with the reason."""
    monkeypatch.setattr(native, "ENABLED", False)
    assert native.summary() == "torch's op; fxqat.native: turned off (fxqat.native.ENABLED = False)"
    monkeypatch.setattr(native, "ENABLED", True)
    expected = "direct oneDNN primitives (fxqat.native)" if native.library() is not None else "torch's op"
    assert native.summary().startswith(expected)
    if native.library() is not None:
        from fxqat.modules import int8_chain

        assert native.summary().endswith("in one call")
        monkeypatch.setattr(int8_chain, "CHAINS", False)
        assert native.summary().endswith("one call per node (fxqat.modules.int8_chain.CHAINS = False)")


@needs_native
@pytest.mark.parametrize("geometry", [((1, 16, 10, 10), (8, 16, 3, 3), (1, 1), (1, 1), (1, 1), 1),
                                      ((1, 32, 12, 12), (32, 1, 3, 3), (2, 2), (1, 1), (1, 1), 32),
                                      ((1, 16, 9, 9), (8, 16, 1, 1), (1, 1), (0, 0), (1, 1), 1)])
def test_direct_saturation_probe_runs_the_direct_kernel_and_agrees_with_torchs(geometry, monkeypatch):
    """The per-geometry saturation self-test of the direct kernel runs a native primitive (counted) and gives this
    CPU's answer for torch's kernel too (same oneDNN kernel family: VNNI or not)."""
    from fxqat.modules import int8

    made = []
    real = native.Conv
    monkeypatch.setattr(native, "Conv", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    assert int8._probe(*geometry, 0, direct=True) == int8._probe(*geometry, 0)
    assert made == [geometry[0]]


@needs_native
def test_a_changed_thread_count_makes_a_new_primitive():
    """oneDNN fixes a primitive's thread count when it creates it: after ``torch.set_num_threads`` the layer makes a
    new primitive for the new count (same output), instead of running on with the old count."""
    layer = _layer(16, 32, 3, 1)
    x = torch.randint(0, 256, (1, 16, 12, 12), dtype=torch.uint8).contiguous(memory_format=CL)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = layer(x)
        first = layer._packed[3]
        assert layer.runs_direct and first.threads == 2
        assert layer(x) is not None and layer._packed[3] is first  # same count: kept
        torch.set_num_threads(1)
        b = layer(x)
        assert layer.runs_direct and layer._packed[3] is not first and layer._packed[3].threads == 1
        assert torch.equal(a, b)
        from fxqat.modules.int8 import Int8Add

        add = Int8Add((0.05, 3), (0.04, 9), (0.07, 5))
        add(x, x)
        one = add._prim[1]
        torch.set_num_threads(2)
        assert torch.equal(add(x, x), one(x, x)) and add._prim[1] is not one and add._prim[1].threads == 2
    finally:
        torch.set_num_threads(before)


def _torch_add(m, x, y):
    native.ENABLED = False
    try:
        return copy.deepcopy(m)(x, y)
    finally:
        native.ENABLED = True


def _near_ties_only(out, ref):
    """``out`` is ``ref`` (the exact sum, float64) rounded, except by one code where ``ref`` lies within 1e-4 of a
    tie (float32 arithmetic, as torch's ``quantized::add`` uses too, may round those either way)."""
    d = (out.double() - ref.round().clamp(0, 255)).abs()
    tie = (ref - ref.floor() - 0.5).abs() < 1e-4
    assert d.max() <= 1 and not bool(((d > 0) & ~tie).any())


@needs_native
@pytest.mark.parametrize("shape,strided", [((1, 16, 20, 20), False), ((2, 64, 7, 9), False), ((1, 32, 10, 10), True)])
def test_direct_add_rounds_the_exact_sum(shape, strided):
    """The residual add on codes (oneDNN binary add, scales and a linear post-op) against the exact sum, as torch's
    ``quantized::add`` is, over many grids; a C2f split half (a channel slice) is made dense first; the primitive is
    kept per shape."""
    from fxqat.modules.int8 import Int8Add

    g = torch.Generator().manual_seed(1)
    n, c, h, w = shape
    wide = torch.randint(0, 256, (n, 2 * c, h, w), dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    x = wide[:, c:] if strided else wide[:, :c].contiguous(memory_format=CL)
    y = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).contiguous(memory_format=CL)
    for _ in range(10):
        s = torch.rand(3, generator=g) * 0.2 + 1e-3
        z = torch.randint(0, 256, (3,), generator=g)
        qa, qb, qo = (float(s[0]), int(z[0])), (float(s[1]), int(z[1])), (float(s[2]), int(z[2]))
        m = Int8Add(qa, qb, qo)
        out = m(x, y)
        prim = m._prim[1]
        assert prim is not None and out.is_contiguous(memory_format=CL)
        ref = ((x.double() - qa[1]) * qa[0] + (y.double() - qb[1]) * qb[0]) / qo[0] + qo[1]
        _near_ties_only(out, ref)
        _near_ties_only(_torch_add(m, x, y), ref)  # the reference path meets the same bar
        assert torch.equal(m(x, y), out) and m._prim[1] is prim  # again: the kept primitive, the same codes
    if not strided:  # dense inputs: later calls run the primitive inline in __call__, forward is not called
        m.forward = None
        assert torch.equal(m(x, y), out)


@needs_native
def test_add_of_broadcast_shapes_keeps_torchs_op_and_a_saved_add_rebuilds():
    from fxqat.modules.int8 import Int8Add

    m = Int8Add((0.05, 3), (0.04, 9), (0.07, 5))
    x = torch.randint(0, 256, (1, 8, 6, 6), dtype=torch.uint8).contiguous(memory_format=CL)
    y = torch.randint(0, 256, (1, 8, 1, 1), dtype=torch.uint8).contiguous(memory_format=CL)
    assert torch.equal(m(x, y), _torch_add(m, x, y)) and m._prim is None  # broadcast: torch's op
    m(x, x)
    assert m._prim[1] is not None
    buf = io.BytesIO()
    torch.save(m, buf)  # the native add is not pickled; the loaded module makes its own
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded._prim is None and torch.equal(loaded(x, x), m(x, x)) and loaded._prim[1] is not None

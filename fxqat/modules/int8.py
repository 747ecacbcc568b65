"""INT8 modules the converted model runs: uint8 tensors in channels-last layout, qparams fixed at convert time.

* :class:`Int8ConvBnAct` — one oneDNN kernel per fused Conv+BN+SiLU (the ``swish`` post-op: uint8 in, uint8 out;
  or float out for Detect's last 1×1 convs). No float SiLU island. The kernel runs through :mod:`fxqat.native`'s
  direct oneDNN primitive, created once per layer and input shape, where that path is available (a few µs per call
  around the kernel); otherwise through torch's ``onednn::qconv2d_pointwise`` (26–54 µs per call around it).
* :class:`Quantize` / :class:`Dequantize` — the float boundary (float values entering a grid; DFL/decode inputs;
  graph outputs). The image is quantized inside the first conv (``quantize_input``, set by ``QuantizeIntoConv``).
* :class:`Int8Add` — residual add requantized to the output grid.
* :class:`Int8MaxPool` — max pooling on the grid (order-preserving, exact).

Concat, nearest Upsample and chunk run unchanged on uint8 tensors: their inputs share one grid by construction.

What runs where. oneDNN multiplies uint8 activations by int8 weights. With VNNI (``vpdpbusd``: CPU flags
``avx512_vnni``, ``avx_vnni`` or ``amx_int8``) the products add up in int32: exact. Without it (AVX2-only CPUs,
e.g. AMD EPYC before Zen 4, Intel before Cascade Lake / Alder Lake) oneDNN uses ``vpmaddubsw``, which adds two
u8×s8 products in *saturating int16*: 255·127·2 = 64 770 > 32 767 (yolov8n at 320 px: 9 % of the conv outputs
off, by up to 12 codes; torch.ao's x86 qconfigs use 7-bit activations, ``reduce_range``, for this reason). There,
:class:`Int8ConvBnAct` splits each weight into two halves ``w = w_hi + w_lo`` with ``|w_hi|, |w_lo| <= 64`` and runs
one convolution over the input's channels twice (``cat([x, x])`` against ``cat([w_hi, w_lo])``): every pair sum is
at most 255·64·2 = 32 640, so the int32 result is exact, in the same single oneDNN call (post-op and requantize
fused), for about twice the multiply-adds (yolov8n 640 on an AVX2-only EPYC, one thread, CPU time: 200 ms
against 135 ms unsplit and 280 ms FP32 eager; fp32 convolutions of the dequantized codes, fake-quant's own
arithmetic, took 1.2x the split path at 320 px). Which path runs is decided on the machine that runs the model, per layer
at its first call (:func:`u8s8_conv_saturates`: a small oneDNN self-test of that layer's geometry, once per process
and geometry: oneDNN picks its kernel by geometry, and its depthwise kernels add in int32 even without VNNI), so a
model converted on one CPU runs exactly on another. Layers whose weights all fit ``|w| <= 64`` never split. ``Int8Add``
(``quantized::add``) and ``Int8MaxPool`` have no u8×s8 products: exact on either kind of CPU.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _nn_module

from .. import native

CL = torch.channels_last
try:
    _QCONV = torch.ops.onednn.qconv2d_pointwise
except (AttributeError, RuntimeError):  # no oneDNN quantized conv in this build: Int8ConvBnAct says so when built
    _QCONV = None


def _hooked_globally() -> bool:
    """Whether global module hooks are registered or a jit trace is running: then every ``nn.Module.__call__`` does
    more than call ``forward``."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks or
                _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks or
                torch._C._get_tracing_state())


def _hooked(m: nn.Module) -> bool:
    """Whether ``nn.Module.__call__`` would do more than call ``forward``."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or
                _hooked_globally())


def _check_onednn():
    from ..errors import BackendError

    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        raise BackendError("this torch build lacks oneDNN quantized convolution (torch.ops.onednn.qconv2d_pointwise);"
                           " install torch 2.14.1 for x86-64: pip install torch==2.14.1 torchvision==0.29.1")


def _probe(x_shape: tuple, w_shape: tuple, stride, padding, dilation, groups: int, x_zp: int,
           direct: bool = False) -> bool:
    """Whether oneDNN's u8×s8 convolution of this geometry is wrong on all-255 codes against all-127 weights: every
    int16 pair sum (255·127·2 = 64 770) saturates there, so a kernel that adds pairs in int16 anywhere cannot pass.
    The reference: (255 - zero point)·127 times each output's number of unpadded taps and input channels, in
    float64; oneDNN's float32 output rounds sums above 2²⁴ by at most 2⁻²⁴ of the sum, far below one saturated
    pair's error (≥ 32 003). It runs at the layer's own input shape: oneDNN may pick kernels by size. ``direct``:
    the kernel :mod:`fxqat.native` runs (its own oneDNN build) instead of torch's op."""
    x = torch.full(x_shape, 255, dtype=torch.uint8).contiguous(memory_format=CL)
    cout = w_shape[0]
    w, one = torch.full(w_shape, 127, dtype=torch.int8), torch.ones(cout)
    if direct:
        y = native.Conv(native.library(), x_shape, w, one, torch.zeros(cout), stride, padding, dilation, groups,
                        (1.0, x_zp), None, "none")(x)
    else:
        packed = torch.ops.onednn.qconv_prepack(w, one, 1.0, x_zp, list(stride), list(padding), list(dilation),
                                                groups, list(x_shape))
        y = _QCONV(x, 1.0, x_zp, packed, one, torch.zeros(cout, dtype=torch.int64), None, list(stride),
                   list(padding), list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")
    taps = F.conv2d(torch.ones(1, 1, *x_shape[2:], dtype=torch.float64), torch.ones(1, 1, *w_shape[2:],
                    dtype=torch.float64), None, tuple(stride), tuple(padding), tuple(dilation))  # unpadded taps
    ref = taps * (255 - x_zp) * 127 * w_shape[1]
    return not bool(((y.double() - ref).abs() <= ref.abs() * 2.0 ** -23 + 1).all())


@functools.lru_cache(maxsize=None)
def u8s8_conv_saturates(x_shape: tuple | None = None, w_shape: tuple | None = None, stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1), groups: int = 1, zero_point: bool = False, direct: bool = False) -> bool:
    """Whether oneDNN's u8×s8 convolution on this CPU adds product pairs in saturating int16 (``vpmaddubsw``: no
    VNNI), measured once per process and geometry (:func:`_probe`).

    Without arguments: 1×1 and 3×3 dense convolutions (16 and 3 input channels), the CPU's answer for common
    layers. With a layer's input shape, weight shape, stride, padding, dilation, groups and whether its input zero
    point is nonzero: that layer's own kernel, which oneDNN picks by geometry. On an AVX2-only EPYC its depthwise
    kernel (one input channel per group) adds in int32 and is exact, where the split weights (two channels per
    group) fell to a kernel 40-250x slower (yolo11n 640: 69 % of the INT8 model's conv time). ``direct``: the
    kernel :mod:`fxqat.native` would run for that layer."""
    _check_onednn()
    if x_shape is None:
        return any(_probe((1, cin, k + 2, k + 2), (8, cin, k, k), (1, 1), (0, 0), (1, 1), 1, 0)
                   for cin, k in ((16, 1), (3, 3), (16, 3)))
    return _probe(tuple(x_shape), tuple(w_shape), stride, padding, dilation, groups, 128 if zero_point else 0,
                  direct)


def cpu_has_vnni() -> bool:
    """The CPU flags for int8 dot products in int32 (``avx512_vnni``, ``avx_vnni``, ``amx_int8``), as torch's
    cpuinfo reads them (any OS). Informative: :func:`u8s8_conv_saturates` decides (oneDNN may be capped below the
    CPU, e.g. by ``ONEDNN_MAX_CPU_ISA``)."""
    caps = torch.cpu.get_capabilities()
    return any(bool(caps.get(f)) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _split_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """``[w_hi, w_lo]`` along each group's input channels, ``w_hi + w_lo == w``, both within [-64, 64]."""
    hi = torch.div(w, 2, rounding_mode="floor")  # [-64, 63] for int8
    g = lambda t: t.unflatten(0, (groups, -1))  # noqa: E731  (G, Cout/G, Cin/G, kh, kw)
    return torch.cat([g(hi), g(w - hi)], 2).flatten(0, 1).contiguous()


def _dup(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's input channels twice, channels-last (the input :func:`_split_weight`'s weight reads)."""
    if groups == 1:
        return torch.cat([x, x], 1)
    n, c, h, w = x.shape
    return x.unflatten(1, (groups, 1, c // groups)).expand(n, groups, 2, c // groups, h, w).reshape(
        n, 2 * c, h, w).contiguous(memory_format=CL)


# torch's fused quantize kernel (round half to even, as the fake-quantizers) is 3x faster than the arithmetic
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")


def _quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """uint8 codes, channels-last. An NCHW image is quantized as it lies, then the quint8 tensor is made
    channels-last: for a 3-channel 640² image 0.09 + 0.28 ms, where a float channels-last copy first takes 0.5 ms
    and the same transpose on uint8 (not quint8) codes 0.6 ms."""
    q = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    return _codes(q.contiguous(memory_format=CL) if q.dim() == 4 else q)


def _quantize_dup(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``_dup(_quantize(x), 1)``, bit for bit: the image's channels doubled on NCHW codes (two block copies), then
    made channels-last as quint8. yolo11n's 640² image: 3.3 ms, where doubling the channels-last 3-channel codes
    (3-byte runs per pixel) took 12.3 ms (minimum of 15 calls, 1 thread, loaded AVX2 EPYC)."""
    u = _codes(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8))
    return _codes(_as_q(torch.cat([u, u], 1), (scale, zero_point)).contiguous(memory_format=CL))


def _codes(q: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of a quint8 tensor, sharing its storage (``int_repr()`` copies)."""
    return torch.empty(0, dtype=torch.uint8, device=q.device).set_(q.untyped_storage(), q.storage_offset(), q.shape,
                                                                   q.stride())


def _as_q(x: torch.Tensor, qparams: tuple[float, int]) -> torch.Tensor:
    """View uint8 codes as a quint8 tensor on ``qparams`` without copying (``_make_per_tensor_quantized_tensor``
    copies: 60 % of a residual add's time went to those copies)."""
    q = torch._empty_affine_quantized((0,), scale=qparams[0], zero_point=qparams[1], dtype=torch.quint8)
    return q.set_(x.untyped_storage(), x.storage_offset(), x.shape, x.stride())


class Quantize(nn.Module):
    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)

    def forward(self, x):
        return _quantize(x, self.scale, self.zero_point)

    def extra_repr(self):
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}"


def _dequantize(x: torch.Tensor, qparams: tuple[float, int], keep_layout: bool = False) -> torch.Tensor:
    """``(x - zero_point) * scale`` in float32, bit for bit, as one vectorized pass (torch's quint8 dequantize on
    the codes' storage); NCHW unless ``keep_layout``, made so on the uint8 codes, which move a quarter of the bytes.
    A 64×80² channels-last map: 0.15 ms, where the float arithmetic and a float transpose took 1.3 ms."""
    if x.device.type != "cpu":
        y = (x.to(torch.float32) - qparams[1]) * qparams[0]
        return y if keep_layout else y.contiguous()
    return _as_q(x if keep_layout else x.contiguous(), qparams).dequantize()


class Dequantize(nn.Module):
    """uint8 codes → float. ``keep_layout``: the float map keeps the codes' channels-last layout (its reader is a
    channels-last float conv, :class:`fxqat.passes.float_conv_layout.FloatConvChannelsLast`); else NCHW."""

    def __init__(self, scale: float, zero_point: int, keep_layout: bool = False):
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.keep_layout = bool(keep_layout)

    def forward(self, x):  # keep_layout is absent from modules pickled before it existed
        return _dequantize(x, (self.scale, self.zero_point), getattr(self, "keep_layout", False))

    def extra_repr(self):
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}" + (", channels-last" if self.keep_layout else "")


class _ProcessLocal(nn.Module):
    """A module holding process-local native state in ``self.<_LOCAL>`` (packed oneDNN weights, :mod:`fxqat.native`
    primitives): never pickled, dropped when the module moves, made again on first use."""

    _LOCAL = ""

    def _plain_call(self, *xs) -> bool:
        """Whether a call may skip ``nn.Module.__call__`` (~6 µs a call, 63 calls per yolov8n image, even without
        hooks): not when a hook is registered, under tracing (torch.fx proxies, jit), nor for tensor subclasses."""
        return all(type(x) is torch.Tensor for x in xs) and not _hooked(self)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state[self._LOCAL] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        setattr(self, self._LOCAL, None)
        return super()._apply(fn, *args, **kwargs)


class Int8ConvBnAct(_ProcessLocal):
    """conv(q(x), q(w_fold)) + b_fold → act → requantize, in one oneDNN call.

    ``split_weights``: None (default) splits the weights where oneDNN's u8×s8 kernel for this layer's geometry
    saturates on the running CPU (:func:`u8s8_conv_saturates`; depthwise kernels do not) and some ``|w| > 64``;
    True always splits (exact everywhere, ~2x the multiply-adds; a depthwise conv's split falls to a slow grouped
    kernel); False never does (wrong by up to tens of codes on CPUs without VNNI). ``keep_layout``: a float output
    stays channels-last (set by ``BinsLastHead`` where the consumer reads that layout); otherwise it is made
    NCHW-contiguous. ``quantize_input``: the input is float and quantized here to the input grid (set by
    ``QuantizeIntoConv``), so that split weights double it where that is cheap (:func:`_quantize_dup`)."""

    _LOCAL = "_packed"  # (input shape, torch op arguments | None, split, native.Conv | None)

    def __init__(self, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                 x_qparams: tuple[float, int], out_qparams: tuple[float, int] | None, act: str,
                 split_weights: bool | None = None, *, keep_layout: bool = False, quantize_input: bool = False):
        super().__init__()
        _check_onednn()
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.x_scale, self.x_zp = float(x_qparams[0]), int(x_qparams[1])
        self.float_out = out_qparams is None
        self.keep_layout = bool(keep_layout)
        self.quantize_input = bool(quantize_input)
        self.o_scale, self.o_zp = (1.0, 0) if out_qparams is None else (float(out_qparams[0]), int(out_qparams[1]))
        self.attr = act if act in ("swish", "relu", "none") else "none"
        self.register_buffer("w_int8", w_int8.contiguous())
        self.register_buffer("w_scale", w_scale.float().contiguous())
        self.register_buffer("w_zp", torch.zeros(w_scale.numel(), dtype=torch.int64))
        self.register_buffer("bias", bias.float().contiguous())
        self.split_weights = split_weights
        self._packed = None

    def _splits(self, x_shape: tuple) -> bool:
        """Whether this call runs the split weights (decided per process and input shape, at packing: see the module
        docstring)."""
        split = getattr(self, "split_weights", None)  # absent from modules pickled before it existed
        if split is None:
            return bool(self.w_int8.to(torch.int16).abs().max() > 64) and u8s8_conv_saturates(  # |-128|
                tuple(x_shape), tuple(self.w_int8.shape), tuple(self.stride), tuple(self.padding),
                tuple(self.dilation), self.groups, self.x_zp != 0)
        return bool(split)

    def _direct(self, key: tuple, split: bool) -> native.Conv | None:
        """This layer's :mod:`fxqat.native` convolution at input shape ``key``, or None where torch's op runs: the
        direct path is off or unavailable, the weights are split, or its kernel for this geometry would saturate
        (:func:`u8s8_conv_saturates` with ``direct``). A float input (``quantize_input``: the image, the classifier's
        pooled features) is quantized first, as for torch's op."""
        lib = native.library()
        if lib is None or split or self.w_int8.device.type != "cpu":
            return None
        try:
            if bool(self.w_int8.to(torch.int16).abs().max() > 64) and u8s8_conv_saturates(
                    key, tuple(self.w_int8.shape), tuple(self.stride), tuple(self.padding), tuple(self.dilation),
                    self.groups, self.x_zp != 0, direct=True):
                return None
            return native.Conv(lib, key, self.w_int8, self.w_scale, self.bias, self.stride, self.padding,
                               self.dilation, self.groups, (self.x_scale, self.x_zp),
                               None if self.float_out else (self.o_scale, self.o_zp), self.attr)
        except RuntimeError as e:  # oneDNN refused this geometry: the layer keeps torch's op, the model runs
            warnings.warn(f"fxqat.native: {e}; {self.extra_repr()} runs torch's op", stacklevel=2)
            return None

    def _call_args(self, x_shape) -> tuple | None:
        """Everything ``qconv2d_pointwise`` takes after the input, built once per input shape (nn.Module attribute
        lookups were ~10 µs of a ~30 µs call); None where the direct convolution (``_packed[3]``, made per input
        shape and torch thread count) runs instead. The weight pack is blocked for that shape: packed without it,
        oneDNN picks a layout its convolution then re-orders on every call (19 convs of yolov8n at 640).
        ``_packed[2]``: whether the input is to be doubled for split weights."""
        key = tuple(x_shape)
        if self._packed is None or self._packed[0] != key or (self._packed[3] is not None and self._packed[3].stale()):
            split = self._splits(key)
            direct = self._direct(key, split)
            if direct is not None:
                self._packed = (key, None, False, direct)
                return None
            w, shape = self.w_int8, list(key)
            if split:
                w, shape = _split_weight(w, self.groups), [shape[0], 2 * shape[1], *shape[2:]]
            w = torch.ops.onednn.qconv_prepack(w, self.w_scale, self.x_scale, self.x_zp, self.stride,
                                               self.padding, self.dilation, self.groups, shape)
            self._packed = (key, (self.x_scale, self.x_zp, w, self.w_scale, self.w_zp, self.bias, self.stride,
                                  self.padding, self.dilation, self.groups, self.o_scale, self.o_zp,
                                  torch.float32 if self.float_out else None, self.attr, [], ""), split, None)
        return self._packed[1]

    def with_options(self, *, keep_layout: bool | None = None, quantize_input: bool | None = None) -> Int8ConvBnAct:
        """A copy with another ``keep_layout`` / ``quantize_input`` (what a layout pass installs in this module's
        place); None keeps the current setting."""
        new = copy.deepcopy(self)
        if keep_layout is not None:
            new.keep_layout = bool(keep_layout)
        if quantize_input is not None:
            new.quantize_input = bool(quantize_input)
        return new

    def __call__(self, x):
        p = self._packed
        if p is not None and p[3] is not None and type(x) is torch.Tensor and x.shape == p[0] and \
                x.dtype is torch.uint8 and not p[3].stale() and x.is_contiguous(memory_format=CL) and \
                not _hooked(self):
            # the direct primitive for this shape and thread count (what forward would run), checked here, not
            # through _plain_call and forward: per-call Python was a third of a small layer's time
            return self._run(x, None)
        if not self._plain_call(x):
            return super().__call__(x)
        return self.forward(x)

    def forward(self, x):
        if getattr(self, "quantize_input", False):  # absent from modules pickled before it existed
            args = self._call_args(x.shape)
            if self._packed[2] and self.groups == 1:
                x = _quantize_dup(x, self.x_scale, self.x_zp)
            else:
                x = _quantize(x, self.x_scale, self.x_zp)
                if self._packed[2]:
                    x = _dup(x, self.groups)
            return self._run(x, args)
        if not x.is_contiguous(memory_format=CL):
            x = x.contiguous(memory_format=CL)  # e.g. a C2f split half (a strided channel slice)
        args = self._call_args(x.shape)
        if self._packed[2]:
            x = _dup(x, self.groups)
        return self._run(x, args)

    def _run(self, x, args):
        y = self._packed[3](x) if args is None else _QCONV(x, *args)  # None: the direct oneDNN primitive
        return y.contiguous() if self.float_out and not self.keep_layout else y

    @property
    def runs_direct(self) -> bool:
        """Whether the last call ran :mod:`fxqat.native`'s primitive (False before the first call)."""
        return self._packed is not None and self._packed[3] is not None

    def extra_repr(self):
        out = "float" if self.float_out else f"u8 s={self.o_scale:.4g} zp={self.o_zp}"
        out += ", in=float (quantized here)" if getattr(self, "quantize_input", False) else ""
        return (f"{self.w_int8.shape[1] * self.groups}->{self.w_int8.shape[0]}, k={tuple(self.w_int8.shape[2:])}, "
                f"s={self.stride}, act={self.attr}, out={out}")


class Int8Add(_ProcessLocal):
    """``x`` on grid ``a`` plus ``y`` on grid ``b``: requantized to ``out`` (uint8 codes), or float (``out`` None).
    On codes it runs :mod:`fxqat.native`'s oneDNN add, made once per shape (a 16×56² add: 24 → 10 µs), else
    torch's ``quantized::add`` (broadcast shapes, the direct path off or unavailable)."""

    _LOCAL = "_prim"  # (input shape, native.Add | None)
    _prim = None  # also for modules pickled before it existed

    def __init__(self, a: tuple[float, int], b: tuple[float, int], out: tuple[float, int] | None):
        super().__init__()
        self.a, self.b, self.out = a, b, out
        self._prim = None

    def _direct(self, x, y) -> native.Add | None:
        """The native add for this shape (None: torch's op), made on its first call, and again after torch's thread
        count changed."""
        if x.shape != y.shape:  # broadcast
            return None
        p = self._prim
        if p is not None and p[0] == x.shape and (p[1] is None or not p[1].stale()):
            return p[1]
        lib, add = native.library(), None
        if lib is not None and x.device.type == "cpu" and x.dim() == 4:
            try:
                add = native.Add(lib, x.shape, self.a, self.b, self.out)
            except RuntimeError as e:  # oneDNN refused: torch's op adds, the model runs
                warnings.warn(f"fxqat.native: {e}; this add runs torch's op", stacklevel=3)
        self._prim = (x.shape, add)
        return add

    def __call__(self, x, y):
        p = self._prim
        if p is not None and p[1] is not None and type(x) is torch.Tensor and type(y) is torch.Tensor and \
                x.shape == p[0] and y.shape == p[0] and not p[1].stale() and \
                x.is_contiguous(memory_format=CL) and y.is_contiguous(memory_format=CL) and not _hooked(self):
            return p[1](x, y)  # the native add for this shape and thread count (what forward would run)
        if not self._plain_call(x, y):
            return super().__call__(x, y)
        return self.forward(x, y)

    def forward(self, x, y):
        if self.out is None:
            return _dequantize(x, self.a) + _dequantize(y, self.b)
        # dense inputs: a C2f split half is a strided channel slice, which quantized::add runs 10x slower
        x, y = x.contiguous(memory_format=CL), y.contiguous(memory_format=CL)
        add = self._direct(x, y)
        if add is not None:
            return add(x, y)
        return _codes(torch.ops.quantized.add(_as_q(x, self.a), _as_q(y, self.b), self.out[0], self.out[1]))


class Int8GlobalAvgPool(nn.Module):
    """The mean over H and W of uint8 codes on grid ``x``, as float (N, C, 1, 1): the codes summed exactly in int32,
    then one float scaling. The float reference (dequantize, then average) rounds each element first: the two agree
    within 2e-7 relative. A 1280×7² map: 24 µs, where dequantize then pool took about 100."""

    def __init__(self, x: tuple[float, int]):
        super().__init__()
        self.x = x

    def forward(self, q):
        hw = q.shape[-2] * q.shape[-1]
        return (q.sum((2, 3), keepdim=True, dtype=torch.int32).float() - hw * self.x[1]) * (self.x[0] / hw)

    def extra_repr(self):
        return f"scale={self.x[0]:.6g}, zero_point={self.x[1]}"


class Int8MaxPool(nn.Module):
    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.k, self.s, self.p = pool.kernel_size, pool.stride, pool.padding

    def forward(self, x):
        # max commutes with the (monotone) dequantization, so pooling the integer codes is exact
        if x.is_cuda:
            return F.max_pool2d(x.to(torch.float16), self.k, self.s, self.p).to(torch.uint8)
        return _codes(F.max_pool2d(_as_q(x, (1.0, 0)), self.k, self.s, self.p))  # quint8 kernel: 4x the float one


class Int8Act(nn.Module):
    """Activation between two grids (used with pre-activation quantization): dequantize → act → quantize."""

    def __init__(self, x: tuple[float, int], out: tuple[float, int] | None, act: nn.Module):
        super().__init__()
        self.x, self.out, self.act = x, out, act

    def forward(self, q):
        y = self.act(_dequantize(q, self.x, keep_layout=True))
        return y.contiguous() if self.out is None else _quantize(y, *self.out)

"""Direct oneDNN convolutions, residual adds and chains of them for the INT8 torch model (``qconv.cpp``), and QAT's
fake-quant kernels (``qat.cpp``): one library, built on first use.

torch 2.14.1's ``onednn::qconv2d_pointwise`` builds its oneDNN descriptors on every call: 26–54 µs per convolution
beyond the kernel on a 2-core EPYC, 5.5 ms of a 24 ms yolo26n image (``python -m benchmarks.int8_torch
--overhead``). ``qconv.cpp`` creates each layer's oneDNN primitive once per input shape (and thread count) and then
only executes it; residual adds on codes likewise (a binary add: 2–2.5× torch's ``quantized::add`` per call).
It is compiled on the first call into ``~/.cache/fxqat/native`` (``$XDG_CACHE_HOME``) with the C++ compiler (``$CXX``,
else ``g++`` / ``c++``) against oneDNN from PyPI (``onednn-devel-cpu-gomp``, a dependency on Linux x86-64), in about
2 s. Where anything is missing (no compiler, no oneDNN, another OS, a failed build) :func:`library` returns None,
:func:`status` says why, and :class:`fxqat.modules.int8.Int8ConvBnAct` and ``Int8Add`` keep torch's ops: the
model still runs, on the slower path. ``FXQAT_NATIVE=0`` turns the direct path off.

The library is loaded with :class:`ctypes.PyDLL`: every call holds the GIL, so no two calls in a process run at
once and a primitive's scratchpad is never shared by concurrent calls (threads that run one model take turns).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCES = (Path(__file__).with_name("qconv.cpp"), Path(__file__).with_name("qat.cpp"))  # inference, QAT kernels
ABI = 9
DIST = "onednn-devel-cpu-gomp"
_reason = "not loaded yet"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxqat" / "native"


def _onednn() -> tuple[Path, Path, str]:
    """(include dir, directory of libdnnl.so.3, version) of the installed oneDNN wheel."""
    import importlib.metadata as md

    try:
        devel = md.distribution(DIST)
        runtime = md.distribution(DIST.replace("-devel", ""))
    except md.PackageNotFoundError as e:
        raise RuntimeError(f"oneDNN is not installed (pip install {DIST}==2023.2.0)") from e
    header = next((f for f in devel.files or [] if str(f).endswith("oneapi/dnnl/dnnl.hpp")), None)
    lib = next((f for f in runtime.files or [] if str(f).endswith("libdnnl.so.3")), None)
    if header is None or lib is None:
        raise RuntimeError(f"{DIST} is installed without its header or library")
    inc, libdir = Path(header.locate()).resolve().parents[2], Path(lib.locate()).resolve().parent
    return inc, libdir, runtime.version


def _compiler() -> str:
    for cxx in (os.environ.get("CXX"), "g++", "c++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    raise RuntimeError("no C++ compiler found (set CXX or install g++)")


def build() -> Path:
    """Compile ``qconv.cpp`` and ``qat.cpp`` into one library (once per sources, oneDNN and compiler) and return its
    path."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        raise RuntimeError(f"direct oneDNN convolutions are built on Linux x86-64 only, not {sys.platform}")
    inc, libdir, version = _onednn()
    cxx = _compiler()
    src = b"".join(f.read_bytes() for f in SOURCES)
    key = hashlib.sha256(src + f"{inc}|{libdir}|{version}|{cxx}|{ABI}".encode()).hexdigest()[:16]
    out = _cache_dir() / f"libfxqat_qconv-{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(out.parent)
    except OSError:  # a read-only home (containers): build into the temp dir instead
        out = Path(tempfile.gettempdir()) / f"fxqat-native-{os.getuid()}" / out.name
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        part = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", *map(str, SOURCES), f"-I{inc}",
               f"-L{libdir}", "-l:libdnnl.so.3", f"-Wl,-rpath,{libdir}", "-o", str(part)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            names = " and ".join(f.name for f in SOURCES)
            raise RuntimeError(f"compiling {names} failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
        os.replace(part, out)  # atomic: a concurrent build leaves one complete file
    return out


def _bind(path: Path) -> ctypes.PyDLL:
    lib = ctypes.PyDLL(str(path))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fxqat_qconv_abi.restype = i
    lib.fxqat_qconv_error.restype = ctypes.c_char_p
    lib.fxqat_qconv_create.restype = p
    lib.fxqat_qconv_create.argtypes = [i] * 14 + [p, p, p, f, i, f, i, i, i]
    lib.fxqat_qconv_run.restype = i
    lib.fxqat_qconv_run.argtypes = [p, p, p]
    lib.fxqat_qadd_create.restype = p
    lib.fxqat_qadd_create.argtypes = [i] * 4 + [f] * 3
    lib.fxqat_qadd_run.restype = i
    lib.fxqat_qadd_run.argtypes = [p, p, p, p]
    lib.fxqat_prim_impl.restype = ctypes.c_char_p
    lib.fxqat_prim_impl.argtypes = [p]
    lib.fxqat_fq8.restype = None
    lib.fxqat_fq8.argtypes = [p, p, p, ctypes.c_int64, f, i, i, i, f, f, i, i]
    lib.fxqat_fq8c.restype = None
    lib.fxqat_fq8c.argtypes = [p, p, p, ctypes.c_int64, ctypes.c_int64, p, p, i, i, i]
    lib.fxqat_mask_grad.restype = None
    lib.fxqat_mask_grad.argtypes = [p, p, p, ctypes.c_int64, i, i]
    lib.fxqat_observe.restype = i
    lib.fxqat_observe.argtypes = [p, ctypes.c_int64, ctypes.c_int64, p, p, i, f, i, i, i, i, f, p, p, p, i]
    lib.fxqat_fold_fq.restype = i
    lib.fxqat_fold_fq.argtypes = [p, p, ctypes.c_int64, ctypes.c_int64, i, p, p, i, f, i, i, i, f, p, p, p, p, i]
    lib.fxqat_fold_fq_grad.restype = None
    lib.fxqat_fold_fq_grad.argtypes = [p] * 5 + [ctypes.c_int64] * 2 + [p, p, i]
    lib.fxqat_chain_create.restype = p
    lib.fxqat_chain_create.argtypes = [i, i, i]
    lib.fxqat_chain_slot.restype = None
    lib.fxqat_chain_slot.argtypes = [p, i, p]
    lib.fxqat_chain_prim.restype = None
    lib.fxqat_chain_prim.argtypes = [p, p, i, i, i]
    lib.fxqat_chain_copy.restype = None
    lib.fxqat_chain_copy.argtypes = [p, i] + [ctypes.c_int64] * 2 + [i] + [ctypes.c_int64] * 4
    lib.fxqat_chain_run.restype = i
    lib.fxqat_chain_run.argtypes = [p, ctypes.POINTER(p)]
    lib.fxqat_chain_destroy.restype = None
    lib.fxqat_chain_destroy.argtypes = [p]
    lib.fxqat_prim_destroy.restype = None
    lib.fxqat_prim_destroy.argtypes = [p]
    if lib.fxqat_qconv_abi() != ABI:
        raise RuntimeError(f"{path} has another ABI than this fxqat")
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> ctypes.PyDLL | None:
    global _reason
    if os.environ.get("FXQAT_NATIVE", "1") == "0":
        _reason = "turned off (FXQAT_NATIVE=0)"
        return None
    try:
        lib = _bind(build())
    except (RuntimeError, OSError) as e:
        _reason = str(e)
        return None
    _reason = "ok"
    return lib


ENABLED = True  # False: every INT8 conv runs torch's op (the reference the tests and benchmarks compare against)


def library() -> ctypes.PyDLL | None:
    """The bound library, or None (direct path off or unavailable: :func:`status` says why)."""
    return _load() if ENABLED else None


def status() -> str:
    """'ok', or why the direct path is not used."""
    if not ENABLED:
        return "turned off (fxqat.native.ENABLED = False)"
    _load()
    return _reason


def summary() -> str:
    """One line for reports: which path the INT8 torch model's convolutions take, and why."""
    st = status()
    if st != "ok":
        return f"torch's op; fxqat.native: {st}"
    from ..modules import int8_chain

    return "direct oneDNN primitives (fxqat.native)" + (
        ", each run of convs / adds / concats / splits in one call" if int8_chain.CHAINS else
        ", one call per node (fxqat.modules.int8_chain.CHAINS = False)")


class _Primitive:
    """A oneDNN primitive made by the library (``fxqat_<kind>_create``); run with the caller's buffers, freed with this
    object. oneDNN fixes a primitive's thread count when it creates it (``torch.get_num_threads()`` then): once torch's
    count changes the primitive is :meth:`stale` and its module makes a new one."""

    kind, what = "", ""

    def _made(self, lib: ctypes.PyDLL, handle) -> None:
        n, c, h, w = self.out_shape
        self._strides = (h * w * c, 1, w * c, c)  # channels-last: torch.empty_strided is 0.5 µs a call cheaper
        self.threads = torch.get_num_threads()
        self._lib, self.handle = lib, handle
        self._exec = getattr(lib, f"fxqat_{self.kind}_run")
        if not handle:
            raise RuntimeError(f"oneDNN refused the {self.what}: {lib.fxqat_qconv_error().decode()}")
        self.impl = lib.fxqat_prim_impl(handle).decode()

    def stale(self) -> bool:
        """Whether torch's thread count changed since this primitive was made."""
        return self.threads != torch.get_num_threads()

    def _failed(self):
        raise RuntimeError(f"oneDNN {self.what} failed: {self._lib.fxqat_qconv_error().decode()}")

    def __del__(self):
        if getattr(self, "handle", None):
            self._lib.fxqat_prim_destroy(self.handle)
            self.handle = None


class Conv(_Primitive):
    """One oneDNN convolution primitive (a layer at one input shape)."""

    kind, what = "qconv", "convolution"

    def __init__(self, lib: ctypes.PyDLL, x_shape, w_int8, w_scale, bias, stride, padding, dilation, groups: int,
                 x_qparams: tuple[float, int], out_qparams: tuple[float, int] | None, act: str):
        n, c, h, w = (int(v) for v in x_shape)
        o, _, kh, kw = w_int8.shape
        wt, ws, b = (t.detach().contiguous() for t in (w_int8, w_scale.float(), bias.float()))  # copied by oneDNN
        o_scale, o_zp = out_qparams if out_qparams is not None else (1.0, 0)
        oh = (h + 2 * padding[0] - (kh - 1) * dilation[0] - 1) // stride[0] + 1
        ow = (w + 2 * padding[1] - (kw - 1) * dilation[1] - 1) // stride[1] + 1
        self.out_shape = (n, o, oh, ow)
        self.out_dtype = torch.uint8 if out_qparams is not None else torch.float32
        self._made(lib, lib.fxqat_qconv_create(
            n, c, h, w, o, kh, kw, *stride, *padding, *dilation, groups, wt.data_ptr(), ws.data_ptr(), b.data_ptr(),
            float(x_qparams[0]), int(x_qparams[1]), float(o_scale), int(o_zp), {"swish": 1, "relu": 2}.get(act, 0),
            int(out_qparams is None)))

    def __call__(self, x):  # written out per kind: a generic *args call was ~1 µs of a ~7 µs call
        y = torch.empty_strided(self.out_shape, self._strides, dtype=self.out_dtype)
        if self._exec(self.handle, x.data_ptr(), y.data_ptr()):
            self._failed()
        return y


class Add(_Primitive):
    """The residual add on codes for one shape: ``a`` on grid ``qa`` plus ``b`` on ``qb``, requantized to ``qo``
    (dense channels-last uint8 maps in and out)."""

    kind, what = "qadd", "add"

    def __init__(self, lib: ctypes.PyDLL, shape, qa: tuple[float, int], qb: tuple[float, int], qo: tuple[float, int]):
        ka, kb = qa[0] / qo[0], qb[0] / qo[0]
        self.out_shape, self.out_dtype = tuple(int(v) for v in shape), torch.uint8
        self._made(lib, lib.fxqat_qadd_create(*self.out_shape, ka, kb, qo[1] - qa[1] * ka - qb[1] * kb))

    def __call__(self, a, b):
        y = torch.empty_strided(self.out_shape, self._strides, dtype=self.out_dtype)
        if self._exec(self.handle, a.data_ptr(), b.data_ptr(), y.data_ptr()):
            self._failed()
        return y

"""Loading and saving model files, safely.

Every ``torch.load`` in fxqat goes through :func:`load_file`:

* fxqat QAT checkpoints hold plain tensors, dicts and strings only and are always read with
  ``torch.load(weights_only=True)`` and no extra globals; their tensors carry a sha256 digest verified on load.
  A file that claims to be an fxqat checkpoint but needs pickled classes is refused, even when trusted.
* Ultralytics ``.pt`` files are read with ``weights_only=True`` inside ``torch.serialization.safe_globals`` holding
  only the classes the file references from an allow-list (:func:`allowed_global`): Ultralytics / torch.nn modules,
  IterableSimpleNamespace, numpy scalars, paths and a ``getattr`` restricted to module classes. Anything else is
  refused with a :class:`ModelLoadError` naming the globals and the opt-in: ``trust=True`` or
  ``FXQAT_TRUST_PICKLE=1``, which unpickles the file with ``weights_only=False``.

A QAT checkpoint holds the Ultralytics model YAML, the qconfig as YAML text, the prepare arguments (``leaf_modules``
as strings, ``nc``), the QAT graph's state_dict (weights, BN statistics, every quantizer's scale / zero-point /
observer state), the per-module flags (BN frozen, observers on), and optionally optimizer/EMA/epoch/training
arguments for resuming. Loading re-runs ``prepare_qat`` on the YAML and loads the state: no pickled classes.
Writes are atomic (temporary file + ``os.replace``, mode 0666 minus the umask): a kill mid-write leaves the
previous file.
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import importlib
import os
import pickle
import pickletools
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import ModelLoadError
from .quant.fake_quant import FakeQuant

FORMAT = 2  # 2: digest + prepare_args; 1 (no digest) is still read
TRUST_ENV = "FXQAT_TRUST_PICKLE"
OPT_IN = (f"if you trust where this file comes from, opt in with trust=true (CLI) / trust=True (Python) or "
          f"{TRUST_ENV}=1")

# ------------------------------------------------------------------------------------------- the allow-list
_MODULE_NAMESPACES = ("torch.nn.modules.", "ultralytics.nn.modules.")  # nn.Module classes defined there
_MODULE_FILES = ("ultralytics.nn.tasks",)  # DetectionModel and the other task models
_CLASS_FILES = ("ultralytics.utils.loss", "ultralytics.utils.tal",  # loss objects older checkpoints pickle
                "torchvision.transforms.transforms")  # a classify model's preprocessing (model.transforms)


def trusted(trust: bool | None = None) -> bool:
    """``trust``, or the environment's ``FXQAT_TRUST_PICKLE`` when ``trust`` is None."""
    if trust is not None:
        return bool(trust)
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _restricted_getattr(obj, name):
    """``getattr`` as Ultralytics pickles use it (``Detect.forward``, enum members), and nothing else."""
    if isinstance(obj, type) and not name.startswith("_") and issubclass(obj, (nn.Module, enum.Enum)):
        return getattr(obj, name)
    if isinstance(obj, nn.Module) and name in ("forward", "forward_fuse"):
        return getattr(type(obj), name).__get__(obj)
    raise pickle.UnpicklingError(f"getattr({type(obj).__name__}, {name!r}) is not on fxqat's allow-list")


@functools.lru_cache(maxsize=1)
def _data_globals() -> dict:
    import pathlib

    import numpy as np
    from ultralytics.utils import IterableSimpleNamespace

    scalar = np.float64(0).__reduce__()[0]
    path = pathlib.WindowsPath if os.name == "nt" else pathlib.PosixPath
    out = {"numpy.dtype": np.dtype, "numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar,
           "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
           "ultralytics.yolo.utils.IterableSimpleNamespace": IterableSimpleNamespace,
           "builtins.getattr": _restricted_getattr}
    for t in (np.float64, np.float32, np.int64, np.int32, np.bool_):
        dt = type(np.dtype(t))
        out[f"{dt.__module__}.{dt.__qualname__}"] = dt
    for m in ("pathlib", "pathlib._local"):
        for c in ("PosixPath", "WindowsPath"):
            out[f"{m}.{c}"] = path
    try:  # the resize mode of a classify model's transforms (an enum)
        from torchvision.transforms.functional import InterpolationMode

        out["torchvision.transforms.functional.InterpolationMode"] = InterpolationMode
    except ImportError:
        pass
    return out


def allowed_global(name: str):
    """The object ``name`` ("module.Class") stands for if fxqat's allow-list admits it, else None.

    Admitted: nn.Module classes defined in ``torch.nn.modules.*``, ``ultralytics.nn.modules.*`` and
    ``ultralytics.nn.tasks``; classes defined in Ultralytics' loss / assigner modules and torchvision's transforms
    (a classify checkpoint's ``model.transforms``); the data globals above.
    """
    if name in _data_globals():
        return _data_globals()[name]
    module, _, attr = name.rpartition(".")
    if not (module.startswith(_MODULE_NAMESPACES) or module in _MODULE_FILES + _CLASS_FILES) or attr.startswith("_"):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if not isinstance(obj, type) or obj.__module__ != module:
        return None
    if module in _CLASS_FILES or issubclass(obj, nn.Module):
        return obj
    return None


def unsafe_globals(path) -> list[str] | None:
    """Globals the pickle in ``path`` references beyond torch's weights-only set (None: not a zip checkpoint)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - legacy (non-zip) format or not a torch file at all
        return None


def claims_fxqat(path) -> bool:
    """True if ``path``'s pickle is a dict whose first key is ``"fxqat"`` (read by pickletools, nothing executed)."""
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl")), None)
            if pkl is None:
                return False
            with z.open(pkl) as f:
                head = f.read(4096)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return False
    try:
        for i, (op, arg, _) in enumerate(pickletools.genops(head)):
            if isinstance(arg, str) and "UNICODE" in op.name:
                return arg == "fxqat"
            if i > 16:
                return False
    except Exception:  # noqa: BLE001 - truncated head or garbage: not our format
        return False
    return False


def _unreadable(path, e, fxqat_only: bool = False) -> ModelLoadError:
    what = "an fxqat QAT checkpoint" if fxqat_only else "a readable PyTorch checkpoint"
    first = (str(e).splitlines() or [""])[0][:200]
    return ModelLoadError(f"{path}: not {what} ({type(e).__name__}: {first})")


def load_file(path, trust: bool | None = None, fxqat_only: bool = False):
    """``torch.load`` of a user's file, safely (see the module docstring). The one place fxqat unpickles a file.

    ``fxqat_only``: the caller wants an fxqat checkpoint; nothing beyond torch's weights-only set is admitted,
    whatever ``trust`` says.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint not found")
    needed = unsafe_globals(path)
    if needed is not None:
        entries = {n: (None if fxqat_only else allowed_global(n)) for n in needed}
        refused = sorted(n for n, obj in entries.items() if obj is None)
        if "numpy.dtype" in entries and not refused:  # numpy dtype classes are built at load, absent from the scan
            entries.update({n: o for n, o in _data_globals().items() if n.startswith("numpy.dtypes.")})
    else:  # legacy format: let the weights-only unpickler name what it refuses
        entries, refused = {}, []
    if not refused:
        try:
            with torch.serialization.safe_globals([(obj, n) for n, obj in entries.items()]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "Unsupported global" not in msg and "not on fxqat's allow-list" not in msg:
                raise _unreadable(path, e, fxqat_only) from None
            refused = [msg.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in msg else msg.splitlines()[0][:160]]
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, or not a torch file
            raise _unreadable(path, e, fxqat_only) from None
    what = ", ".join(refused[:6]) + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
    if claims_fxqat(path):
        raise ModelLoadError(f"{path}: claims to be an fxqat QAT checkpoint but holds pickled objects ({what}); "
                             "fxqat checkpoints hold tensors only, so this file is refused (it may be tampered with)")
    if fxqat_only:
        raise ModelLoadError(f"{path}: not an fxqat QAT checkpoint (it holds pickled objects: {what}); "
                             "make one with fxqat qat")
    if not trusted(trust):
        raise ModelLoadError(f"{path}: refused to unpickle {what}: not on fxqat's allow-list of Ultralytics / torch "
                             f"classes, and loading it could run code from the file; {OPT_IN}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from None


# ------------------------------------------------------------------------------------------- fxqat checkpoints
def _flags(gm: nn.Module) -> dict:
    out = {}
    for name, m in gm.named_modules():
        if isinstance(m, FakeQuant):
            out[name] = {"observe": bool(m.observe_enabled), "fake_quant": bool(m.fake_quant_enabled)}
        elif hasattr(m, "bn_frozen"):
            out[name] = {"bn_frozen": bool(m.bn_frozen)}
    return out


def _apply_flags(gm: nn.Module, flags: dict) -> None:
    mods = dict(gm.named_modules())
    for name, f in flags.items():
        m = mods.get(name)
        if m is None:
            continue
        if "observe" in f:
            m.observe_enabled, m.fake_quant_enabled = f["observe"], f["fake_quant"]
        if "bn_frozen" in f:
            m.bn_frozen = f["bn_frozen"]


def _leaf_name(x) -> str:
    return f"{x.__module__}.{x.__qualname__}" if isinstance(x, type) else str(x)


def _leaf_resolve(s: str):
    """A recorded leaf back to a type when it names a class of an already-imported module (nothing is imported)."""
    module, _, attr = s.rpartition(".")
    obj = getattr(sys.modules.get(module), attr, None) if module else None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else s


def prepare_args(gm: fx.GraphModule) -> dict:
    """The ``prepare_qat`` arguments that rebuild ``gm``'s graph: ``leaf_modules`` (as strings) and ``nc``."""
    meta = gm.meta
    given = dict(meta.get("prepare_args") or {})
    leaves = given.get("leaf_modules", meta.get("leaf_modules")) or ()
    return {"leaf_modules": [_leaf_name(x) for x in leaves], "nc": int(given.get("nc") or meta["nc"])}


def digest(ckpt: dict) -> str:
    """sha256 over every key name and value of ``ckpt`` (tensors: dtype, shape and bytes), in order; ``digest``
    itself excluded."""
    h = hashlib.sha256()

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            items = [(k, v) for k, v in obj.items() if not (obj is ckpt and k == "digest")]
            h.update(f"D{len(items)}".encode())
            for k, v in items:
                h.update(f"K{k!r}".encode())
                walk(v)
        elif isinstance(obj, (list, tuple)):
            h.update(f"L{len(obj)}".encode())
            for v in obj:
                walk(v)
        else:
            h.update(f"V{obj!r}".encode())

    walk(ckpt)
    return h.hexdigest()


def qat_state(gm: fx.GraphModule) -> dict:
    """Everything needed to rebuild ``gm`` (a graph from :func:`fxqat.prepare_qat`)."""
    from .qconfig.io import dump_qconfig

    meta = gm.meta
    return {
        "fxqat": FORMAT,
        "yaml": copy.deepcopy(meta.get("yaml")),
        "nc": int(meta["nc"]),
        "names": {int(k): str(v) for k, v in meta["names"].items()},
        "qconfig": dump_qconfig(meta["qconfig"]),
        "prepare_args": prepare_args(gm),
        "state_dict": {k: v.detach().cpu().clone() for k, v in gm.state_dict().items()},
        "flags": _flags(gm),
        **({"end2end": bool(meta["end2end"])} if "end2end" in meta else {}),  # an end-to-end head's eval path
    }


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path, gm: fx.GraphModule, **extra) -> Path:
    """Atomically write ``gm``'s QAT state (+ ``extra``: epoch, optimizer, ema, metrics, ...) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = qat_state(gm)
    ckpt.update(extra)
    ckpt["digest"] = digest(ckpt)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _without_identity_act_quantizers(gm: fx.GraphModule, state: dict, source: str) -> dict:
    """``state`` less the output quantizers that checkpoints written before fxqat fused ``nn.Identity`` activations
    into their convs hold after each such activation (``quant.<conv>_act.*``: yolo11's, YOLO26's and YOLOv10's
    ``Conv(act=False)``). The conv's own output quantizer is kept; the model loses that second rounding, and the
    user is told."""
    names = {n.target.replace(".", "_") for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(getattr(gm.get_submodule(n.target), "act", None), nn.Identity)}
    prefixes = {f"quant.{name}_act." for name in names} - {k.rsplit(".", 1)[0] + "." for k in gm.state_dict()}
    dropped = sorted({k.split(".")[1] for k in state if any(k.startswith(p) for p in prefixes)})
    if not dropped:
        return state
    import warnings

    warnings.warn(f"{source}: written by an earlier fxqat, with a second output quantizer after {len(dropped)} "
                  f"identity activations ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}); fxqat now "
                  "fuses those activations into their convs, so each conv's output is rounded once: outputs may "
                  "differ by a quantization step there. Save it again to silence this.", stacklevel=3)
    return {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}


def rebuild(ckpt: dict, source: str = "checkpoint") -> fx.GraphModule:
    from ultralytics.nn.tasks import guess_model_task

    from .passes.pipeline import prepare_qat
    from .qconfig.io import load_qconfig
    from .tasks import TASKS

    args = ckpt.get("prepare_args") or {}
    leaves = [_leaf_resolve(str(s)) for s in args.get("leaf_modules", [])]
    task = guess_model_task(ckpt["yaml"])  # the task's model class, as Ultralytics builds it from the YAML
    if task not in TASKS:
        raise ModelLoadError(f"{source}: a {task} model; fxqat checkpoints hold {', '.join(TASKS)} models")
    det = TASKS[task].cls("model")(copy.deepcopy(ckpt["yaml"]), nc=int(args.get("nc") or ckpt["nc"]), verbose=False)
    det.names = dict(ckpt["names"])
    if "end2end" in ckpt:
        det.end2end = bool(ckpt["end2end"])  # one-to-one (top-k) or one-to-many eval output, as saved
    gm = prepare_qat(det, load_qconfig(ckpt["qconfig"]), leaf_modules=leaves)
    missing, unexpected = gm.load_state_dict(_without_identity_act_quantizers(gm, ckpt["state_dict"], source),
                                             strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"{source}: does not fit the rebuilt QAT graph: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    _apply_flags(gm, ckpt.get("flags", {}))
    gm.meta["names"] = dict(ckpt["names"])
    gm.meta.setdefault("prepare_args", {"leaf_modules": list(args.get("leaf_modules", [])), "nc": ckpt["nc"]})
    return gm


def is_checkpoint(path) -> bool:
    """True if ``path`` looks like an fxqat QAT checkpoint (its pickle's first key; nothing is unpickled)."""
    path = Path(path)
    return path.suffix == ".pt" and path.is_file() and claims_fxqat(path)


def read_checkpoint(path) -> dict:
    """The verified checkpoint dict at ``path`` (weights-only, format and digest checked)."""
    path = Path(path)
    ckpt = load_file(path, fxqat_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("fxqat") not in (1, FORMAT):
        raise ModelLoadError(f"{path}: not an fxqat QAT checkpoint (format {FORMAT})")
    if ckpt["fxqat"] >= 2:
        if "digest" not in ckpt:
            raise ModelLoadError(f"{path}: fxqat checkpoint without its digest; the file is damaged or was edited")
        if digest(ckpt) != ckpt["digest"]:
            raise ModelLoadError(f"{path}: digest mismatch: the checkpoint's tensors changed since it was written "
                                 "(damaged file or edited); restore it from a copy")
    return ckpt


def load_checkpoint(path, with_extra: bool = False):
    """The QAT GraphModule saved at ``path`` (and the whole checkpoint dict when ``with_extra``)."""
    ckpt = read_checkpoint(path)
    gm = rebuild(ckpt, str(path))
    return (gm, ckpt) if with_extra else gm

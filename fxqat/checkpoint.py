"""fxqat QAT checkpoints: plain tensors, dicts and strings only (``torch.load(weights_only=True)`` reads them).

A checkpoint holds the Ultralytics model YAML, the qconfig as YAML text, the QAT graph's state_dict (weights, BN
statistics, every quantizer's scale / zero-point / observer state), the per-module flags (BN frozen, observers on),
and optionally optimizer/EMA/epoch for resuming. Loading re-runs ``prepare_qat`` on the YAML and loads the state:
no pickled classes. Writes are atomic (temporary file + ``os.replace``): a kill mid-write leaves the previous file.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import ModelLoadError
from .quant.fake_quant import FakeQuant

FORMAT = 1


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
        "state_dict": {k: v.detach().cpu().clone() for k, v in gm.state_dict().items()},
        "flags": _flags(gm),
    }


def save_checkpoint(path, gm: fx.GraphModule, **extra) -> Path:
    """Atomically write ``gm``'s QAT state (+ ``extra``: epoch, optimizer, ema, metrics, ...) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = qat_state(gm)
    ckpt.update(extra)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def rebuild(ckpt: dict) -> fx.GraphModule:
    from ultralytics.nn.tasks import DetectionModel

    from .passes.pipeline import prepare_qat
    from .qconfig.io import load_qconfig

    det = DetectionModel(copy.deepcopy(ckpt["yaml"]), nc=ckpt["nc"], verbose=False)
    det.names = dict(ckpt["names"])
    gm = prepare_qat(det, load_qconfig(ckpt["qconfig"]))
    missing, unexpected = gm.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint does not fit the rebuilt QAT graph: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    _apply_flags(gm, ckpt.get("flags", {}))
    gm.meta["names"] = dict(ckpt["names"])
    return gm


def is_checkpoint(path) -> bool:
    """True if ``path`` is an fxqat QAT checkpoint (read with weights_only=True; Ultralytics .pt files are not)."""
    path = Path(path)
    if path.suffix != ".pt" or not path.is_file():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - pickled classes (an Ultralytics checkpoint) or not a checkpoint at all
        return False
    return isinstance(ckpt, dict) and ckpt.get("fxqat") == FORMAT


def load_checkpoint(path, with_extra: bool = False):
    """The QAT GraphModule saved at ``path`` (and the whole checkpoint dict when ``with_extra``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelLoadError(f"{path}: not an fxqat QAT checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("fxqat") != FORMAT:
        raise ModelLoadError(f"{path}: not an fxqat QAT checkpoint (format {FORMAT})")
    gm = rebuild(ckpt)
    return (gm, ckpt) if with_extra else gm

"""``fxqat.calibrate``: observe activation ranges on data without training (PTQ), with a progress bar."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import FxqatError
from .quant.fake_quant import fake_quants


def _batches(data, imgsz: int, batch: int):
    if isinstance(data, torch.Tensor):
        yield data.float() / 255.0 if data.dtype == torch.uint8 else data
        return
    if isinstance(data, (str,)) or hasattr(data, "__fspath__"):
        from .data.images import iter_image_batches

        yield from iter_image_batches(data, imgsz=imgsz, batch=batch)
        return
    for item in data:
        if isinstance(item, dict):
            item = item["img"]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if item.dtype == torch.uint8:
            item = item.float() / 255.0
        yield item


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable | str, batches: int | None = 32, imgsz: int = 640, batch: int = 8,
              progress: bool = True) -> nn.Module:
    """Run up to ``batches`` batches through ``model`` in eval mode while every quantizer observes.

    ``data``: an iterable of image tensors (B, 3, H, W) in [0, 1] (uint8 is scaled), dicts with ``img``, a folder
    of images, or an Ultralytics data YAML (its ``val`` images). Returns the model (in eval mode).
    """
    fqs = fake_quants(model)
    if not fqs:
        raise ValueError("calibrate: the model has no fxqat quantizers; build it with fxqat.prepare_qat first")
    device = next(model.parameters()).device
    model.eval()
    for fq in fqs:
        fq.calibrating = True
    # Moving-average observers average per-batch ranges with a 1 % step meant for long QAT runs; over a short
    # calibration that under-estimates ranges (clipping). During calibration they take the cumulative mean instead.
    saved = {fq: fq.observer.averaging_constant for fq in fqs if hasattr(fq.observer, "averaging_constant")}
    calls = {fq: 0 for fq in saved}

    def _hook(fq, args):
        calls[fq] += 1
        fq.observer.averaging_constant = 1.0 / calls[fq]

    handles = [fq.register_forward_pre_hook(_hook) for fq in saved]
    try:
        it = _batches(data, imgsz, batch)
        for i, x in enumerate(tqdm(it, total=batches, desc="calibrate", disable=not progress, unit="batch")):
            if batches is not None and i >= batches:
                break
            if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 4:
                raise FxqatError(f"calibrate: batch {i} is not a float image tensor (B, 3, H, W): "
                                 f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
            if not bool(torch.isfinite(x).all()):  # one NaN would poison every observer's range for good
                bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
                raise FxqatError(f"calibrate: batch {i} holds NaN/Inf values (first in image {bad} of the batch); "
                                 "observers would record unusable ranges")
            model(x.to(device))
    finally:
        for h in handles:
            h.remove()
        for fq, c in saved.items():
            fq.observer.averaging_constant = c
        for fq in fqs:
            fq.calibrating = False
    return model

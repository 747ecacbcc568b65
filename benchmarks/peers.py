"""Peer models measured beside fxqat: Ultralytics FP32 eager and plain torch.ao FX INT8 (default qconfig)."""

from __future__ import annotations

import copy
import warnings

import torch

import fxqat
from fxqat.tracing import DetectDecode


def plain_torch_ao_int8(model, engine: str, calib: list[torch.Tensor]):
    """torch.ao's own FX route on fxqat's trace: default qconfig mapping for ``engine``, PTQ, convert_fx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    gm = fxqat.trace(copy.deepcopy(model), "eval")
    gm.eval()
    cfg = {"non_traceable_module_class": [DetectDecode]}
    prepared = prepare_fx(gm, get_default_qconfig_mapping(engine), (calib[0],), prepare_custom_config=cfg)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)

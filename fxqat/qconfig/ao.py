"""Bridge from a torch.ao ``QConfigMapping`` to fxqat rules.

Translated: the global qconfig (weight and activation specs), ``set_module_name`` entries (module-path rules; None =
leave float) and ``set_object_type`` entries whose type is an Ultralytics block (block rules). Observers map by class
(:data:`fxqat.quant.backend.AO_OBSERVER_KINDS`): ``FusedMovingAvgObsFakeQuantize`` (torch.ao's default QAT
fake-quant) → moving_average, ``FakeQuantize`` takes its observer's kind, MinMax → minmax, Histogram → histogram.
Bits come from quant_min/quant_max. torch.ao's op-level entries (sigmoid, layer_norm, ...) do not apply: fxqat
decides where quantizers go from the graph's patterns.
"""

from __future__ import annotations

import math

import torch

from ..errors import QConfigError
from ..quant.backend import AO_OBSERVER_KINDS, QConfigMapping, ao_observer_kind
from ..quant.spec import QuantSpec, short
from .config import DEFAULT_RULES, QConfig, Rule
from .schema import block_names, check_overrides

PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine, torch.per_channel_affine_float_qparams)
SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def is_qconfig_mapping(x) -> bool:
    return isinstance(x, QConfigMapping)


def _fields(factory, weight: bool, where: str) -> dict:
    """The QuantSpec fields of one torch.ao observer / fake-quantize factory."""
    obs = factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
    kind = ao_observer_kind(obs)
    if kind is None:
        names = ", ".join(dict.fromkeys(c.__name__ for c, _ in AO_OBSERVER_KINDS))
        raise QConfigError(f"{where}: torch.ao {type(obs).__name__} has no fxqat equivalent; supported: {names}")
    qscheme = getattr(obs, "qscheme", torch.per_tensor_affine)
    qmin, qmax = getattr(obs, "quant_min", None), getattr(obs, "quant_max", None)
    if qmin is None or qmax is None:
        dtype = getattr(obs, "dtype", torch.quint8)
        qmin, qmax = (-128, 127) if dtype == torch.qint8 else (0, 255)
    levels = int(qmax) - int(qmin) + 1
    bits = int(round(math.log2(levels))) if levels > 1 else 0
    if levels < 2 or 2 ** bits != levels:
        raise QConfigError(f"{where}: quant_min..quant_max = {qmin}..{qmax} is not a full 2**bits grid; fxqat's grids "
                           "are 0..2**bits-1 or -2**(bits-1)..2**(bits-1)-1")
    out = {"bits": bits, "symmetric": qscheme in SYMMETRIC, "observer": kind}
    if qscheme in PER_CHANNEL:
        if not weight:
            raise QConfigError(f"{where}: per-channel activation quantization ({qscheme}); fxqat quantizes "
                               "activations per tensor")
        out["per_channel"] = int(getattr(obs, "ch_axis", 0))
    elif weight:
        out["per_channel"] = None
    return out


def _spec(factory, weight: bool, where: str) -> QuantSpec:
    return QuantSpec(**_fields(factory, weight, where))


def _rule(level: str, pattern: str, qc, where: str) -> Rule:
    if qc is None:
        return Rule(level, pattern, skip=True, where=where)
    w = check_overrides(_fields(qc.weight, True, where), "weight", QuantSpec(), lambda _k: where)
    a = check_overrides(_fields(qc.activation, False, where), "activation", QuantSpec(), lambda _k: where)
    return Rule(level, pattern, weight=w, activation=a, where=where)


def from_qconfig_mapping(m) -> QConfig:
    g = m.global_qconfig
    if g is None:
        raise QConfigError("QConfigMapping has no global qconfig; set one with set_global(...)")
    qc_w, qc_a = _spec(g.weight, True, "QConfigMapping global weight"), \
        _spec(g.activation, False, "QConfigMapping global activation")
    rules = list(DEFAULT_RULES)
    blocks = set(block_names())
    for typ, qc in m.object_type_qconfigs.items():
        name = getattr(typ, "__name__", None)
        if isinstance(typ, type) and name in blocks:
            rules.append(_rule("block", name, qc, f"QConfigMapping object_type {name}"))
    for name, qc in m.module_name_qconfigs.items():
        if not isinstance(name, str) or not name:
            raise QConfigError(f"QConfigMapping module name {short(name)}: a module path such as 'model.2'")
        rules.append(_rule("module", name, qc, f"QConfigMapping module {name}"))
    return QConfig(weight=qc_w, activation=qc_a, rules=tuple(rules), source="QConfigMapping")

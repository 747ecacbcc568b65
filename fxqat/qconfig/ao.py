"""Bridge from a torch.ao ``QConfigMapping`` (global, module-name and object-type entries) to fxqat rules."""

from __future__ import annotations

import torch

from ..errors import QConfigError
from ..quant.backend import QConfigMapping
from ..quant.spec import QuantSpec
from .config import DEFAULT_RULES, QConfig, Rule


def is_qconfig_mapping(x) -> bool:
    return isinstance(x, QConfigMapping)


def _spec(factory, weight: bool) -> QuantSpec:
    obs = factory()
    qscheme = getattr(obs, "qscheme", torch.per_tensor_affine)
    symmetric = qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
    per_channel = getattr(obs, "ch_axis", 0) if qscheme in (torch.per_channel_symmetric,
                                                            torch.per_channel_affine) else None
    qmin, qmax = getattr(obs, "quant_min", None), getattr(obs, "quant_max", None)
    bits = int(round(torch.log2(torch.tensor(float(qmax - qmin + 1))).item())) if qmin is not None else 8
    name = type(obs).__name__
    observer = "moving_average" if "MovingAverage" in name else "histogram" if "Histogram" in name else "minmax"
    return QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel, observer=observer)


def from_qconfig_mapping(m) -> QConfig:
    g = m.global_qconfig
    if g is None:
        raise QConfigError("QConfigMapping has no global qconfig; set one with set_global(...)")
    qc_w, qc_a = _spec(g.weight, True), _spec(g.activation, False)
    rules = list(DEFAULT_RULES)
    for name, qc in m.module_name_qconfigs.items():
        rules.append(Rule("module", name, skip=True, where="QConfigMapping") if qc is None else
                     Rule("module", name, weight={k: getattr(_spec(qc.weight, True), k) for k in
                                                  ("bits", "symmetric", "per_channel", "observer")},
                          activation={k: getattr(_spec(qc.activation, False), k) for k in
                                      ("bits", "symmetric", "observer")}, where="QConfigMapping"))
    return QConfig(weight=qc_w, activation=qc_a, rules=tuple(rules), source="QConfigMapping")

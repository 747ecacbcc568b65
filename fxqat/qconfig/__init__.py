"""Per-layer quantization configuration: dataclasses, YAML io and validation, and the torch.ao bridge."""

from __future__ import annotations

from pathlib import Path

from ..errors import QConfigError
from .config import DEFAULT_RULES, FLOAT, LEVELS, QConfig, Rule
from .io import dump_qconfig, load_qconfig, preset_names, qconfig_from_mapping


def as_qconfig(qconfig) -> QConfig:
    """None → defaults; a QConfig; a dict; a YAML path, a built-in preset's name ("tensorrt") or YAML text; or a
    torch.ao ``QConfigMapping``."""
    if qconfig is None:
        return QConfig()
    if isinstance(qconfig, QConfig):
        return qconfig
    if isinstance(qconfig, dict):
        return qconfig_from_mapping(qconfig)
    if isinstance(qconfig, (str, Path)):
        return load_qconfig(qconfig)
    from .ao import from_qconfig_mapping, is_qconfig_mapping

    if is_qconfig_mapping(qconfig):
        return from_qconfig_mapping(qconfig)
    raise QConfigError(f"qconfig of type {type(qconfig).__name__}: give None, a dict, a YAML path, a preset name "
                       f"({', '.join(preset_names())}), a QConfig or a torch.ao QConfigMapping")


__all__ = ["QConfig", "Rule", "LEVELS", "FLOAT", "DEFAULT_RULES", "as_qconfig", "load_qconfig", "dump_qconfig",
           "preset_names"]

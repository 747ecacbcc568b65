"""Exceptions a user can act on. Every message names the input, the node or module path, and the valid choices."""

from __future__ import annotations


class FxqatError(Exception):
    """Base class of every error fxqat raises for bad input. The CLI prints these as one line, without traceback."""


class ModelLoadError(FxqatError):
    """A model given to fxqat could not be loaded (unknown YAML, missing or corrupt checkpoint, wrong task)."""


class TraceError(FxqatError):
    """A module could not be symbolically traced; the message names its path and type and how to make it a leaf."""


class QConfigError(FxqatError):
    """A qconfig is invalid; the message names the file and line, the offending key or rule, and the valid choices."""


class BackendError(FxqatError):
    """The quantization backend (torch.ao.quantization) is missing or lacks an operator fxqat needs."""


class ConvertError(FxqatError):
    """A QAT model cannot be converted or exported as asked (uninitialized quantizers, an op kind without an INT8
    lowering rule); the message names the nodes or quantizers and what to do."""

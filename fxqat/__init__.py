"""fxqat — FX graph-mode quantization-aware training for Ultralytics YOLO detectors.

Pipeline (see ``fxqat/passes/pipeline.py``): trace → fuse Conv+BN+SiLU → match C2f/Bottleneck/SPPF/Detect →
annotate per-node qconfig → insert quantizers → train → convert (INT8 torch) / export (QDQ ONNX).
"""

import os as _os

_os.environ.setdefault("YOLO_OFFLINE", "1")

from .calibrate import calibrate  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import FxqatError, ModelLoadError, QConfigError, TraceError  # noqa: E402
from .graph.draw import draw  # noqa: E402
from .graph.summary import summary  # noqa: E402
from .modules.blocks import blocks  # noqa: E402
from .passes.pipeline import freeze_bn, prepare_qat  # noqa: E402
from .qconfig import load_qconfig  # noqa: E402
from .tracing import trace  # noqa: E402

__all__ = ["trace", "summary", "draw", "prepare_qat", "calibrate", "convert", "freeze_bn", "load_qconfig", "blocks",
           "FxqatError", "ModelLoadError", "QConfigError", "TraceError"]
__version__ = "0.1.0"


def __getattr__(name):  # heavier entry points load on first use
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "analyze":
        from .analysis import analyze

        return analyze
    if name == "explore":
        from .explorer import explore

        return explore
    if name == "train":
        from .training import train

        return train
    if name in ("checkpoint", "deploy", "evaluate", "export", "training"):  # submodules the README calls
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fxqat' has no attribute {name!r}")

"""fxqat — FX graph-mode quantization-aware training for Ultralytics YOLO detectors.

Pipeline: trace → fuse Conv+BN+SiLU → match C2f/Bottleneck/SPPF/Detect → annotate per-node qconfig → insert
quantizers → train → convert (INT8 torch) / export (QDQ ONNX). See ``fxqat.passes.pipeline`` for the pass list.
"""

import os as _os

_os.environ.setdefault("YOLO_OFFLINE", "1")

from .errors import FxqatError, ModelLoadError, QConfigError, TraceError
from .graph.draw import draw
from .graph.summary import summary
from .tracing import trace

__all__ = ["FxqatError", "ModelLoadError", "QConfigError", "TraceError", "draw", "summary", "trace"]
__version__ = "0.1.0"

"""Deployment helpers beyond ONNX: OpenVINO IR from fxqat's QDQ ONNX (``pip install openvino``)."""

from __future__ import annotations

from pathlib import Path

from .errors import FxqatError


def to_openvino(onnx_path, out_xml=None) -> Path:
    """Convert a QDQ ONNX model to OpenVINO IR (.xml + .bin); OpenVINO turns the Q/DQ pairs into INT8 kernels."""
    try:
        import openvino as ov
    except ImportError:
        raise FxqatError("format=openvino needs OpenVINO: pip install 'fxqat[openvino]' (or pip install openvino)"
                         ) from None
    onnx_path = Path(onnx_path)
    out_xml = Path(out_xml) if out_xml else onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(out_xml), compress_to_fp16=False)
    return out_xml

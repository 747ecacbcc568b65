"""Peer models measured beside fxqat: Ultralytics FP32 eager, plain torch.ao FX INT8 (default qconfig), ONNX Runtime's
``quantize_static`` and NNCF's PTQ. Every task's head (Detect, Segment, Pose, OBB, Classify) runs its float tail in one
decode leaf (``fxqat.modules.heads``), which the ONNX export names ``/decode/...``: the peers' PTQ leaves exactly that
scope float (:data:`FLOAT_TAIL`), as fxqat does."""

from __future__ import annotations

import copy
import warnings

import torch

import fxqat
from fxqat.graph.registry import module_kind

# The float tail each task keeps out of INT8, as ONNX node-name patterns of the FP32 export (the decode leaf), and what
# it holds: the peers' PTQ ignores these nodes (NNCF: ignored scope, ONNX Runtime: nodes_to_exclude).
DECODE_PATTERN = r".*/decode/.*"
FLOAT_TAIL = {
    "detect": "DFL, anchors, dist2bbox, class sigmoid, output concat",
    "segment": "Detect's decode + the mask-coefficient concat (Proto's convs are quantized, its prototypes pass through)",
    "pose": "Detect's decode + keypoint decode ((xy*2 + anchor - 0.5)*stride, visibility sigmoid)",
    "obb": "Detect's decode + angle decode ((sigmoid - 0.25)*pi, dist2rbox)",
    "classify": "the softmax over the logits",
}


def decode_path(gm) -> str:
    """The module path of the head's decode leaf (the registered op kind "decode") in an fxqat trace."""
    path = next((n for n, m in gm.named_modules() if n and module_kind(m) == "decode"), None)
    if path is None:
        raise ValueError(f"{type(gm).__name__}: no decode leaf (DetectDecode / task decode) in the traced model")
    return path


def output_names(task: str) -> list[str]:
    """Ultralytics' ONNX output names: predictions (+ prototypes for segment)."""
    return ["output0", "output1"] if task == "segment" else ["output0"]


def plain_torch_ao_int8(model, engine: str, calib: list[torch.Tensor]):
    """torch.ao's own FX route on fxqat's trace: default qconfig mapping for ``engine``, PTQ, convert_fx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    gm = fxqat.trace(copy.deepcopy(model), "eval")
    gm.eval()
    cfg = {"non_traceable_module_class": [type(gm.get_submodule(decode_path(gm)))]}
    prepared = prepare_fx(gm, get_default_qconfig_mapping(engine), (calib[0],), prepare_custom_config=cfg)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)


def export_fp32_onnx(model, path, imgsz: int):
    """FP32 ONNX of the decoded-output model (what Ultralytics' own ONNX export contains)."""
    import warnings as _w

    gm = fxqat.trace(copy.deepcopy(model), "eval")
    path_ = decode_path(gm)
    # every ONNX row gets the same fast DFL form fxqat exports (ORT: 7.1 -> 0.9 ms; Classify has no DFL)
    gm.add_submodule(path_, gm.get_submodule(path_).with_options(export=True, fast_dfl=True))
    with _w.catch_warnings(), torch.no_grad():
        _w.simplefilter("ignore")
        torch.onnx.export(gm, (torch.zeros(1, 3, imgsz, imgsz),), str(path), opset_version=17,
                          input_names=["images"], output_names=output_names(gm.meta.get("task", "detect")),
                          dynamo=False)
    return path


class _Reader:
    def __init__(self, images):
        self.it = iter([{"images": x[None].numpy()} for x in images])

    def get_next(self):
        return next(self.it, None)


def decode_nodes(onnx_path) -> list[str]:
    """Names of the nodes of the decode leaf (:data:`DECODE_PATTERN`) in an FP32 ONNX export; an error if none (the
    ignored scope would then ignore nothing)."""
    import re

    import onnx

    names = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node]
    hits = [n for n in names if re.fullmatch(DECODE_PATTERN, n)]
    if not hits:
        raise ValueError(f"{onnx_path}: no node matches {DECODE_PATTERN!r}: the float tail would be quantized")
    return hits


def ort_quantize_static(fp32_path, out_path, images):
    """ONNX Runtime's own PTQ: QDQ format, per-channel weights, UINT8 activations, MinMax calibration. The decode
    tail (:data:`FLOAT_TAIL`) is excluded, as NNCF's ignored scope does: quantizing the concatenated pixel boxes and
    [0, 1] scores onto one uint8 grid zeroes every score (mAP 0)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = str(out_path).replace(".onnx", "_pre.onnx")
    quant_pre_process(str(fp32_path), pre)
    decode = decode_nodes(pre)
    quantize_static(pre, str(out_path), _Reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=decode)
    return out_path


def nncf_ptq(fp32_path, out_xml, images):
    """NNCF PTQ on the OpenVINO model, MIXED preset, the decode leaf (:data:`FLOAT_TAIL`: head arithmetic, DFL, the
    task's own decode, Classify's softmax) and every Sigmoid ignored (as Ultralytics' export does)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32_path))
    decode_nodes(fp32_path)  # the pattern must match: validate=False would not say so
    ignored = nncf.IgnoredScope(patterns=[DECODE_PATTERN], types=["Sigmoid"], validate=False)
    ds = nncf.Dataset([x[None].numpy() for x in images])
    q = nncf.quantize(model, ds, preset=nncf.QuantizationPreset.MIXED, ignored_scope=ignored,
                      subset_size=len(images))
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
    return out_xml


def openvino_runner(path, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()

    def run(x):
        return req.infer({0: x.numpy()})

    return run

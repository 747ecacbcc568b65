"""Peer models measured beside fxqat: Ultralytics FP32 eager and plain torch.ao FX INT8 (default qconfig)."""

from __future__ import annotations

import copy
import warnings

import torch

import fxqat
from fxqat.modules.decode import DetectDecode


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


def export_fp32_onnx(model, path, imgsz: int):
    """FP32 ONNX of the decoded-output model (what Ultralytics' own ONNX export contains)."""
    import warnings as _w

    gm = fxqat.trace(copy.deepcopy(model), "eval")
    path_ = next(n for n, m in gm.named_modules() if isinstance(m, DetectDecode))
    # every ONNX row gets the same fast DFL form fxqat exports (ORT: 7.1 -> 0.9 ms)
    gm.add_submodule(path_, gm.get_submodule(path_).with_options(export=True, fast_dfl=True))
    with _w.catch_warnings(), torch.no_grad():
        _w.simplefilter("ignore")
        torch.onnx.export(gm, (torch.zeros(1, 3, imgsz, imgsz),), str(path), opset_version=17,
                          input_names=["images"], output_names=["output0"], dynamo=False)
    return path


class _Reader:
    def __init__(self, images):
        self.it = iter([{"images": x[None].numpy()} for x in images])

    def get_next(self):
        return next(self.it, None)


def ort_quantize_static(fp32_path, out_path, images):
    """ONNX Runtime's own PTQ: QDQ format, per-channel weights, UINT8 activations, MinMax calibration. The decode
    tail (DFL, dist2bbox, class sigmoid, output concat) is excluded, as NNCF's ignored scope does: quantizing the
    concatenated pixel boxes and [0, 1] scores onto one uint8 grid zeroes every score (mAP 0)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = str(out_path).replace(".onnx", "_pre.onnx")
    quant_pre_process(str(fp32_path), pre)
    decode = [n.name for n in onnx.load(pre).graph.node if "/decode/" in n.name]
    quantize_static(pre, str(out_path), _Reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=decode)
    return out_path


def nncf_ptq(fp32_path, out_xml, images):
    """NNCF PTQ on the OpenVINO model, MIXED preset, head arithmetic and DFL ignored (as Ultralytics does)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32_path))
    ignored = nncf.IgnoredScope(patterns=[r".*/decode/.*"], types=["Sigmoid"], validate=False)
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

"""Placement diagnosis, fxqat beside the runtime's own PTQ, per model (``fxqat.diagnose``).

For each model (random init, calibrated on generated sign images): fxqat's OpenVINO form (``requantize_shared=False``,
as ``fxqat export format=openvino`` writes it) profiled on OpenVINO beside
NNCF's PTQ model (MIXED preset), and fxqat's ``onnxruntime.yaml`` export on ONNX Runtime beside ``quantize_static``
(decode tail excluded, as in the deployment suite). Prints each diagnosis (float layers between DQ and Q, Q/DQ the
runtime did not fold, reorders, time shares) and the two side by side.

    python -m benchmarks.placement [--models yolov8n,yolo11n,yolov8s] [--imgsz 640] [--runs 5]
                                   [--runtimes openvino,onnxruntime] [--qconfig-ov default.yaml] [--ov-requantize]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.diagnose import compare, diagnose  # noqa: E402
from fxqat.models import load_model  # noqa: E402

from .common import save  # noqa: E402
from .deploy import _calib_images  # noqa: E402
from .peers import export_fp32_onnx, nncf_ptq, ort_quantize_static  # noqa: E402


def fxqat_qdq(model, qconfig, calib, path, imgsz, requantize_shared=True):
    qat = fxqat.prepare_qat(model, qconfig)
    fxqat.calibrate(qat, [calib[i:i + 4] for i in range(0, len(calib), 4)], progress=False)
    return fxqat.export_onnx(qat.eval(), path, imgsz=imgsz, requantize_shared=requantize_shared)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolov8n,yolo11n,yolov8s")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtimes", default="openvino,onnxruntime")
    ap.add_argument("--qconfig-ov", default="default.yaml", help="fxqat preset exported for OpenVINO")
    ap.add_argument("--qconfig-ort", default="onnxruntime.yaml", help="fxqat preset exported for ONNX Runtime")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--ov-requantize", action="store_true",
                    help="OpenVINO: export with the requantization after shared ops (the ONNX form), not the OpenVINO form")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    runtimes = [r for r in a.runtimes.split(",") if r]
    if "openvino" in runtimes and not (importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf")):
        print("note: OpenVINO / NNCF not installed: OpenVINO comparison skipped (pip install openvino nncf)")
        runtimes.remove("openvino")
    results = []
    for name in [m for m in a.models.split(",") if m]:
        work = Path(tempfile.mkdtemp(prefix="fxqat_place_"))
        model = load_model(f"{name}.yaml", nc=10).eval()
        calib = _calib_images(None, a.imgsz)
        fp32 = export_fp32_onnx(model, work / "fp32.onnx", a.imgsz)
        pairs = {}
        if "openvino" in runtimes:
            pairs["openvino"] = (fxqat_qdq(model, a.qconfig_ov, calib, work / "fxqat_ov.onnx", a.imgsz, a.ov_requantize),
                                 nncf_ptq(fp32, work / "nncf_int8.xml", calib), "NNCF PTQ")
        if "onnxruntime" in runtimes:
            pairs["onnxruntime"] = (fxqat_qdq(model, a.qconfig_ort, calib, work / "fxqat_ort.onnx", a.imgsz),
                                    ort_quantize_static(fp32, work / "ort_int8.onnx", calib), "quantize_static")
        for runtime, (ours, peer, peer_label) in pairs.items():
            d1 = diagnose(ours, runtime, imgsz=a.imgsz, threads=a.threads, runs=a.runs, label=f"fxqat {name}")
            d2 = diagnose(peer, runtime, imgsz=a.imgsz, threads=a.threads, runs=a.runs, label=f"{peer_label} {name}")
            print(f"\n===== {name} {a.imgsz} on {runtime} =====")
            print(d1.format(a.top))
            print(d2.format(a.top))
            print(compare(d1, d2, a.top), flush=True)
            results.append({"model": name, "runtime": runtime, "fxqat": d1.to_dict(), "peer": d2.to_dict()})
    print("saved", save("placement", [], {"imgsz": a.imgsz, "runs": a.runs, "diagnoses": results}))


if __name__ == "__main__":
    main()

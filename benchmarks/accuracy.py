"""Accuracy from one FP32 checkpoint on one dataset: FP32, fxqat PTQ, fxqat QAT, ONNX Runtime quantize_static PTQ,
Ultralytics' own QAT (``model.train(quantize=8)``, NVIDIA ModelOpt; skipped with a note when not installed).

Targets (issue 5): fxqat QAT >= FP32 - 0.3 pt mAP50-95 and ahead of Ultralytics' QAT; fxqat PTQ >= FP32 - 1.0 pt.

    python -m benchmarks.accuracy --fp32 runs/fp32/weights/best.pt --data datasets/signs/data.yaml --epochs 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.checkpoint import load_checkpoint  # noqa: E402
from fxqat.data.images import image_files, iter_image_batches, load_images  # noqa: E402
from fxqat.evaluate import evaluate  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.training import train_qat  # noqa: E402

from .common import save, table  # noqa: E402
from .peers import export_fp32_onnx, ort_quantize_static  # noqa: E402


def ultralytics_qat(fp32: str, data: str, epochs: int, imgsz: int, batch: int, project: str) -> dict:
    from ultralytics import YOLO

    y = YOLO(fp32)
    t = time.perf_counter()
    y.train(data=data, epochs=epochs, imgsz=imgsz, batch=batch, quantize=8, plots=False, device="cpu", amp=False,
            project=project, name="ultralytics_qat", exist_ok=True, workers=2, verbose=False)
    m = y.trainer.metrics
    return {"mAP50": float(m["metrics/mAP50(B)"]), "mAP50-95": float(m["metrics/mAP50-95(B)"]),
            "train_s": time.perf_counter() - t}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=16, help="calibration batches for PTQ")
    ap.add_argument("--qconfig", default=None)
    ap.add_argument("--lr0", default="1e-4", help="comma-separated fxqat QAT learning rates to compare")
    ap.add_argument("--skip-ultralytics", action="store_true")
    ap.add_argument("--project", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    project = a.project or tempfile.mkdtemp(prefix="fxqat_acc_")
    rows, notes = [], []

    def add(name, r, **kw):
        rows.append({"method": name, "mAP50": r["mAP50"], "mAP50-95": r["mAP50-95"], **kw})
        print(f"{name}: mAP50-95 {r['mAP50-95']:.4f}", flush=True)

    fp32 = load_model(a.fp32).eval()
    add("FP32", evaluate(a.fp32, a.data, imgsz=a.imgsz, batch=a.batch))

    ptq = fxqat.prepare_qat(fp32, a.qconfig)
    fxqat.calibrate(ptq, iter_image_batches(a.data, imgsz=a.imgsz, batch=a.batch, split="train"), batches=a.calib)
    add("fxqat PTQ (fake-quant)", evaluate(ptq, a.data, imgsz=a.imgsz, batch=a.batch))
    meta = (ptq.meta["names"], ptq.meta["stride"])
    add("fxqat PTQ (INT8 torch)", evaluate(fxqat.convert(ptq), a.data, imgsz=a.imgsz, batch=a.batch, names=meta[0],
                                           stride=meta[1]))

    for lr in [float(v) for v in a.lr0.split(",")]:
        t = time.perf_counter()
        _, best = train_qat(a.fp32, a.data, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, qconfig=a.qconfig,
                            project=project, name=f"fxqat_qat_lr{lr:g}", workers=2, calib_batches=a.calib,
                            verbose=False, lr0=lr)
        qat_s = time.perf_counter() - t
        qat = load_checkpoint(best)
        tag = f"fxqat QAT {a.epochs} ep lr0={lr:g}"
        add(f"{tag} (fake-quant)", evaluate(qat, a.data, imgsz=a.imgsz, batch=a.batch), train_s=qat_s)
        add(f"{tag} (INT8 torch)", evaluate(fxqat.convert(qat), a.data, imgsz=a.imgsz, batch=a.batch,
                                            names=meta[0], stride=meta[1]))
        onnx_path = fxqat.export_onnx(qat, Path(project) / f"fxqat_qat_lr{lr:g}.onnx", imgsz=a.imgsz)
        add(f"{tag} (QDQ ONNX, ORT)", evaluate(str(onnx_path), a.data, imgsz=a.imgsz, batch=a.batch))

    calib = load_images(image_files(a.data, "train")[: a.calib * 2], a.imgsz)
    fp32_onnx = export_fp32_onnx(fp32, Path(project) / "fp32.onnx", a.imgsz)
    ort = ort_quantize_static(fp32_onnx, Path(project) / "ort_int8.onnx", calib)
    add("ONNX Runtime quantize_static PTQ", evaluate(str(ort), a.data, imgsz=a.imgsz, batch=a.batch,
                                                     names=meta[0], stride=meta[1]))

    if a.skip_ultralytics:
        notes.append("Ultralytics QAT skipped (--skip-ultralytics)")
    elif importlib.util.find_spec("modelopt") is None:
        notes.append("Ultralytics QAT skipped: pip install nvidia-modelopt huggingface_hub")
    else:
        r = ultralytics_qat(a.fp32, a.data, a.epochs, a.imgsz, a.batch, project)
        add(f"Ultralytics QAT {a.epochs} ep (ModelOpt)", r, train_s=r["train_s"])

    base = rows[0]["mAP50-95"]
    for r in rows:
        r["delta_pt"] = (r["mAP50-95"] - base) * 100
    print(table(rows, ["method", "mAP50", "mAP50-95", "delta_pt"]))
    for n in notes:
        print("note:", n)
    print("saved", save("accuracy", rows, {"fp32": a.fp32, "data": a.data, "epochs": a.epochs, "imgsz": a.imgsz,
                                           "notes": notes, "args": json.loads(json.dumps(vars(a)))}))


if __name__ == "__main__":
    main()

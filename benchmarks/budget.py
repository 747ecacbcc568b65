"""Mixed precision under a size budget vs uniform W8 and W4 (issue 16, item 4), PTQ from one checkpoint.

Rows: uniform W8, W4 (first conv and head 8-bit, as the W4A8 recipe keeps them), and fxqat.analyze's budget choice
at budgets spaced between those two sizes; each: model size (weights at their bits + scales + float biases, the
budget's cost model), real weight bytes of the prepared model, predicted and measured head SQNR, PTQ mAP50-95.

    python -m benchmarks.budget --model fxqat-signs-yolov8n --data /tmp/signs192/data.yaml --imgsz 192
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.analysis.budget import HEADS, budget_yaml, measure, parse_budget  # noqa: E402
from fxqat.analysis.sensitivity import head_sqnr  # noqa: E402
from fxqat.data.images import image_files, load_images  # noqa: E402
from fxqat.evaluate import evaluate  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.qconfig import as_qconfig  # noqa: E402

from .common import machine, save, table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fxqat-signs-yolov8n")
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=192)
    ap.add_argument("--images", type=int, default=8, help="train images for the per-layer measurements")
    ap.add_argument("--calib", type=int, default=32, help="train images to calibrate each configuration")
    ap.add_argument("--budgets", default="0.33,0.67", help="budgets as fractions of the way from W4 to W8 size")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_model(a.model).eval()
    train = image_files(a.data, "train")
    calib = load_images(train[:a.calib], a.imgsz)
    x = calib[:a.images]
    batches = [calib[i:i + 8] for i in range(0, len(calib), 8)]
    t = time.perf_counter()
    gm = fxqat.prepare_qat(model)
    fxqat.calibrate(gm, batches, progress=False)
    plan = measure(gm, x, progress=False)
    measure_s = time.perf_counter() - t
    print(f"measured {len(plan.layers)} layers x {plan.choices} in {measure_s:.0f} s", flush=True)
    w8, w4 = plan.uniform(8), plan.uniform(4, ("first_conv",) + HEADS)
    lo, hi = plan.size(w4), plan.size(w8)
    configs = [("uniform W8", w8), ("W4, first conv + head 8-bit", w4)]
    for f in (float(v) for v in a.budgets.split(",")):
        b = lo + f * (hi - lo)
        configs.append((f"budget size:{b / 1e6:.2f}MB", plan.solve(b)))
    rows = [{"config": "FP32", "size_MB": sum(p.numel() for p in model.parameters()) * 4 / 1e6,
             "mAP50-95": evaluate(a.model, a.data, imgsz=a.imgsz)["mAP50-95"]}]
    print(rows[0], flush=True)
    base = as_qconfig(None)
    for name, bits in configs:
        q = fxqat.prepare_qat(model, fxqat.load_qconfig(budget_yaml(plan, bits, base, parse_budget("size:1B"))))
        fxqat.calibrate(q, batches, progress=False)
        p = plan.point(bits)
        real = sum(m.weight_fq.spec.bits * m.conv.weight.numel() / 8 for m in q.modules()
                   if getattr(m, "weight_fq", None) is not None)
        rows.append({"config": name, "size_MB": p["size_bytes"] / 1e6, "weights_MB": real / 1e6,
                     "bits 4/8/16": "/".join(str(p["counts"][b]) for b in plan.choices),
                     "pred_dB": p["sqnr_db"], "meas_dB": head_sqnr(q, x),
                     "mAP50-95": evaluate(q, a.data, imgsz=a.imgsz)["mAP50-95"]})
        print(rows[-1], flush=True)
    cols = ["config", "size_MB", "weights_MB", "bits 4/8/16", "pred_dB", "meas_dB", "mAP50-95"]
    print(table(rows, cols))
    print(save("budget", rows, {"machine": machine(), "measure_s": measure_s, "args": vars(a)}))


if __name__ == "__main__":
    main()

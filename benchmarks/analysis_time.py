"""Critical-layer analysis time: yolov8n, 32 calibration images at 320 (target: under 2 minutes on 2 cores).

    python -m benchmarks.analysis_time [--fp32 best.pt] [--data data.yaml]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.models import load_model  # noqa: E402

from .common import save  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--images", type=int, default=32)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(a.fp32 or "yolov8n.yaml", nc=None if a.fp32 else 10)
    if a.data:
        data = a.data
    else:
        from fxqat.data.signs import generate

        data = generate(tempfile.mkdtemp(), train=1, val=a.images, imgsz=320, progress=False)
    t = time.perf_counter()
    rep = fxqat.analyze(model, data, imgsz=320, images=a.images, out=tempfile.mkdtemp(), progress=False)
    dt = time.perf_counter() - t
    print(rep.table(5))
    print(f"analysis of {rep.summary['units']} layers on {a.images} images: {dt:.1f} s (target < 120 s)")
    print("saved", save("analysis_time", [{"seconds": dt, "images": a.images, "layers": rep.summary["units"]}]))


if __name__ == "__main__":
    main()

"""Trace time of yolov8n and yolov8x with fxqat (aim: well under a second for n)."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import fxqat
from fxqat.models import load_model

from .common import save, table


def main():
    rows = []
    for name in ("yolov8n.yaml", "yolov8x.yaml", "yolo11n.yaml"):
        model = load_model(name)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            gm = fxqat.trace(model)
            ts.append(time.perf_counter() - t)
        rows.append({"model": name, "nodes": len(gm.graph.nodes), "trace_s": statistics.median(ts)})
    print(table(rows, ["model", "nodes", "trace_s"]))
    print("saved", save("trace_time", rows))


if __name__ == "__main__":
    main()

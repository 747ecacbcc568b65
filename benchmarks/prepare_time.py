"""Trace + passes + quantizer insertion time (targets: ≤ 1.5 s yolov8n, ≤ 6 s yolov8x), vs torch.ao prepare_qat_fx
on the same traced yolov8n graph."""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.modules.decode import DetectDecode  # noqa: E402

from .common import save, table  # noqa: E402


def _median(fn, n=3):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    rows = []
    for name in ("yolov8n.yaml", "yolov8x.yaml"):
        model = load_model(name)
        rows.append({"what": f"fxqat.prepare_qat {name}", "s": _median(lambda m=model: fxqat.prepare_qat(m))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx
    model = load_model("yolov8n.yaml")
    gm = fxqat.trace(model, "train")

    def ao():
        prepare_qat_fx(copy.deepcopy(gm), get_default_qat_qconfig_mapping("x86"), (torch.rand(1, 3, 320, 320),),
                       prepare_custom_config={"non_traceable_module_class": [DetectDecode]})

    rows.append({"what": "torch.ao prepare_qat_fx (traced yolov8n)", "s": _median(ao)})
    for r in rows:
        r["vs_torch_ao"] = r["s"] / rows[-1]["s"]
    print(table(rows, ["what", "s", "vs_torch_ao"]))
    print("saved", save("prepare_time", rows))


if __name__ == "__main__":
    main()

"""Where each task head keeps a float output, decided by measurement (issue 13): PTQ of one trained task model with
fxqat's default rules, and with each task-head rule flipped, on the task's own metrics.

    python -m benchmarks.task_defaults --fp32 runs/seg/weights/best.pt --data signs_seg/data.yaml --imgsz 192

Variants (``VARIANTS``): a default rule removed (that output goes back on the activations' 8-bit grid) or a rule added
(that output leaves the grid). Every variant calibrates on the same training batches and is evaluated on the same
validation images; ``quantizers`` counts the activation fake-quant modules of the prepared graph, so a variant that
changed nothing would show.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.data.images import iter_image_batches  # noqa: E402
from fxqat.evaluate import evaluate  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.qconfig.config import DEFAULT_RULES, FLOAT, QConfig, Rule  # noqa: E402
from fxqat.quant.fake_quant import FakeQuant  # noqa: E402
from fxqat.tasks import calibration_source, read_data, task_metrics  # noqa: E402
from fxqat.tracing import task_of  # noqa: E402

from .common import markdown, save  # noqa: E402

# task: {label: (default-rule roles removed, roles given a float output)}
VARIANTS = {
    "detect": {"box + class outputs INT8": (("detect.box_last", "detect.cls_last"), ())},
    "segment": {"mask coefficients INT8": (("segment.mask_last",), ()),
                "prototypes float": ((), ("segment.proto_last",)),
                "prototype convs float": ((), ("segment.proto", "segment.proto_last"))},
    "pose": {"keypoints INT8": (("pose.kpt_last",), ())},
    "obb": {"angle logits INT8": (("obb.angle_last",), ())},
    "classify": {"logits INT8": (("classify.linear",), ())},
}


def variant_qconfig(removed=(), floated=()) -> QConfig:
    rules = tuple(r for r in DEFAULT_RULES if r.pattern not in removed)
    rules += tuple(Rule("role", role, activation=FLOAT, where="benchmarks.task_defaults") for role in floated)
    return QConfig(rules=rules)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--data", required=True, help="the task's data YAML (classify: its folder)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=16, help="calibration batches")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    fp32 = load_model(a.fp32).eval()
    task = task_of(fp32)
    second, main_metric = task_metrics(task)
    calib = calibration_source(read_data(a.data), a.data)
    rows = []

    def add(label, model, quantizers=None, seconds=None):
        r = evaluate(model, a.data, imgsz=a.imgsz, batch=a.batch)
        rows.append({"variant": label, second: r[second], main_metric: r[main_metric], "quantizers": quantizers,
                     "seconds": seconds})
        print(f"{label}: {main_metric} {r[main_metric]:.4f}", flush=True)

    add("FP32", a.fp32)
    for label, (removed, floated) in {"fxqat defaults": ((), ()), **VARIANTS[task]}.items():
        t = time.perf_counter()
        gm = fxqat.prepare_qat(fp32, variant_qconfig(removed, floated))
        fxqat.calibrate(gm, iter_image_batches(calib, imgsz=a.imgsz, batch=a.batch, split="train"), batches=a.calib,
                        progress=False)
        add(f"PTQ, {label}", gm, sum(isinstance(m, FakeQuant) for m in gm.modules()), time.perf_counter() - t)
    base = rows[0][main_metric]
    for r in rows:
        r["delta_pt"] = (r[main_metric] - base) * 100
    columns = ["variant", second, main_metric, "delta_pt", "quantizers"]
    print(markdown(rows, columns, ["variant", second, main_metric, "Δ vs FP32 (pt)", "fake-quant modules"],
                   {second: "{:.4f}", main_metric: "{:.4f}", "delta_pt": "{:+.2f}"}))
    print(f"\n{task}: evaluated on {a.data} (val split), imgsz {a.imgsz}, PTQ on {a.calib} batches of {a.batch}")
    print("saved", save(f"task_defaults_{task}", rows, {"fp32": a.fp32, "data": a.data, "imgsz": a.imgsz,
                                                         "calib": a.calib, "task": task}))


if __name__ == "__main__":
    main()

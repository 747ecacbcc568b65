"""Precision of an end-to-end (YOLO26 / YOLOv10) head's one-to-one branch, measured (issue 14).

From one FP32 checkpoint, on the one-to-one (top-k, no NMS) path: FP32 mAP, then fxqat PTQ (calibrated fake-quant
graph, same calibration images for every row) with the one-to-one branch's last 1×1 convs (roles e2e.box_last /
e2e.cls_last) given

    float   INT8 weights, float output (fxqat's default rule)
    int16   INT8 weights, 16-bit output grid
    int8    INT8 weights, uint8 output grid
    branch16  the whole one-to-one branch on 16-bit output grids (what Hailo does), last convs float
    attn8   fxqat's defaults plus an 8-bit grid on the attention's softmax output where ``attn @ v`` reads it: what an
            INT8 ``attn @ v`` needs (q, k and v already lie on the qkv conv's 8-bit grid, so an INT8 ``q @ k``
            changes no value; the softmax output is the one operand an INT8 attention would add a rounding to)

Each row: mAP50 / mAP50-95 (Ultralytics' validator, nms=False) and the SQNR (dB) vs the same graph with every
quantizer off of the one-to-one predictions before top-k (what the decode reads, after any output quantizer of the
last convs): boxes in pixels and class probabilities, separately.

    python -m benchmarks.e2e_head --fp32 runs/fp32/weights/best.pt --data datasets/signs/data.yaml --imgsz 160
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("YOLO_OFFLINE", "1")

import fxqat  # noqa: E402
import torch  # noqa: E402

from fxqat.analysis.sensitivity import sqnr_db  # noqa: E402
from fxqat.graph.registry import op_kind  # noqa: E402
from fxqat.data.images import image_files, load_images  # noqa: E402
from fxqat.evaluate import evaluate  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.quant.fake_quant import FakeQuant  # noqa: E402

from .common import save, table  # noqa: E402

LAST = ("e2e.box_last", "e2e.cls_last")
VARIANTS = {
    "float": [],
    "int16": [{"match": {"role": r}, "activation": {"bits": 16}} for r in LAST],
    "int8": [{"match": {"role": r}, "activation": {"bits": 8}} for r in LAST],
    "branch16": [{"match": {"role": r}, "activation": {"bits": 16}} for r in ("e2e.box", "e2e.cls")],
    "attn8": [],  # + quantize_softmax_outputs
}


def _from_softmax(gm, n, depth: int = 3) -> bool:
    """Whether ``n`` is a softmax's output, through at most ``depth`` view / transpose / scale nodes."""
    if op_kind(gm, n) == "softmax":
        return True
    return depth > 0 and any(_from_softmax(gm, i, depth - 1) for i in n.all_input_nodes)


def quantize_softmax_outputs(gm) -> int:
    """Insert an 8-bit activation fake-quantizer (fxqat's default activation spec) on every matmul operand that is a
    softmax output; returns how many were inserted (0: the model has no attention)."""
    spec = fxqat.qconfig.as_qconfig(None).activation
    added = 0
    for n in list(gm.graph.nodes):
        if op_kind(gm, n) != "matmul":
            continue
        for a in [a for a in n.all_input_nodes if _from_softmax(gm, a)]:
            name = f"attn_fq_{n.name}_{added}"
            gm.add_submodule(name, FakeQuant(spec))
            with gm.graph.inserting_before(n):
                q = gm.graph.call_module(name, (a,))
            n.replace_input_with(a, q)
            added += 1
    gm.recompile()
    return added


@torch.no_grad()
def o2o_sqnr(gm, x) -> tuple[float, float]:
    """SQNR (dB) of the decoded one-to-one predictions (boxes, class probabilities) before top-k, quantized vs
    every quantizer off."""
    dec = next(gm.get_submodule(n.target) for n in gm.graph.nodes if op_kind(gm, n) == "decode")
    fqs = [m for m in gm.modules() if isinstance(m, FakeQuant)]
    cap = {}
    h = dec.register_forward_hook(lambda mod, args, out: cap.update(args=args))
    ys = []
    for on in (False, True):
        for m in fqs:
            m.fake_quant_enabled = on
        gm.eval()(x)
        _, _, feats, boxes, scores = cap["args"]
        ys.append(dec.decode(boxes, scores, feats))
    h.remove()
    ref, q = ys
    return sqnr_db(ref[:, :4], q[:, :4]), sqnr_db(ref[:, 4:], q[:, 4:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--images", type=int, default=32, help="calibration images (val split of --data)")
    ap.add_argument("--val-data", default=None, help="data YAML whose val split the mAP rows are evaluated on "
                    "(default: --data's; then the calibration images are among them)")
    ap.add_argument("--out", default=None, help="results name (benchmarks/results/<name>.json)")
    ap.add_argument("--no-map", action="store_true", help="SQNR only (skip the validator runs)")
    a = ap.parse_args(argv)

    model = load_model(a.fp32)
    model.end2end = True  # the one-to-one path, as Ultralytics' nms=False
    x = load_images(image_files(a.data, "val")[:a.images], a.imgsz)
    rows = []
    val = a.val_data or a.data
    if not a.no_map:
        rows.append({"form": "FP32 one-to-one", **evaluate(model, val, imgsz=a.imgsz)})
        model.end2end = False
        rows.append({"form": "FP32 one-to-many + NMS", **evaluate(model, val, imgsz=a.imgsz)})
        model.end2end = True
    for name, rules in VARIANTS.items():
        qc = {"version": 1, "default_rules": True, "rules": rules}
        gm = fxqat.prepare_qat(model, qc)
        if name == "attn8" and not quantize_softmax_outputs(gm):
            continue  # no attention in this model
        fxqat.calibrate(gm, [x[i:i + 8] for i in range(0, len(x), 8)], progress=False)
        box_db, cls_db = o2o_sqnr(gm, x)
        r = {} if a.no_map else evaluate(gm, val, imgsz=a.imgsz)
        rows.append({"form": f"PTQ o2o last convs {name}", **r, "o2o_box_sqnr_db": box_db, "o2o_cls_sqnr_db": cls_db})
    print(table(rows, ["form", "mAP50", "mAP50-95", "o2o_box_sqnr_db", "o2o_cls_sqnr_db"]))
    if a.out:
        save(a.out, rows)


if __name__ == "__main__":
    main()

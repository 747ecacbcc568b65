"""Accuracy from one FP32 checkpoint on one dataset: FP32, fxqat PTQ, fxqat QAT, ONNX Runtime quantize_static PTQ,
Ultralytics' own QAT (``model.train(quantize=8)``, NVIDIA ModelOpt; skipped with a note when not installed).

Targets (issue 5): fxqat QAT >= FP32 - 0.3 pt mAP50-95 and ahead of Ultralytics' QAT; fxqat PTQ >= FP32 - 1.0 pt.

    python -m benchmarks.accuracy --fp32 runs/fp32/weights/best.pt --data datasets/signs/data.yaml --epochs 1

Every task (issue 13): the FP32 checkpoint's task sets the metrics (``--task`` checks it): the task's main metric
(mask mAP50-95, pose mAP50-95, OBB mAP50-95, top-1) and its 50-IoU companion (top-5 for classify); ``--data`` is
the task's data YAML, or the classify folder. ONNX Runtime's quantize_static row is detect-only.

    python -m benchmarks.accuracy --task segment --fp32 runs/seg/weights/best.pt --data signs_seg/data.yaml

``--variants`` (issue 16) replaces fxqat's PTQ / QAT rows by one set per variant, from the same checkpoint: PTQ
(fake-quant, INT8 torch) and QAT (fake-quant, INT8 torch). Variants: w8a8 (the default preset), w4a8 (the w4a8 preset:
4-bit weights, 8-bit first conv and Detect's last convs), each with fixed scales, and each with ``_lsq`` (learnable
scales on weights and activations; the w4a8 preset's own setting). A variant may carry its own QAT recipe,
``NAME:key=value:...`` with keys lr0, epochs, freeze_bn, freeze_observers (the same variant may appear with several
recipes; its PTQ rows run once):

    python -m benchmarks.accuracy --fp32 best.pt --data data.yaml --val-data big_val.yaml --imgsz 192 --batch 32 \\
        --variants w8a8,w8a8_lsq,w4a8,w4a8_lsq,w4a8:epochs=3,w4a8:freeze_bn=0 --skip-ultralytics

``--budgets`` (issue 16, item 4) adds a PTQ and a QAT row set per mixed-precision budget: the per-layer weight bits
that ``fxqat analyze budget=...`` chooses (:func:`fxqat.analysis.budget.run_budget` on ``--budget-images`` training
images of the FP32 model at ``--imgsz``; a latency budget is batch 1 at ``--imgsz`` on this machine's INT8 kernels):

    python -m benchmarks.accuracy ... --variants w8a8,w4a8_lsq --budgets size:2.4MB,latency:15ms

``seconds``: wall time to build the row's model from the FP32 checkpoint (PTQ: prepare + calibration; QAT: the whole
``train_qat`` run with its calibration and validations; INT8 torch: + conversion), evaluation not included.
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
import yaml  # noqa: E402

import fxqat  # noqa: E402
from fxqat.analysis.bootstrap import paired_deltas, tp_key  # noqa: E402
from fxqat.checkpoint import load_checkpoint  # noqa: E402
from fxqat.data.images import image_files, iter_image_batches, load_images  # noqa: E402
from fxqat.errors import FxqatError  # noqa: E402
from fxqat.evaluate import evaluate  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.qconfig import as_qconfig  # noqa: E402
from fxqat.qconfig.io import preset_text  # noqa: E402
from fxqat.tasks import TASKS, calibration_source, metrics_of, read_data, task_metrics  # noqa: E402
from fxqat.tracing import task_of  # noqa: E402
from fxqat.training import train_qat  # noqa: E402

from .common import markdown, save  # noqa: E402
from .peers import export_fp32_onnx, ort_quantize_static  # noqa: E402

VARIANTS = {"w8a8": ("default", False), "w8a8_lsq": ("default", True), "w4a8": ("w4a8", False),
            "w4a8_lsq": ("w4a8", True)}  # name: (preset, learnable scales on weights and activations)
# key: (type, lowest valid value, whether the lowest value is excluded)
RECIPE_KEYS = {"lr0": (float, 0.0, True), "epochs": (int, 1, False), "freeze_bn": (int, 0, False),
               "freeze_observers": (int, 0, False), "dampen": (float, 0.0, False),
               "freeze_osc": (float, 0.0, True)}


def table_layout(task: str) -> tuple[list, list, dict]:
    """(row keys, header, formats) of the results table for a task."""
    second, main = task_metrics(task)
    return (["method", "bits", "learnable", second, main, "delta_pt", "seconds"],
            ["method", "bits", "learnable", second, main, "Δ vs FP32 (pt)", "seconds"],
            {second: "{:.4f}", main: "{:.4f}", "delta_pt": "{:+.2f}", "seconds": "{:.0f}"})


def variant_qconfig(name: str) -> dict:
    """The qconfig mapping of variant ``name``: its preset, with ``learnable: true`` on weights and activations for
    the ``_lsq`` variants and ``learnable: false`` for the others."""
    preset, learnable = VARIANTS[name]
    d = yaml.safe_load(preset_text(preset))
    for k in ("weight", "activation"):  # set either way: a preset may have learnable scales (w4a8 does)
        d[k] = {**d.get(k, {}), "learnable": learnable}
    return d


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """``"w8a8,w4a8:lr0=3e-4:epochs=3"`` → ``[("w8a8", {}), ("w4a8", {"lr0": 3e-4, "epochs": 3})]``; ValueError with
    the valid choices for anything else."""
    out = []
    for item in text.split(","):
        name, *pairs = item.strip().split(":")
        if name not in VARIANTS:
            raise ValueError(f"variant {name!r}: valid variants are {', '.join(VARIANTS)}")
        recipe: dict = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if key not in RECIPE_KEYS or not eq:
                raise ValueError(f"{item!r}: {pair!r} is not key=value with key one of {', '.join(RECIPE_KEYS)}")
            if key in recipe:
                raise ValueError(f"{item!r}: {key} given twice")
            kind, low, strict = RECIPE_KEYS[key]
            try:
                v = kind(value)
            except ValueError:
                raise ValueError(f"{item!r}: {key}={value!r} is not a{'n integer' if kind is int else ' number'}") \
                    from None
            if not (low < v < float("inf") if strict else v >= low):
                raise ValueError(f"{item!r}: {key}={value} out of range (must be {'>' if strict else '>='} {low:g})")
            recipe[key] = v
        out.append((name, recipe))
    return out


def tag(qc) -> tuple[str, bool]:
    """(bits label from the global specs, e.g. "W4A8"; whether any scale is learnable) of a qconfig. A budget's
    qconfig (one rule per layer, several weight widths: ``fxqat analyze budget=``) is "mixed"."""
    qc = as_qconfig(qc)
    widths = {r.weight["bits"] for r in qc.rules if isinstance(r.weight, dict) and "bits" in r.weight}
    w = "mixed " if len(widths) > 1 and len(qc.rules) > 8 else f"W{qc.weight.bits}"
    return f"{w}A{qc.activation.bits}", qc.weight.learnable or qc.activation.learnable


def recipe_label(epochs: int, lr0: float, recipe: dict) -> str:
    extra = "".join(f" {k}={recipe[k]}" for k in ("freeze_bn", "freeze_observers", "dampen", "freeze_osc") if k in recipe)
    return f"{epochs} ep lr0={lr0:g}{extra}"


def ultralytics_qat(fp32: str, data: str, epochs: int, imgsz: int, batch: int, project: str,
                    task: str = "detect", val_data: str | None = None, end2end: bool = False) -> dict:
    """Ultralytics' own QAT (``train(quantize=8)``, ModelOpt) from ``fp32``, its best.pt evaluated as fxqat's rows are:
    Ultralytics' validator on ``val_data`` (default ``data``) with square letterboxes (``rect=False``) and, for an
    end-to-end model, on the one-to-one path (``nms=False``). Its trainer validates an end-to-end model on the
    one-to-many path with NMS (``nms`` unset), a different head; that figure is returned as ``trainer_map``."""
    from ultralytics import YOLO

    y = YOLO(fp32)
    t = time.perf_counter()
    y.train(data=data, epochs=epochs, imgsz=imgsz, batch=batch, quantize=8, plots=False, device="cpu", amp=False,
            project=project, name="ultralytics_qat", exist_ok=True, workers=2, verbose=False)
    train_s = time.perf_counter() - t
    trainer_map = metrics_of(task, y.trainer.metrics)[task_metrics(task)[1]]
    best = YOLO(str(y.trainer.best))
    r = best.val(data=val_data or data, imgsz=imgsz, batch=batch, rect=False, plots=False, device="cpu", workers=0,
                 verbose=False, nms=False if end2end else None)
    return {**metrics_of(task, r.results_dict), "train_s": train_s, "trainer_map": trainer_map}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fp32", required=True)
    ap.add_argument("--task", choices=list(TASKS), default=None, help="the FP32 model's task (checked; default: "
                    "read from the model)")
    ap.add_argument("--data", required=True, help="data YAML: calibration, QAT training and its validation")
    ap.add_argument("--val-data", default=None, help="data YAML whose val split every row is evaluated on "
                    "(default: --data's)")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=16, help="calibration batches for PTQ")
    ap.add_argument("--qconfig", default=None)
    ap.add_argument("--lr0", default="1e-4", help="comma-separated fxqat QAT learning rates to compare (with "
                    "--variants: one value, the default of every variant)")
    ap.add_argument("--variants", default=None, help=f"comma-separated, NAME[:key=value...]; names "
                    f"{', '.join(VARIANTS)}; keys {', '.join(RECIPE_KEYS)}")
    ap.add_argument("--budgets", default=None, help="comma-separated mixed-precision budgets (size:2.4MB, "
                    "latency:15ms): PTQ and QAT rows with the bits fxqat analyze chooses for each")
    ap.add_argument("--budget-images", type=int, default=16, help="training images for the budget measurements")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (Ultralytics' "
                    "trainer and validator set 1 on a 2-core CPU; a latency budget is measured at this count)")
    ap.add_argument("--skip-ort", action="store_true", help="no ONNX Runtime quantize_static row")
    ap.add_argument("--skip-ultralytics", action="store_true")
    ap.add_argument("--end2end", action="store_true", help="an end-to-end model (YOLO26, YOLOv10): every fxqat row "
                    "on its one-to-one (top-k, no NMS) path, as Ultralytics' validator runs it (nms=False)")
    ap.add_argument("--project", default=None)
    ap.add_argument("--bootstrap", type=int, default=0, help="resamples of a paired bootstrap over the validation "
                    "images: each row's difference to FP32 with its 95%% interval (0: off; e.g. 1000)")
    ap.add_argument("--seed", type=int, default=0, help="the seed of every fxqat QAT run (Ultralytics' trainer: data "
                    "order and augmentation; its default is 0)")
    a = ap.parse_args(argv)
    lrs = [float(v) for v in a.lr0.split(",")]
    budgets = []
    if a.budgets is not None:
        from fxqat.analysis.budget import parse_budget

        try:
            budgets = [parse_budget(t.strip()) for t in a.budgets.split(",")]
        except FxqatError as e:
            ap.error(f"--budgets: {e}")
    variants = None
    if a.variants is not None:
        try:
            variants = parse_variants(a.variants)
        except ValueError as e:
            ap.error(f"--variants: {e}")
        if a.qconfig is not None:
            ap.error("--qconfig and --variants: each variant sets its own qconfig; give one or the other")
        if len(lrs) != 1:
            ap.error("--variants takes one --lr0 (the default); set a variant's own as NAME:lr0=...")
    torch.set_num_threads(a.threads)
    project = a.project or tempfile.mkdtemp(prefix="fxqat_acc_")
    val = a.val_data or a.data
    rows, notes = [], []
    images_of: dict[str, list] = {}  # row → per-image statistics (--bootstrap)

    def add(name, r, eval_s=None, tag=("FP32", None), seconds=None, **kw):
        if "_images" in r:
            images_of[name] = r.pop("_images")
        rows.append({"method": name, "bits": tag[0], "learnable": tag[1], second: r[second],
                     main_metric: r[main_metric], "seconds": seconds, "eval_s": eval_s, **kw})
        print(f"{name}: {main_metric} {r[main_metric]:.4f}" + (f" ({seconds:.0f} s)" if seconds else ""), flush=True)

    def timed_eval(model, **kw):
        t = time.perf_counter()
        imgs = [] if a.bootstrap else None
        r = evaluate(model, val, imgsz=a.imgsz, batch=a.batch, images=imgs, **kw)
        if imgs is not None:
            r["_images"] = imgs
        return r, time.perf_counter() - t

    fp32 = load_model(a.fp32).eval()
    if a.end2end:
        from fxqat.modules.e2e import has_one2one

        if not has_one2one(fp32.model[-1]):
            ap.error(f"--end2end: {a.fp32} has no end-to-end (one-to-one) head")
        fp32.end2end = True  # FP32, PTQ and QAT rows: the one-to-one path (the ORT row is skipped)
        a.skip_ort = True
        notes.append("end-to-end: every fxqat row on the one-to-one (top-k, no NMS) path; quantize_static skipped")
    task = task_of(fp32)
    if a.task is not None and a.task != task:
        ap.error(f"--task {a.task}: {a.fp32} is a {task} model")
    second, main_metric = task_metrics(task)
    key = None
    if a.bootstrap:
        try:
            key = tp_key(task)
        except ValueError as e:
            ap.error(f"--bootstrap: {e}")
    columns, head, formats = table_layout(task)
    calib_source = calibration_source(read_data(a.data), a.data)
    r, es = timed_eval(fp32 if a.end2end else a.fp32)
    add("FP32", r, es)
    meta = None

    def ptq(label, qc, seconds0=0.0):
        nonlocal meta
        t = time.perf_counter() - seconds0
        model = fxqat.prepare_qat(fp32, qc)
        fxqat.calibrate(model, iter_image_batches(calib_source, imgsz=a.imgsz, batch=a.batch, split="train"),
                        batches=a.calib)
        s = time.perf_counter() - t
        meta = (model.meta["names"], model.meta["stride"])
        add(f"{label} (fake-quant)", *timed_eval(model), tag=tag(qc), seconds=s)
        t = time.perf_counter()
        q = fxqat.convert(model)
        add(f"{label} (INT8 torch)", *timed_eval(q, names=meta[0], stride=meta[1]), tag=tag(qc),
            seconds=s + time.perf_counter() - t)

    def qat(label, qc, run_name, epochs, lr, recipe, onnx=False):
        t = time.perf_counter()
        _, best = train_qat(fp32 if a.end2end else a.fp32, a.data, epochs=epochs, imgsz=a.imgsz, batch=a.batch, qconfig=qc,
                            project=project, name=run_name, workers=2, calib_batches=a.calib, verbose=False, lr0=lr,
                            freeze_bn_epoch=recipe.get("freeze_bn"),
                            freeze_observer_epoch=recipe.get("freeze_observers"), dampen=recipe.get("dampen"),
                            freeze_osc=recipe.get("freeze_osc"), seed=a.seed)
        s = time.perf_counter() - t
        model, ckpt = load_checkpoint(best, with_extra=True)
        epoch = int(ckpt.get("epoch", -1)) + 1
        notes.append(f"{label}: best.pt is {'the PTQ start (epoch 0)' if epoch == 0 else f'epoch {epoch}'}")
        add(f"{label} (fake-quant)", *timed_eval(model), tag=tag(qc), seconds=s, best_epoch=epoch)
        t = time.perf_counter()
        q = fxqat.convert(model)
        add(f"{label} (INT8 torch)", *timed_eval(q, names=meta[0], stride=meta[1]), tag=tag(qc),
            seconds=s + time.perf_counter() - t, best_epoch=epoch)
        if onnx:
            path = fxqat.export_onnx(model, Path(project) / f"{run_name}.onnx", imgsz=a.imgsz)
            add(f"{label} (QDQ ONNX, ORT)", *timed_eval(str(path)), tag=tag(qc), best_epoch=epoch)

    # the budgets' choices first, in a process no trainer has run in yet (its data-loader workers and thread
    # settings slow the latency measurements down): their rows run after the variants'
    chosen = []
    for b in budgets:
        from fxqat.analysis.budget import run_budget

        torch.set_num_threads(a.threads)  # Ultralytics' validator / trainer reset it (to 1 on 2 cores)
        t = time.perf_counter()
        x = load_images(image_files(a.data, "train")[:a.budget_images], a.imgsz)
        base = as_qconfig(a.qconfig)
        gm = fxqat.prepare_qat(fp32, base)
        fxqat.calibrate(gm, [x[i:i + 8] for i in range(0, len(x), 8)], progress=False)
        try:
            res = run_budget(gm, fp32, base, x, b, progress=False)
        except FxqatError as e:  # e.g. a latency below the fastest configuration: the other rows still run
            notes.append(f"budget {b.text} skipped: {e}")
            print(f"budget {b.text} skipped: {e}", flush=True)
            continue
        s = time.perf_counter() - t
        counts = "/".join(str(res["counts"][c]) for c in (4, 8, 16))
        lat = (f", {res['latency_ms']:.1f} ms predicted / {res['measured_ms']:.1f} ms measured at batch 1, "
               f"{a.threads} threads (all-8-bit {res['references']['uniform W8']['measured_ms']:.1f} ms, all-4-bit "
               f"{res['references']['uniform W4']['measured_ms']:.1f} ms)" if b.kind == "latency" else "")
        notes.append(f"budget {b.text}: layers at 4/8/16 bits {counts}, {res['size_bytes'] / 1e6:.2f} MB{lat}; "
                     f"chosen in {s:.0f} s (added to its PTQ rows' seconds)")
        print(notes[-1], flush=True)
        chosen.append((f"budget {b.text} ({counts})", fxqat.load_qconfig(res["qconfig"]), s))

    if variants is None:
        ptq("fxqat PTQ", a.qconfig)
        for lr in lrs:
            qat(f"fxqat QAT {a.epochs} ep lr0={lr:g}", a.qconfig, f"fxqat_qat_lr{lr:g}", a.epochs, lr, {}, onnx=True)
    else:
        for name in dict.fromkeys(n for n, _ in variants):  # PTQ once per variant, in the order given
            ptq(f"fxqat PTQ {name}", variant_qconfig(name))
        for k, (name, recipe) in enumerate(variants):
            epochs, lr = recipe.get("epochs", a.epochs), recipe.get("lr0", lrs[0])
            qat(f"fxqat QAT {name} {recipe_label(epochs, lr, recipe)}", variant_qconfig(name), f"qat{k}_{name}",
                epochs, lr, recipe)

    for k, (label, qc, s) in enumerate(chosen):
        ptq(f"fxqat PTQ {label}", qc, seconds0=s)
        qat(f"fxqat QAT {label} {recipe_label(a.epochs, lrs[0], {})}", qc, f"budget{k}", a.epochs, lrs[0], {})

    if a.skip_ort or task != "detect":
        notes.append("ONNX Runtime quantize_static skipped (" + ("--skip-ort)" if a.skip_ort else "detect only)"))
    else:
        t = time.perf_counter()
        calib = load_images(image_files(a.data, "train")[: a.calib * 2], a.imgsz)
        fp32_onnx = export_fp32_onnx(fp32, Path(project) / "fp32.onnx", a.imgsz)
        ort = ort_quantize_static(fp32_onnx, Path(project) / "ort_int8.onnx", calib)
        s = time.perf_counter() - t
        add("ONNX Runtime quantize_static PTQ", *timed_eval(str(ort), names=meta[0], stride=meta[1]), tag=("W8A8", False),
            seconds=s)

    if a.skip_ultralytics:
        notes.append("Ultralytics QAT skipped (--skip-ultralytics)")
    elif importlib.util.find_spec("modelopt") is None:
        notes.append("Ultralytics QAT skipped: pip install nvidia-modelopt huggingface_hub")
    else:
        r = ultralytics_qat(a.fp32, a.data, a.epochs, a.imgsz, a.batch, project, task, a.val_data, a.end2end)
        add(f"Ultralytics QAT {a.epochs} ep (ModelOpt)", r, tag=("W8A8", False), seconds=r["train_s"])
        notes.append(f"Ultralytics QAT: its trainer's own validation gave {main_metric} {r['trainer_map']:.4f} "
                     f"(on --data's val split{', one-to-many path with NMS' if a.end2end else ''}); the row is its "
                     "best.pt evaluated as every other row")

    base = rows[0][main_metric]
    for r in rows:
        r["delta_pt"] = (r[main_metric] - base) * 100
    print(markdown(rows, columns, head, formats))
    if a.bootstrap:
        print(f"\npaired bootstrap over the {len(images_of['FP32'])} validation images ({a.bootstrap} resamples), "
              f"{main_metric} difference to FP32 in points:")
        others = {r["method"]: images_of[r["method"]] for r in rows[1:] if r["method"] in images_of}
        cis = paired_deltas(images_of["FP32"], others, key, a.bootstrap, progress=True)
        for r in rows[1:]:
            if r["method"] not in cis:  # Ultralytics' row: evaluated by its own validator
                continue
            ci = cis[r["method"]]
            r.update(delta_se_pt=ci["se_pt"], delta_ci_pt=[ci["lo_pt"], ci["hi_pt"]])
            print(f"  {r['method']}: {ci['delta_pt']:+.2f} (95 % interval {ci['lo_pt']:+.2f} to {ci['hi_pt']:+.2f}, "
                  f"standard error {ci['se_pt']:.2f})")
    print(f"\nevaluated on {val} (val split), imgsz {a.imgsz}; seconds: building the row's model (not evaluating)")
    for n in notes:
        print("note:", n)
    name = "accuracy" if task == "detect" else f"accuracy_{task}"
    print("saved", save(name, rows, {"fp32": a.fp32, "task": task, "data": a.data, "val_data": val, "epochs": a.epochs,
                                     "imgsz": a.imgsz, "notes": notes, "args": json.loads(json.dumps(vars(a)))}))


if __name__ == "__main__":
    main()

"""Implementations of the ``fxqat`` subcommands (argument parsing lives in ``cli.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .analysis.bootstrap import paired_deltas, tp_key
from .errors import FxqatError


def cmd_data(kind, out, train, val, imgsz, seed, min_size, max_size, task="detect"):
    if kind != "signs":
        raise FxqatError(f"{kind}: unknown generator; valid: signs")
    from .data.signs import generate

    target = Path(out or "datasets/signs")
    if target.exists() and not target.is_dir():
        raise FxqatError(f"{target}: exists and is not a folder; give a new or existing folder for the dataset")
    try:
        path = generate(target, train=train, val=val, imgsz=imgsz, seed=seed, min_size=min_size, max_size=max_size,
                        task=task)
    except ValueError as e:
        raise FxqatError(str(e)) from None
    except OSError as e:
        raise FxqatError(f"{target}: cannot write the dataset ({e.strerror or e})") from None
    print(f"dataset written: {path}")


def cmd_train(model, data, epochs, imgsz, batch, project, name, workers, trust, mosaic=None, pretrained=None):
    from .training_fp32 import train_fp32

    extra = {} if mosaic is None else {"mosaic": mosaic}
    best = train_fp32(model, data, epochs=epochs, imgsz=imgsz, batch=batch, project=project, name=name,
                      workers=workers, trust=trust, pretrained=pretrained, **extra)
    print(f"FP32 weights: {best}")


def cmd_qat(model, data, epochs, imgsz, batch, qconfig, project, name, freeze_bn, freeze_observers, lr0, resume,
            workers, trust, device=None, nproc=None, ptq_epoch0=None, dampen=None,
            freeze_osc=None):
    """Arguments not on the command line arrive as None: train_qat applies the defaults, or the checkpoint's.
    Several ranks (device=0,1 or device=cpu nproc=N) and no launcher yet: re-run this command under torchrun."""
    from .distributed import launch, launched_world, plan_devices

    if launched_world()[0] == 1 and plan_devices(device, nproc).world > 1:
        given = dict(data=data, epochs=epochs, imgsz=imgsz, batch=batch, qconfig=qconfig, project=project, name=name,
                     freeze_bn=freeze_bn, freeze_observers=freeze_observers, lr0=lr0, resume=resume, workers=workers,
                     trust=trust, device=device, ptq_epoch0=ptq_epoch0, dampen=dampen,
                     freeze_osc=freeze_osc)
        args = ["qat", *([str(model)] if model is not None else [])]
        args += [f"{k}={v}" for k, v in given.items() if v is not None]
        rc = launch(args, plan_devices(device, nproc).world)
        if rc:
            raise FxqatError(f"DDP workers failed (exit status {rc}); their messages are above")
        return
    from .training import train_qat

    if workers is None and not resume:
        workers = 2  # the CLI's default (Ultralytics' is 8)
    kw = {k: v for k, v in (("lr0", lr0), ("workers", workers), ("device", device), ("nproc", nproc))
          if v is not None}
    _, best = train_qat(model, data, epochs=epochs, imgsz=imgsz, batch=batch, qconfig=qconfig, project=project,
                        name=name, freeze_bn_epoch=freeze_bn, freeze_observer_epoch=freeze_observers, resume=resume,
                        trust=trust, ptq_epoch0=ptq_epoch0, dampen=dampen,
                        freeze_osc=freeze_osc, **kw)
    from .distributed import launched_world

    if launched_world()[1] == 0:
        print(f"QAT checkpoint: {best}")


def _rows_for(model, fp32, imgsz, batch, onnx: bool, trust=None) -> tuple[list, int, int]:
    """(label, model-form) pairs to evaluate side by side, and the imgsz / batch to run them at; every file is loaded
    here, safely."""
    from .checkpoint import is_checkpoint, load_checkpoint
    from .models import load_model

    rows = []
    if fp32:
        rows.append(("FP32", load_model(fp32, trust=trust)))
    p = Path(str(model))
    if p.is_dir() and p.name.endswith("_openvino_model"):
        return rows + [("OpenVINO", str(p))], *_sizes({}, imgsz, batch)
    if p.suffix == ".onnx":
        if not p.is_file():
            raise FxqatError(f"{p}: ONNX model not found")
        return rows + [("QDQ ONNX (ORT)", str(p))], *_sizes({}, imgsz, batch)
    if not is_checkpoint(p):
        return rows + [("FP32", load_model(str(p), trust=trust))], *_sizes({}, imgsz, batch)
    import fxqat

    gm, ckpt = load_checkpoint(p, with_extra=True)
    imgsz, batch = _sizes(ckpt.get("run_args") or {}, imgsz, batch)
    rows.append(("QAT fake-quant", gm))
    rows.append(("INT8 torch", fxqat.convert(gm)))
    if onnx:
        rows.append(("QDQ ONNX (ORT)", str(fxqat.export_onnx(gm, p.with_suffix(".onnx"), imgsz=imgsz))))
    return rows, imgsz, batch


def _sizes(run: dict, imgsz, batch) -> tuple[int, int]:
    """``imgsz`` / ``batch`` not given: a QAT checkpoint's own run's (``run``: its run arguments; so its stored mAP
    is reproduced exactly), else 320 / 16."""
    taken = {k: int(run[k]) for k, v in (("imgsz", imgsz), ("batch", batch)) if v is None and k in run}
    if taken:
        print("eval: " + ", ".join(f"{k}={v}" for k, v in taken.items()) + " (the QAT run's own)")
    imgsz = imgsz if imgsz is not None else taken.get("imgsz", 320)
    return imgsz, batch if batch is not None else taken.get("batch", 16)


def cmd_eval(model, data, imgsz, batch, fp32, onnx, out, trust, interval=0):
    from .evaluate import as_predictor, evaluate
    from .tasks import read_data, task_metrics

    read_data(data)  # a bad data YAML (or classify folder) is reported before any model work
    if interval and not fp32:
        raise FxqatError("interval=: the differences are to the FP32 model: give fp32=PATH.pt too")
    results, images = [], []
    meta = None
    rows, imgsz, batch = _rows_for(model, fp32, imgsz, batch, onnx, trust)
    task = key = None
    if interval:
        task = as_predictor(rows[0][1]).task  # rows[0]: the fp32= model
        try:
            key = tp_key(task)
        except ValueError as e:
            raise FxqatError(f"interval=: {e}") from None
    for label, m in rows:
        names = stride = None
        if meta is not None and label == "INT8 torch":
            names, stride = meta
        images.append([] if interval else None)
        r = evaluate(m, data, imgsz=imgsz, batch=batch, names=names, stride=stride, images=images[-1])
        if hasattr(m, "meta"):
            meta = (m.meta["names"], m.meta["stride"])
        results.append({"model": label, **r})
    cols = ["model", *[k for k in results[0] if k != "model"]]  # the task's metrics (fxqat.tasks)
    if interval:
        delta, span = f"Δ {task_metrics(task)[1]} pt", "95 % interval"
        cis = paired_deltas(images[0], dict(enumerate(images[1:], 1)), key, interval, progress=True)
        for k, ci in cis.items():
            results[k][delta] = f"{ci['delta_pt']:+.2f}"
            results[k][span] = f"{ci['lo_pt']:+.2f} to {ci['hi_pt']:+.2f}"
        cols += [delta, span]
    _print_table(results, cols)
    if interval:
        print(f"Δ: against FP32 on the same {len(images[0])} validation images; 95 % interval: paired bootstrap, "
              f"{interval} resamples of the images")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))


def _print_table(rows, cols):
    cells = [cols] + [[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
                      for r in rows]
    w = [max(len(x[i]) for x in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.ljust(k) for v, k in zip(row, w)))


def cmd_export(model, format, imgsz, dynamic, report, out, weights="int8", overflow_fix="auto"):
    """QDQ ONNX (``<ckpt>.onnx``) or OpenVINO (``<ckpt>_int8_openvino_model/``) with Ultralytics' metadata, so
    ``YOLO(path)`` / ``yolo predict model=path`` run it; prints the commands to run next."""
    import tempfile

    from .checkpoint import load_checkpoint
    from .deploy import OPENVINO_SUFFIX, export_openvino, next_commands, openvino_dir, require_openvino
    from .export import export_onnx, format_report, qdq_report, resolve_overflow_fix

    if format == "openvino":
        target = Path(out) if out else openvino_dir(model)
        if not target.name.endswith("_openvino_model"):
            raise FxqatError(f"out={out}: an OpenVINO export is a folder whose name ends in '_openvino_model' (how "
                             f"Ultralytics recognizes it), e.g. out={target}{OPENVINO_SUFFIX}")
        require_openvino()
    gm, ckpt = load_checkpoint(model, with_extra=True)
    data = (ckpt.get("train_args") or {}).get("data")
    del ckpt
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(out) if out and format == "onnx" else Path(model).with_suffix(".onnx")
        if format == "openvino":  # the QDQ ONNX model is OpenVINO's input here, not a result
            onnx_path = Path(tmp) / Path(model).with_suffix(".onnx").name
        if overflow_fix == "auto" and format != "openvino":
            overflow_fix = "disable"  # ONNX stays on the trained grid (TensorRT; ONNX Runtime: weights=uint8)
        fix, why = resolve_overflow_fix(overflow_fix)
        print(why)
        export_onnx(gm, onnx_path, imgsz=imgsz, dynamic=dynamic, weights=weights, overflow_fix=fix,
                    requantize_shared=format != "openvino")  # OpenVINO folds DQ through shared ops itself
        rep = format_report(qdq_report(onnx_path)) if report not in (False, "false") else None
        if format == "openvino":
            path = export_openvino(onnx_path, target)
            print(f"OpenVINO INT8 model written: {path}/ ({time.perf_counter() - t:.1f} s)")
        else:
            path = onnx_path
            print(f"QDQ ONNX written: {path} ({time.perf_counter() - t:.1f} s)")
        if report in ("true", "openvino", "onnxruntime"):  # placement diagnosis (fxqat.diagnose) on a runtime
            from .diagnose import diagnose

            runtime = report if report != "true" else ("openvino" if format == "openvino" else "onnxruntime")
            diag = diagnose(path if runtime == "openvino" else onnx_path, runtime, imgsz=imgsz, label=Path(model).stem)
            rep = f"{rep}\n{diag.format()}"
    if rep:
        print(rep)
    source = None
    if data and Path(data).is_file():
        import yaml

        d = yaml.safe_load(Path(data).read_text()) or {}
        val = Path(d.get("path") or Path(data).parent) / str(d.get("val", ""))
        source = val if d.get("val") and val.exists() else None
    for line in next_commands(path, imgsz, data=data, source=source, task=gm.meta.get("task", "detect")):
        print(line)


def cmd_trace(model, mode, imgsz, draw, expand, leaf, nc, out, trust):
    import fxqat
    from fxqat.models import load_model

    t = time.perf_counter()
    det = load_model(model, nc=nc, trust=trust)
    gm = fxqat.trace(det, mode=mode, leaf_modules=[s for s in (leaf or "").split(",") if s])
    dt = time.perf_counter() - t
    table = fxqat.summary(gm, imgsz=imgsz)
    print(table)
    print(f"traced {model} ({mode}) in {dt:.2f} s")
    if out:
        Path(out).write_text(table.to_text() + "\n")
        print(f"summary written to {out}")
    if draw:
        exp = None if expand is None else (expand if expand == "all" else [e for e in expand.split(",") if e])
        print(f"graph drawn to {fxqat.draw(gm, draw, expand=exp, imgsz=imgsz)}")


def cmd_demo(quick, project, seed, task=None, model=None):
    from .demo import run_demo

    run_demo(quick=quick, project=project, seed=seed, task=task, model=model)


def cmd_analyze(model, data, out, imgsz, images, topk, metric, qconfig, trust, budget=None):
    from .analysis import analyze
    from .data.images import image_files
    from .models import load_model

    image_files(data)  # a missing folder / YAML without images is reported before any model work
    det = load_model(model, trust=trust)
    rep = analyze(det, data, imgsz=imgsz, images=images, out=out, topk=topk, metric=metric, qconfig=qconfig,
                  budget=budget)
    print(rep.table(topk * 3))
    print(f"report written to {out}: sensitivity.json, sensitivity.png, critical_qconfig.yaml")
    if rep.budget is not None:
        from .analysis.budget import budget_table

        print(budget_table(rep.budget))
        print(f"budget written to {out}: budget_qconfig.yaml, budget.json, frontier.png")


def cmd_bench(model, imgsz, threads, rounds, trust):
    from .bench import bench_model

    bench_model(model, imgsz=imgsz, threads=threads, rounds=rounds, trust=trust)


def cmd_explore(model, data, out, imgsz, images, analysis, qconfig, color_by, trust):
    from .explorer import explore

    t = time.perf_counter()
    path = explore(model, out=out, data=data, imgsz=imgsz, images=images, analysis=analysis, qconfig=qconfig,
                   color_by=color_by, trust=trust)
    print(f"explorer page written: {path} ({path.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t:.1f} s); "
          "open it in a browser (no network needed)")

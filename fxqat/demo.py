"""``fxqat demo``: the whole story from fxqat's shipped, trained yolov8n, ending in one comparison table and a report.

    shipped FP32 yolov8n ─► PTQ (calibrate) ─► QAT (1 epoch, Ultralytics trainer) ─► INT8 torch, QDQ ONNX on
    OpenVINO and ONNX Runtime ─► mAP, latency, size against FP32 ─► report.md / report.html / report.json, pictures

``task=`` tells the same story for another task's shipped model (:data:`MODELS`): segment (mask mAP), pose (key
point mAP), obb (rotated-box mAP) or classify (top-1 on sign crops); the table's metrics are the task's own
(:func:`fxqat.tasks.task_metrics`) and the pictures draw its predictions (:mod:`fxqat.report_tasks`).

The data is regenerated with the same generator settings the shipped model was trained on; its validation split is
the one the shipped model's metrics were measured on. Training an FP32 model from scratch is its own command
(``fxqat train``, see the README).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

MODEL = "fxqat-signs-yolov8n"
MODELS = {"detect": MODEL, "segment": "fxqat-signs-yolov8n-seg", "pose": "fxqat-signs-yolov8n-pose",
          "obb": "fxqat-signs-yolov8n-obb", "classify": "fxqat-signs-yolov8n-cls"}  # task → the shipped model


@dataclass(frozen=True)
class DemoConfig:
    train: int  # images the QAT epoch trains on (and PTQ calibrates on)
    val: int
    qat_epochs: int
    batch: int
    calib_batches: int
    analyze_images: int
    rounds: int  # interleaved latency rounds
    interval: int = 0  # bootstrap resamples for each form's interval against FP32 (0: none)


DEFAULT = DemoConfig(train=320, val=96, qat_epochs=1, batch=16, calib_batches=8, analyze_images=16, rounds=5,
                     interval=300)
QUICK = DemoConfig(train=32, val=16, qat_epochs=1, batch=16, calib_batches=2, analyze_images=0, rounds=2,
                   interval=100)  # no analysis


def demo_config(task: str = "detect", quick: bool = False) -> DemoConfig:
    """The run's sizes; classify trains on the sign crops of the scenes (a few per scene), and needs enough scenes
    for every class to have a crop in both splits."""
    cfg = QUICK if quick else DEFAULT
    if task == "classify":
        cfg = replace(cfg, train=max(cfg.train, 64), val=max(cfg.val, 64))
    return cfg


def _step(i: int, n: int, text: str) -> float:
    print(f"\n[{i}/{n}] {text}", flush=True)
    return time.perf_counter()


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _save_state(model, path: Path) -> Path:
    torch.save({k: v for k, v in model.state_dict().items()}, path)
    return path


def _pictures(task: str, data, fp32, qat_int8, names: dict, imgsz: int, out: Path) -> Path:
    """FP32 (top) vs INT8 (bottom) predictions on the same validation images: 4 scenes, or 8 crops of different
    classes (classify)."""
    from .data.images import image_files, load_images
    from .report import prediction_grid
    from .report_tasks import task_prediction_grid

    models, path = {"FP32": fp32, "QAT INT8 (torch)": qat_int8}, out / "predictions.png"
    if task == "detect":
        return prediction_grid(models, load_images(image_files(data, "val")[:4], imgsz), names, path)
    if task != "classify":
        return task_prediction_grid(task, models, load_images(image_files(data, "val")[:4], imgsz), names, path)
    by_class = {}
    for f in image_files(Path(data) / "val"):  # one crop of each class (folders are class names)
        by_class.setdefault(f.parent.name, f)
    ids = {v: k for k, v in names.items()}
    files = list(by_class.values())[:8]
    return task_prediction_grid(task, models, load_images(files, imgsz), names, path,
                                truth=[ids.get(f.parent.name, -1) for f in files])


def run_demo(quick: bool = False, project: str = "runs/demo", seed: int | None = None, task: str | None = None,
             model: str | None = None) -> dict:
    """Run the demo of ``task``'s shipped model (:data:`MODELS`), or of the shipped ``model`` (its own task; e.g.
    ``fxqat-signs-yolo26n``, run on its one-to-one path), into ``project`` and return the report dict (also written
    as report.json)."""
    import fxqat

    from .analysis.bootstrap import TP_KEY, paired_deltas
    from .bench import interleaved_medians
    from .checkpoint import load_checkpoint
    from .data.images import iter_image_batches
    from .data.signs import generate
    from .errors import FxqatError
    from .evaluate import OnnxRunner, evaluate
    from .modules.int8 import cpu_has_vnni
    from .report import write_reports
    from .tasks import calibration_source, read_data, task_metrics
    from .training import train_qat
    from .zoo import info, load_shipped

    if task is not None and task not in MODELS:
        raise FxqatError(f"task={task!r}: valid choices are {', '.join(MODELS)}")
    model_name = model or MODELS[task or "detect"]
    shipped = info(model_name)  # a shipped file missing from this installation is named before any work
    if task is not None and shipped.get("task", "detect") != task:
        raise FxqatError(f"model={model_name} is a {shipped.get('task', 'detect')} model, not task={task}; give "
                         "one of them")
    task = shipped.get("task", "detect")  # records written before task models hold detectors
    cfg = demo_config(task, quick)
    out = Path(project).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    gen = shipped["data"]
    scene = int(gen["imgsz"])
    imgsz = int(shipped.get("imgsz", scene))  # the size the model runs at (classify: its crops)
    seed = int(gen["seed"]) if seed is None else seed
    n = 7
    what = f"synthetic signs at {imgsz} px" if task != "classify" else \
        f"scenes at {scene} px, their sign crops run at {imgsz} px"
    _step(1, n, f"data: {cfg.train} train / {cfg.val} val {what} (the shipped model's generator settings, seed {seed})")
    data = generate(out / "data", train=cfg.train, val=cfg.val, imgsz=scene, seed=seed, min_size=gen["min_size"],
                    max_size=gen["max_size"], task=task)
    calib_source = calibration_source(read_data(data), data)
    fp32 = load_shipped(model_name)
    names, stride = fp32.names, fp32.stride

    _step(2, n, f"PTQ: fxqat.prepare_qat + fxqat.calibrate on {cfg.calib_batches} batches of training images")
    ptq = fxqat.prepare_qat(fp32)
    fxqat.calibrate(ptq, iter_image_batches(calib_source, imgsz=imgsz, batch=cfg.batch, split="train"),
                    batches=cfg.calib_batches)
    ort_ptq = fxqat.prepare_qat(fp32, "onnxruntime")  # ONNX Runtime's placement (see its preset)
    fxqat.calibrate(ort_ptq, iter_image_batches(calib_source, imgsz=imgsz, batch=cfg.batch, split="train"),
                    batches=cfg.calib_batches, progress=False)

    _step(3, n, f"QAT: {cfg.qat_epochs} epoch on {cfg.train} images through the Ultralytics trainer")
    _, qat_ckpt = train_qat(model_name, data, epochs=cfg.qat_epochs, imgsz=imgsz, batch=cfg.batch, project=str(out),
                            name="qat", workers=2, calib_batches=cfg.calib_batches, verbose=False)
    qat, ck = load_checkpoint(qat_ckpt, with_extra=True)
    qat.eval()
    qat_kept_ptq = ck.get("epoch") == -1  # the QAT epoch did not beat the PTQ start (epoch 0), which stayed best.pt

    _step(4, n, "convert to INT8 torch (oneDNN); export QDQ ONNX for OpenVINO and ONNX Runtime")
    ptq_int8, qat_int8 = fxqat.convert(ptq.eval()), fxqat.convert(qat)
    from .export import resolve_overflow_fix

    ov_fix, why = resolve_overflow_fix("auto")  # OpenVINO's int8 kernels saturate on CPUs without VNNI
    print(why)
    onnx_path = fxqat.export_onnx(qat, out / "qat_int8.onnx", imgsz=imgsz, overflow_fix=ov_fix)
    ort_weights = "int8" if cpu_has_vnni() else "uint8"  # ORT's u8s8 kernels saturate without VNNI
    ort_path = fxqat.export_onnx(ort_ptq.eval(), out / "ptq_int8_onnxruntime.onnx", imgsz=imgsz, weights=ort_weights)
    forms = {"FP32": ("torch", fp32), "PTQ INT8": ("torch (oneDNN)", ptq_int8),
             "QAT INT8": ("torch (oneDNN)", qat_int8)}
    runners = {}
    try:
        from .deploy import export_openvino, openvino_predictor

        ov_dir = export_openvino(onnx_path)
        ov_pred = openvino_predictor(ov_dir)
        forms["QAT INT8 QDQ"] = ("OpenVINO" + (", 7-bit weights (no VNNI)" if ov_fix == "enable" else ""), ov_pred)
        runners["QAT INT8 QDQ"] = ov_pred.fn
    except Exception as e:  # noqa: BLE001 - OpenVINO is optional
        print(f"OpenVINO row skipped: {e}")
        ov_dir = None
    ort = OnnxRunner(ort_path, threads=threads)
    forms["PTQ INT8 QDQ"] = ("ONNX Runtime (onnxruntime preset)", str(ort_path))
    runners["PTQ INT8 QDQ"] = ort
    sizes = {"FP32": _save_state(fp32, out / "fp32_state.pt"), "PTQ INT8": _save_state(ptq_int8, out / "ptq_int8.pt"),
             "QAT INT8": _save_state(qat_int8, out / "qat_int8.pt"), "QAT INT8 QDQ": onnx_path,
             "PTQ INT8 QDQ": ort_path}

    companion, main = task_metrics(task)
    _step(5, n, f"evaluate {main} on the {cfg.val} validation {'scenes' if task == 'classify' else 'images'} "
                f"(Ultralytics validator) for every form")
    images = {k: [] for k in forms} if cfg.interval and task in TP_KEY else {}  # per-image statistics
    scores = {k: evaluate(m, data, imgsz=imgsz, batch=cfg.batch, names=names, stride=stride, images=images.get(k))
              for k, (_, m) in forms.items()}
    cis = paired_deltas(images["FP32"], {k: v for k, v in images.items() if k != "FP32"}, TP_KEY[task],
                        cfg.interval) if images else {}

    torch.set_num_threads(threads)  # Ultralytics' trainer changes it
    _step(6, n, f"latency at {imgsz} px, batch 1, {threads} threads, {cfg.rounds} interleaved rounds")
    x = torch.rand(1, 3, imgsz, imgsz)
    fns = {k: runners.get(k, m) for k, (_, m) in forms.items()}
    lat = interleaved_medians(fns, x, rounds=cfg.rounds)

    _step(7, n, "report: table, FP32 vs INT8 predictions, graph drawing, sensitivity")
    rows = []
    for k, (runtime, _) in forms.items():
        rows.append({"model": k, "runtime": runtime, companion: scores[k][companion], main: scores[k][main],
                     "latency_ms": lat[k], "size_mb": _size_mb(sizes[k])})
        if k in cis:  # points → the metric's units, as the table's Δ
            rows[-1]["delta_ci"] = [cis[k]["lo_pt"] / 100, cis[k]["hi_pt"] / 100]
    pictures = {"predictions": _pictures(task, data, fp32, qat_int8, names, imgsz, out).name}
    arch = model_name.removeprefix("fxqat-signs-")
    fxqat.draw(qat, out / "qat_graph.svg", color_by="precision", imgsz=imgsz, title=f"{arch} QAT graph")
    pictures["graph"] = "qat_graph.svg"
    critical = []
    try:
        if not cfg.analyze_images:
            raise RuntimeError("not in --quick (run fxqat analyze)")
        rep = fxqat.analyze(fp32, Path(data) / "val" if task == "classify" else data, imgsz=imgsz,
                            images=cfg.analyze_images, out=out / "analysis", topk=3, progress=True)
        pictures["sensitivity"] = "analysis/sensitivity.png"
        critical = [r["name"] for r in rep.ranking()[:3]]
    except Exception as e:  # noqa: BLE001 - the report still stands without the analysis
        print(f"analysis skipped: {e}")
    report = {"config": asdict(cfg), "model": model_name, "shipped_metrics": shipped.get("metrics", {}),
              "imgsz": imgsz, "rows": rows, "critical_layers": critical, "pictures": pictures,
              "machine": {"threads": threads, "torch": torch.__version__, "vnni": cpu_has_vnni()},
              "qat_kept_ptq_start": qat_kept_ptq, "seconds": time.perf_counter() - t0,
              "qat_checkpoint": str(qat_ckpt), "onnx": str(onnx_path),
              "onnx_onnxruntime": str(ort_path), "openvino": str(ov_dir) if ov_dir else None,
              "task": task, "metrics": [companion, main], "scene_imgsz": scene,
              "interval": cfg.interval if cis else 0}
    table = write_reports(report, out, quick)
    print("\n" + table)
    print(f"\nreport: {out / 'report.html'}  ({report['seconds'] / 60:.1f} min)")
    return report

"""``fxqat demo``: the whole story on built-in data, ending in one comparison table and a report folder.

    signs data ─► FP32 yolov8n ─► PTQ (calibrate) ─► QAT (Ultralytics trainer) ─► INT8 torch + QDQ ONNX
               └► mAP50-95, latency, size for FP32 / PTQ INT8 / QAT INT8 ─► report.md, report.json, pictures
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class DemoConfig:
    imgsz: int
    train: int
    val: int
    fp32_epochs: int
    qat_epochs: int
    batch: int
    calib_batches: int
    analyze_images: int


DEFAULT = DemoConfig(imgsz=256, train=480, val=96, fp32_epochs=10, qat_epochs=2, batch=16, calib_batches=8,
                     analyze_images=16)
QUICK = DemoConfig(imgsz=160, train=48, val=16, fp32_epochs=2, qat_epochs=1, batch=16, calib_batches=2,
                   analyze_images=4)


def _step(i: int, n: int, text: str) -> float:
    print(f"\n[{i}/{n}] {text}", flush=True)
    return time.perf_counter()


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _save_state(model, path: Path) -> Path:
    torch.save({k: v for k, v in model.state_dict().items()}, path)
    return path


def _latency(fn, x, reps=5) -> float:
    from .bench import _time

    with torch.no_grad():
        return _time(lambda: fn(x), warmup=2, reps=reps)


def _prediction_images(model, data_yaml: Path, imgsz: int, names: dict, out: Path, n: int = 4) -> Path:
    import cv2
    import numpy as np
    from ultralytics.utils.nms import non_max_suppression

    from .data.images import image_files, load_images

    files = image_files(data_yaml, "val")[:n]
    x = load_images(files, imgsz)
    with torch.no_grad():
        y = model(x)
    y = y[0] if isinstance(y, (tuple, list)) else y
    dets = non_max_suppression(y, conf_thres=0.25, iou_thres=0.7)
    tiles = []
    for img, d in zip(x, dets):
        im = np.ascontiguousarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)[..., ::-1])
        for *xyxy, conf, cls in d.tolist():
            p0, p1 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
            cv2.rectangle(im, p0, p1, (0, 255, 0), 1)
            cv2.putText(im, f"{names.get(int(cls), int(cls))} {conf:.2f}", (p0[0], max(8, p0[1] - 2)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.3, (0, 255, 0), 1, cv2.LINE_AA)
        tiles.append(im)
    path = out / "predictions_int8.png"
    cv2.imwrite(str(path), np.hstack(tiles))
    return path


def run_demo(quick: bool = False, project: str = "runs/demo", seed: int = 0) -> dict:
    import fxqat

    from .checkpoint import load_checkpoint
    from .data.images import iter_image_batches
    from .data.signs import generate
    from .evaluate import OnnxRunner, evaluate
    from .models import load_model
    from .training import train_fp32, train_qat

    cfg = QUICK if quick else DEFAULT
    out = Path(project).resolve()
    out.mkdir(parents=True, exist_ok=True)
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    n = 8
    _step(1, n, f"synthetic traffic signs: {cfg.train} train / {cfg.val} val images at {cfg.imgsz} px")
    data = generate(out / "data", train=cfg.train, val=cfg.val, imgsz=cfg.imgsz, seed=seed)

    _step(2, n, f"FP32 yolov8n baseline: {cfg.fp32_epochs} epochs (Ultralytics trainer)")
    fp32_pt = train_fp32("yolov8n.yaml", data, epochs=cfg.fp32_epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                         project=str(out), name="fp32", workers=2, verbose=False)
    fp32 = load_model(fp32_pt).eval()

    _step(3, n, "PTQ: fxqat.prepare_qat + fxqat.calibrate on training images")
    ptq = fxqat.prepare_qat(fp32)
    fxqat.calibrate(ptq, iter_image_batches(data, imgsz=cfg.imgsz, batch=cfg.batch, split="train"),
                    batches=cfg.calib_batches)
    ptq.eval()

    _step(4, n, f"QAT: {cfg.qat_epochs} epoch(s) fine-tuning through the Ultralytics trainer")
    _, qat_ckpt = train_qat(fp32_pt, data, epochs=cfg.qat_epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                            project=str(out), name="qat", workers=2, calib_batches=cfg.calib_batches, verbose=False)
    qat = load_checkpoint(qat_ckpt).eval()

    _step(5, n, "convert to INT8 torch (oneDNN) and export QDQ ONNX")
    ptq_int8, qat_int8 = fxqat.convert(ptq), fxqat.convert(qat)
    onnx_path = fxqat.export_onnx(qat, out / "qat_int8.onnx", imgsz=cfg.imgsz)
    sizes = {"FP32": _size_mb(_save_state(fp32, out / "fp32_state.pt")),
             "PTQ INT8": _size_mb(_save_state(ptq_int8, out / "ptq_int8_state.pt")),
             "QAT INT8": _size_mb(_save_state(qat_int8, out / "qat_int8_state.pt")),
             "QAT QDQ ONNX": _size_mb(onnx_path)}

    _step(6, n, "evaluate mAP (Ultralytics validator) for every form")
    meta = (qat.meta["names"], qat.meta["stride"])
    forms = {"FP32": fp32, "PTQ INT8": ptq_int8, "QAT fake-quant": qat, "QAT INT8": qat_int8,
             "QAT QDQ ONNX": str(onnx_path)}
    maps = {k: evaluate(m, data, imgsz=cfg.imgsz, batch=cfg.batch, names=meta[0], stride=meta[1])
            for k, m in forms.items()}

    torch.set_num_threads(threads)  # Ultralytics' trainer changes it
    _step(7, n, f"latency at {cfg.imgsz} px, batch 1, {threads} threads (one run)")
    x = torch.rand(1, 3, cfg.imgsz, cfg.imgsz)
    ort = OnnxRunner(onnx_path, threads=torch.get_num_threads())
    lat = {"FP32": _latency(fp32, x), "PTQ INT8": _latency(ptq_int8, x), "QAT INT8": _latency(qat_int8, x),
           "QAT QDQ ONNX": _latency(ort, x), "QAT fake-quant": float("nan")}

    _step(8, n, "report: table, graph drawing, sensitivity, predictions")
    rows = []
    for k in ("FP32", "PTQ INT8", "QAT fake-quant", "QAT INT8", "QAT QDQ ONNX"):
        rows.append({"model": k, "mAP50": maps[k]["mAP50"], "mAP50-95": maps[k]["mAP50-95"],
                     "latency_ms": lat[k], "size_mb": sizes.get(k, float("nan"))})
    fxqat.draw(qat, out / "qat_graph.svg", color_by="precision", imgsz=cfg.imgsz, title="yolov8n QAT graph")
    pictures = {"graph": "qat_graph.svg",
                "predictions": _prediction_images(qat_int8, data, cfg.imgsz, meta[0], out).name}
    try:
        rep = fxqat.analyze(fp32, data, imgsz=cfg.imgsz, images=cfg.analyze_images, out=out / "analysis",
                            topk=3, progress=True)
        pictures["sensitivity"] = "analysis/sensitivity.png"
        critical = [r["name"] for r in rep.ranking()[:3]]
    except Exception as e:  # noqa: BLE001 - the report still stands without the analysis
        print(f"analysis skipped: {e}")
        critical = []
    elapsed = time.perf_counter() - t0
    report = {"config": asdict(cfg), "rows": rows, "critical_layers": critical, "pictures": pictures,
              "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}, "seconds": elapsed,
              "fp32_checkpoint": str(fp32_pt), "qat_checkpoint": str(qat_ckpt), "onnx": str(onnx_path)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    table = _markdown(rows)
    md = [f"# fxqat demo ({'quick' if quick else 'default'})", "", table, "",
          f"Data: {cfg.train} train / {cfg.val} val synthetic signs at {cfg.imgsz} px; FP32 {cfg.fp32_epochs} "
          f"epochs from scratch, QAT {cfg.qat_epochs} epoch(s). Latency: batch 1, {torch.get_num_threads()} threads, "
          "median, all rows in this run. The QDQ ONNX row runs in ONNX Runtime with the default (TensorRT / "
          "OpenVINO-style) placement, which ONNX Runtime does not fuse around SiLU; for ONNX Runtime deployment "
          "train with `qconfig=onnxruntime.yaml` (see README, Quantization defaults).", "",
          f"Critical layers (analysis): {', '.join(critical) or 'n/a'}", "",
          f"![graph]({pictures['graph']})", f"![predictions]({pictures['predictions']})"]
    if "sensitivity" in pictures:
        md.append(f"![sensitivity]({pictures['sensitivity']})")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n" + table)
    print(f"\nreport: {out / 'report.md'}  ({elapsed / 60:.1f} min)")
    return report


def _fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)  # NaN: not measured


def _markdown(rows) -> str:
    head = "| model | mAP50 | mAP50-95 | latency (ms) | size (MB) |\n|---|---|---|---|---|"
    body = "\n".join(f"| {r['model']} | {r['mAP50']:.3f} | {r['mAP50-95']:.3f} | {_fmt(r['latency_ms'], '.1f')} | "
                     f"{_fmt(r['size_mb'], '.2f')} |" for r in rows)
    return head + "\n" + body

"""The demo's report: one table against FP32 (markdown, JSON and a self-contained HTML page) and FP32-vs-INT8
prediction pictures."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch


def _fmt(v: float, spec: str) -> str:
    return "-" if v != v else format(v, spec)  # NaN: not measured


DETECT_METRICS = ("mAP50", "mAP50-95")  # (companion, main): fxqat.tasks.task_metrics("detect")


def table_rows(rows: list[dict], metrics=DETECT_METRICS) -> list[list[str]]:
    """Rows of strings with the deltas against the FP32 row (main-metric points, speed-up, size ratio).
    ``metrics``: the task's (companion, main) metric names (:func:`fxqat.tasks.task_metrics`)."""
    companion, main = metrics
    ref = next(r for r in rows if r["model"] == "FP32")
    out = []
    for r in rows:
        d = r[main] - ref[main]
        delta = "" if r is ref else f"{d:+.3f}"
        if r.get("delta_ci"):  # the 95 % interval of the difference (paired bootstrap), in the metric's units
            delta += " [{:+.3f}, {:+.3f}]".format(*r["delta_ci"])
        speed = ref["latency_ms"] / r["latency_ms"] if r["latency_ms"] == r["latency_ms"] else float("nan")
        out.append([r["model"], r["runtime"], f"{r[main]:.3f}", delta,
                    f"{r[companion]:.3f}", _fmt(r["latency_ms"], ".1f"), "" if r is ref else _fmt(speed, ".2f") + "×",
                    _fmt(r["size_mb"], ".2f"), "" if r is ref else f"{r['size_mb'] / ref['size_mb']:.2f}×"])
    return out


def head(metrics=DETECT_METRICS) -> list[str]:
    """The table's header for the task's (companion, main) metrics."""
    companion, main = metrics
    return ["model", "runtime", main, "Δ vs FP32", companion, "latency (ms)", "speed-up", "size (MB)", "size ratio"]


HEAD = head()


def markdown_table(rows: list[dict], metrics=DETECT_METRICS) -> str:
    h = head(metrics)
    lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows, metrics)]
    return "\n".join(lines)


def prediction_grid(models: dict, images: torch.Tensor, names: dict, path: Path, conf: float = 0.25) -> Path:
    """One row of pictures per model (same images), boxes with class and score: FP32 and INT8 side by side."""
    import cv2
    import numpy as np
    from ultralytics.utils.nms import non_max_suppression

    rows = []
    for label, model in models.items():
        with torch.no_grad():
            y = model(images)
        y = y[0] if isinstance(y, (tuple, list)) else y
        tiles = []
        for img, d in zip(images, non_max_suppression(y, conf_thres=conf, iou_thres=0.7)):
            im = np.ascontiguousarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)[..., ::-1])
            im = cv2.resize(im, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
            for *xyxy, score, cls in d.tolist():
                p0, p1 = (int(xyxy[0] * 2), int(xyxy[1] * 2)), (int(xyxy[2] * 2), int(xyxy[3] * 2))
                cv2.rectangle(im, p0, p1, (0, 255, 0), 1)
                cv2.putText(im, f"{names.get(int(cls), int(cls))} {score:.2f}", (p0[0], max(10, p0[1] - 3)),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 255, 0), 1, cv2.LINE_AA)
            tiles.append(im)
        strip = np.hstack(tiles)
        band = np.full((22, strip.shape[1], 3), 255, np.uint8)
        cv2.putText(band, label, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.vstack([band, strip]))
    cv2.imwrite(str(path), np.vstack(rows))
    return path


def _embed(path: Path) -> str:
    if not path.is_file():
        return ""
    if path.suffix == ".svg":
        return f'<div class="svg">{path.read_text()}</div>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}th{background:#f3f3f3}img{max-width:100%}
.svg svg{max-width:100%;height:auto}.note{color:#555}"""


def write_reports(report: dict, out: Path, quick: bool) -> str:
    """Write report.json, report.md and a self-contained report.html (pictures inlined); return the table."""
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    rows, pics, imgsz = report["rows"], report["pictures"], report["imgsz"]
    threads, cfg = report["machine"]["threads"], report["config"]
    metrics, task = tuple(report.get("metrics", DETECT_METRICS)), report.get("task", "detect")
    what = f"synthetic signs at {imgsz} px" if task != "classify" else \
        f"synthetic scenes at {report.get('scene_imgsz', imgsz)} px, their sign crops at {imgsz} px"
    note = (f"Start: the shipped {report['model']} (FP32). Data: {cfg['train']} train / {cfg['val']} val {what}; "
            f"QAT {cfg['qat_epochs']} epoch. Latency: batch 1, {threads} threads, median of "
            f"{cfg['rounds']} interleaved rounds in this run. ONNX Runtime runs the model prepared with the "
            "onnxruntime preset (its placement); OpenVINO runs the QAT model's QDQ export.")
    if report.get("interval"):
        note += (f" Δ vs FP32: on the same {cfg['val']} validation images; in brackets its 95 % interval, a paired "
                 f"bootstrap over those images ({report['interval']} resamples): how far a difference of this size can "
                 "come from which images were drawn.")
    if report.get("qat_kept_ptq_start"):
        note += (" The QAT epoch did not beat the PTQ start on the validation images, so best.pt (the QAT rows) is the "
                 "PTQ start: QAT never ends below it.")
    table = markdown_table(rows, metrics)
    critical = ", ".join(report["critical_layers"]) or "n/a"
    title = f"fxqat demo{'' if task == 'detect' else f' task={task}'} ({'quick' if quick else 'default'})"
    md = [f"# {title}", "", table, "", note, "",
          f"Critical layers (analysis): {critical}", "", f"![predictions]({pics['predictions']})",
          f"![graph]({pics['graph']})"]
    if "sensitivity" in pics:
        md.append(f"![sensitivity]({pics['sensitivity']})")
    (out / "report.md").write_text("\n".join(md) + "\n")
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                    for r in table_rows(rows, metrics))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fxqat demo</title><style>{CSS}</style>"
             "</head><body>", f"<h1>{html.escape(title)}</h1>",
             "<table><tr>" + "".join(f"<th>{h}</th>" for h in head(metrics)) + f"</tr>{cells}</table>",
             f"<p class='note'>{html.escape(note)} Finished in {report['seconds'] / 60:.1f} min.</p>",
             "<h2>Predictions: FP32 (top) and INT8 (bottom), same images</h2>", _embed(out / pics["predictions"])]
    if "sensitivity" in pics:
        parts += [f"<h2>Critical layers: {html.escape(critical)}</h2>", _embed(out / pics["sensitivity"])]
    parts += ["<h2>QAT graph, coloured by precision</h2>", _embed(out / pics["graph"]), "</body></html>"]
    (out / "report.html").write_text("\n".join(parts))
    return table

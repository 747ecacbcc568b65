"""The deployment suite: one table per model, every row of a model timed in the same interleaved rounds.

Models of every task (detect, segment, pose, obb, classify): ``--models yolov8n,yolov8n-seg,yolov8n-cls``; classify
runs at ``--cls-imgsz`` (224), the others at ``--imgsz`` (640), ``NAME@SIZE`` sets one model's size. Each peer's PTQ
keeps the task head's float tail (the decode leaf, ``peers.FLOAT_TAIL``) out of INT8. A row that cannot be built or
run for a model is skipped with a note naming the error.

Rows (640, batch 1, 2 threads, per model): torch FP32; ONNX Runtime FP32 and its INT8 PTQ (quantize_static, QDQ,
per-channel); OpenVINO FP32 and NNCF INT8 (MIXED preset, head arithmetic ignored); plain torch.ao INT8 (onednn);
fxqat INT8 torch; fxqat QDQ on ONNX Runtime (default and ``onnxruntime.yaml``) and on OpenVINO (the OpenVINO form,
``overflow_fix=auto`` as ``fxqat export format=openvino``: a 7-bit weight grid on a CPU without VNNI). Columns: median
latency over interleaved rounds (row order rotating each round) and its spread (interquartile range / median),
model file size, peak memory (RSS high-water mark of a child process that loads the model and runs 5 inferences).
Then per model the ratios the targets are stated in. Also (first detect model): prepare time and QAT step time / memory vs
an FP32 training step. Peers that are not installed are skipped with a note.

    python -m benchmarks [--models yolov8n,yolov8n-seg,yolov8n-cls@224] [--imgsz 640] [--cls-imgsz 224] [--rounds 5]
                         [--quick] [--placement-ab] [--calib 16] [--fp32 best.pt] [--data data.yaml] [--no-memory]
                         [--no-train] [--end2end]

``--quick``: 3 rounds of 1 warm-up + 3 timed calls per row, no peak-memory children, no QAT step.
``--placement-ab``: adds the OpenVINO row of the ONNX form (requantization after shared ops) beside the OpenVINO form.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.data.toy import toy_batch  # noqa: E402
from fxqat.evaluate import OnnxRunner  # noqa: E402
from fxqat.models import load_model  # noqa: E402

from fxqat.bench import interleaved_times, spread  # noqa: E402

from .common import markdown, save, table  # noqa: E402
from .peers import (  # noqa: E402
    FLOAT_TAIL,
    export_fp32_onnx,
    nncf_ptq,
    openvino_runner,
    ort_quantize_static,
    plain_torch_ao_int8,
)


def _calib_images(data, imgsz: int, n: int = 16) -> torch.Tensor:
    if data:
        from fxqat.data.images import image_files, load_images

        return load_images(image_files(data, "train")[:n], imgsz)
    from fxqat.data.signs import SignsConfig, make_image

    imgs = [torch.from_numpy(make_image(i, 0, "calib", SignsConfig(imgsz=imgsz))[0]) for i in range(n)]
    return torch.stack(imgs).permute(0, 3, 1, 2).float() / 255


def _size_mb(*paths) -> float:
    return sum(Path(p).stat().st_size for p in paths if p and Path(p).exists()) / 1e6


def _vm_hwm_mb() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited through fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_peak(builder_spec, q):
    kind, arg, threads, imgsz = builder_spec
    torch.set_num_threads(threads)
    fn = _load_runner(kind, arg, threads)
    x = torch.rand(1, 3, imgsz, imgsz)
    with torch.no_grad():
        for _ in range(5):
            fn(x)
    q.put(_vm_hwm_mb())


def _load_runner(kind, arg, threads):
    if kind == "torch":
        return torch.load(arg, weights_only=False)  # the INT8 module this benchmark itself saved a moment ago
    if kind == "ort":
        return OnnxRunner(arg, threads=threads)
    if kind == "openvino":
        return openvino_runner(arg, threads)
    raise ValueError(kind)


def peak_memory_mb(kind, arg, threads, imgsz) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=((kind, arg, threads, imgsz), q))
    p.start()
    p.join(300)
    if p.exitcode != 0 or q.empty():
        return float("nan")
    return q.get()


def parse_models(text: str) -> list[tuple[str, int | None]]:
    """``--models``: comma-separated names or files, each optionally ``@SIZE`` (its own input size): ``yolov8n,
    yolov8n-cls@224`` → ``[("yolov8n.yaml", None), ("yolov8n-cls.yaml", 224)]``. A bare name means its YAML."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, size = item.partition("@")
        if not name or (size and not (size.isdigit() and int(size) >= 32 and int(size) % 32 == 0)):
            raise SystemExit(f"--models {item!r}: expected NAME or NAME@SIZE with SIZE a multiple of 32 (>= 32), "
                             "e.g. yolov8n-cls@224")
        out.append((name if name.endswith((".yaml", ".yml", ".pt")) else f"{name}.yaml", int(size) if size else None))
    if not out:
        raise SystemExit("--models: no model given (e.g. --models yolov8n,yolov8n-seg)")
    return out


def model_imgsz(task: str, size: int | None, args) -> int:
    """A model's input size: its own ``@SIZE``, else ``--cls-imgsz`` for classify (224), else ``--imgsz`` (640)."""
    return size or (args.cls_imgsz if task == "classify" else args.imgsz)


def _row_builders(args, work: Path, model, imgsz: int, calib: torch.Tensor) -> list[tuple[str, object]]:
    """[(row, builder)]: each builder returns (runner, kind, artifact path); built in order, a failure is a note."""
    from fxqat.export import resolve_overflow_fix

    has_ov = importlib.util.find_spec("openvino") is not None
    has_nncf = has_ov and importlib.util.find_spec("nncf") is not None
    batches = [calib[i:i + 4] for i in range(0, len(calib), 4)]
    st: dict = {}  # artifacts shared by later rows

    def fp32_onnx():
        if "fp32_onnx" not in st:
            st["fp32_onnx"] = export_fp32_onnx(model, work / "fp32.onnx", imgsz)
        return st["fp32_onnx"]

    def qat():
        if "qat" not in st:
            q = fxqat.prepare_qat(model)
            fxqat.calibrate(q, batches, progress=False)
            st["qat"] = q.eval()
        return st["qat"]

    def ort(path):
        return OnnxRunner(path, threads=args.threads), "ort", path

    def ov(path):
        return openvino_runner(path, args.threads), "openvino", path

    def nncf_row():
        return ov(nncf_ptq(fp32_onnx(), work / "nncf_int8.xml", calib))

    def fxqat_int8():
        int8 = fxqat.convert(qat())
        torch.save(int8, work / "fxqat_int8.pt")
        return int8, "torch", work / "fxqat_int8.pt"

    def fxqat_ov(requantize_shared: bool, name: str):
        fix, _ = resolve_overflow_fix("auto")  # as `fxqat export format=openvino` does on this host
        return ov(fxqat.export_onnx(qat(), work / name, imgsz=imgsz, requantize_shared=requantize_shared,
                                    overflow_fix=fix))

    def fxqat_ort_preset():
        q = fxqat.prepare_qat(model, "onnxruntime.yaml")  # pre-activation grids: QLinearConv in ONNX Runtime
        fxqat.calibrate(q, batches, progress=False)
        return ort(fxqat.export_onnx(q.eval(), work / "fxqat_qdq_ort.onnx", imgsz=imgsz))

    def missing(what):
        def f():
            raise ModuleNotFoundError(f"{what} not installed (pip install openvino nncf)")
        return f

    rows = [
        ("ONNX Runtime FP32", lambda: ort(fp32_onnx())),
        ("ONNX Runtime INT8 (quantize_static)",
         lambda: ort(ort_quantize_static(fp32_onnx(), work / "ort_int8.onnx", calib))),
        ("OpenVINO FP32", (lambda: ov(fp32_onnx())) if has_ov else missing("openvino")),
        ("OpenVINO NNCF INT8 (PTQ)", nncf_row if has_nncf else missing("nncf")),
        ("plain torch.ao INT8 (onednn)", lambda: (plain_torch_ao_int8(model, "onednn", list(calib[:8, None])),
                                                  None, None)),
        ("fxqat INT8 torch", fxqat_int8),
        ("fxqat QDQ on ONNX Runtime", lambda: ort(fxqat.export_onnx(qat(), work / "fxqat_qdq.onnx", imgsz=imgsz))),
        # the OpenVINO form (fxqat export format=openvino): no requantization after shared ops, overflow_fix=auto
        ("fxqat QDQ on OpenVINO", (lambda: fxqat_ov(False, "fxqat_qdq_ov.onnx")) if has_ov else missing("openvino")),
    ]
    if getattr(args, "placement_ab", False):
        rows.append(("fxqat QDQ on OpenVINO, ONNX form",
                     (lambda: fxqat_ov(True, "fxqat_qdq_ov_onnxform.onnx")) if has_ov else missing("openvino")))
    rows.append(("fxqat QDQ [onnxruntime.yaml] on ONNX Runtime", fxqat_ort_preset))
    return rows


def select_rows(builders: list, rows: str | None) -> list:
    """The builders whose row name contains one of the comma-separated, case-insensitive ``rows`` words (all when
    ``rows`` is empty); a word that matches no row is an error naming the rows."""
    words = [w.strip().lower() for w in (rows or "").split(",") if w.strip()]
    if not words:
        return builders
    names = [r for r, _ in builders]
    unknown = [w for w in words if not any(w in r.lower() for r in names)]
    if unknown:
        raise SystemExit(f"--rows {', '.join(unknown)}: matches no row; rows: torch FP32 (always), {', '.join(names)}")
    return [(r, b) for r, b in builders if any(w in r.lower() for w in words)]


def build(args, work: Path, spec: str = "yolov8n.yaml", size: int | None = None) -> tuple[dict, list[str], dict]:
    """({row: (runner, kind, artifact path)}, notes, info) for one model (``args.fp32`` or ``spec``) of any task.
    A row that cannot be built for this model is left out with a note saying why (never silently); ``info``:
    name, task, imgsz."""
    from fxqat.tracing import task_of

    model = load_model(args.fp32 or spec, nc=None if args.fp32 else 10).eval()
    if getattr(args, "end2end", False):
        from fxqat.modules.e2e import has_one2one

        if not has_one2one(model.model[-1]):
            raise SystemExit(f"--end2end: {args.fp32 or spec} has no end-to-end (one-to-one) head")
        model.end2end = True  # every row, peers included, built from the one-to-one (top-k) network
    task = task_of(model)
    imgsz = model_imgsz(task, size, args)
    name = Path(args.fp32).stem if args.fp32 else Path(spec).stem
    calib = _calib_images(args.data, imgsz, getattr(args, "calib", 16))
    notes = [f"{name}: peers' PTQ keeps the {task} float tail out of INT8 ({FLOAT_TAIL[task]})"]
    if task == "segment":
        notes.append(f"{name}: Proto's ConvTranspose upsample is float in fxqat (segment.upsample role) and INT8 in "
                     "the peers' PTQ")
    fp32_pt = work / "fp32_model.pt"
    torch.save(model, fp32_pt)
    rows: dict[str, tuple] = {"torch FP32": (model, "torch", fp32_pt)}
    x = torch.rand(1, 3, imgsz, imgsz)
    for row, make in select_rows(_row_builders(args, work, model, imgsz, calib), getattr(args, "rows", None)):
        try:
            built = make()
            with torch.no_grad():
                built[0](x)  # it must run on this model's input, not only build
        except Exception as e:  # noqa: BLE001 - any failure of a peer on this task is reported, not fatal
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            notes.append(f"{name} ({task}): row '{row}' skipped: {type(e).__name__}: {msg}")
            continue
        rows[row] = built
    return rows, notes, {"name": name, "task": task, "imgsz": imgsz}


def _train_child(mode: str, model_spec: str, imgsz: int, batch: int, steps: int, threads: int, q) -> None:
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    torch.set_num_threads(threads)
    det = load_model(model_spec, nc=10)
    det.args = get_cfg()
    crit = v8DetectionLoss(det)
    x, tgt = toy_batch(batch, imgsz, seed=0)
    m = det if mode == "FP32" else fxqat.prepare_qat(det, example_inputs=(x,))
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        loss, _ = crit(m(x), tgt)
        loss.sum().backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    q.put(((time.perf_counter() - t) / steps, _vm_hwm_mb()))


def qat_step(model_spec: str, imgsz: int, batch: int = 8, steps: int = 3, threads: int = 2) -> dict:
    """Training-step time and peak RSS, each in its own process: FP32 DetectionModel vs fxqat QAT graph."""
    ctx = mp.get_context("spawn")
    out = {}
    for mode in ("FP32", "fxqat QAT"):
        q = ctx.Queue()
        p = ctx.Process(target=_train_child, args=(mode, model_spec, imgsz, batch, steps, threads, q))
        p.start()
        p.join(900)
        dt, rss = q.get() if not q.empty() else (float("nan"), float("nan"))
        out[mode] = {"step_s": dt, "peak_rss_mb": rss}
    return out


SUMMARY = (  # (label, numerator row, denominator row, target)
    ("OpenVINO: fxqat QDQ / NNCF PTQ", "fxqat QDQ on OpenVINO", "OpenVINO NNCF INT8 (PTQ)", "<= 1.0"),
    ("fxqat INT8 torch / NNCF PTQ", "fxqat INT8 torch", "OpenVINO NNCF INT8 (PTQ)", "<= 1.0"),
    ("ONNX Runtime: fxqat [onnxruntime.yaml] / quantize_static", "fxqat QDQ [onnxruntime.yaml] on ONNX Runtime",
     "ONNX Runtime INT8 (quantize_static)", "<= 0.8"),
    ("OpenVINO: fxqat QDQ / OpenVINO FP32", "fxqat QDQ on OpenVINO", "OpenVINO FP32", "<= 0.5 (stretch)"),
    ("OpenVINO: OpenVINO form / ONNX form", "fxqat QDQ on OpenVINO", "fxqat QDQ on OpenVINO, ONNX form", "< 1"),
    ("fxqat INT8 torch / torch FP32", "fxqat INT8 torch", "torch FP32", "<= 0.33"),
)


def ratios_of(name: str, med: dict) -> list[dict]:
    """The :data:`SUMMARY` ratios of one model's medians; a ratio whose row is missing is left out (its note says
    why the row was skipped)."""
    return [{"model": name, "ratio": label, "value": med[n] / med[d], "target": target}
            for label, n, d, target in SUMMARY if n in med and d in med]


def run_model(a, spec: str, work: Path, size: int | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Build one model's rows, time them in interleaved rounds, measure size / peak memory: (rows, ratios, notes)."""
    rows, notes, info = build(a, work, spec, size)
    imgsz = info["imgsz"]
    times = interleaved_times({k: fn for k, (fn, _, _) in rows.items()}, torch.rand(1, 3, imgsz, imgsz),
                              a.rounds, engines={k: "onednn" for k in rows if "torch.ao" in k},
                              warmup=1 if a.quick else 2, reps=3 if a.quick else 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = []
    for row, (_, kind, path) in rows.items():
        size_mb = _size_mb(path, str(path).replace(".xml", ".bin") if str(path).endswith(".xml") else None) if path \
            else None
        mem = float("nan") if a.no_memory or kind is None else peak_memory_mb(kind, str(path), a.threads, imgsz)
        out.append({"model": info["name"], "task": info["task"], "imgsz": imgsz, "row": row, "ms": med[row],
                    "spread": spread(times[row]), "speedup_vs_fp32": med["torch FP32"] / med[row], "size_mb": size_mb,
                    "peak_rss_mb": mem, "rounds_ms": times[row]})
    return out, ratios_of(info["name"], med), notes


def wide_markdown(rows: list[dict]) -> str:
    """One markdown table, a row per deployment form and a column per model (median ms; empty: skipped)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    forms = list(dict.fromkeys(r["row"] for r in rows))
    ms = {(r["model"], r["row"]): r["ms"] for r in rows}
    size = {r["model"]: f"{r['model']} @{r['imgsz']}" for r in rows}
    out = [{"row": f, **{m: ms.get((m, f)) for m in models}} for f in forms]
    return markdown(out, ["row", *models], ["form (ms)", *(size[m] for m in models)], {m: "{:.1f}" for m in models})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolov8n",
                    help="comma-separated Ultralytics model names (YAML, random init) of any task, each optionally "
                         "NAME@SIZE, e.g. yolov8n,yolov8n-seg,yolov8n-cls@224")
    ap.add_argument("--imgsz", type=int, default=640, help="input size of detect / segment / pose / obb models")
    ap.add_argument("--cls-imgsz", type=int, default=224, help="input size of classify models (Ultralytics' default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default=None,
                    help="only the rows whose name contains one of these comma-separated words (case-insensitive), "
                         "e.g. 'openvino,fxqat int8'; torch FP32 is always timed")
    ap.add_argument("--calib", type=int, default=16, help="calibration images (PTQ of every row)")
    ap.add_argument("--fp32", default=None, help="FP32 Ultralytics .pt (default: --models YAMLs, random weights)")
    ap.add_argument("--data", default=None, help="data YAML for calibration images (default: generated signs)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-train", action="store_true", help="skip prepare time and the QAT step measurement")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 + 3 calls per row, --no-memory, --no-train")
    ap.add_argument("--end2end", action="store_true", help="end-to-end models (YOLO26, YOLOv10): every row on the "
                    "one-to-one path (top-k, no NMS), the form users deploy them in")
    ap.add_argument("--placement-ab", action="store_true",
                    help="also time the OpenVINO model exported in the ONNX form (requantized shared ops)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.no_memory, a.no_train = min(a.rounds, 3), True, True
    torch.set_num_threads(a.threads)
    specs = parse_models(a.models)
    if a.fp32:
        specs = specs[:1]
    rows, ratios, notes = [], [], []
    for spec, size in specs:
        work = Path(tempfile.mkdtemp(prefix="fxqat_bench_"))
        r, q, n = run_model(a, spec, work, size)
        rows += r
        ratios += q
        notes += [x for x in n if x not in notes]
        print(f"\n{r[0]['model']} ({r[0]['task']}) {r[0]['imgsz']}x{r[0]['imgsz']}, batch 1, {a.threads} threads; "
              f"median of {a.rounds} interleaved rounds, spread = interquartile range / median")
        print(table([{**x, "spread": f"{100 * x['spread']:.1f}%"} for x in r],
                    ["row", "ms", "spread", "speedup_vs_fp32", "size_mb", "peak_rss_mb"]), flush=True)
        for x in n:
            print("note:", x)
        shutil.rmtree(work, ignore_errors=True)
    print("\nratios (each model's rows timed in the same interleaved rounds):")
    print(table(ratios, ["model", "ratio", "value", "target"]))
    print("\n" + wide_markdown(rows))
    extra = {"imgsz": a.imgsz, "cls_imgsz": a.cls_imgsz, "threads": a.threads, "rounds": a.rounds, "notes": notes,
             "ratios": ratios}
    from fxqat.tracing import task_of

    detect = None if a.no_train else next((s for s, _ in specs if task_of(load_model(s, nc=10)) == "detect"), None)
    if not a.no_train and detect is None:
        notes.append("prepare time / QAT step: measured on a detect model only (v8DetectionLoss); none in --models")
    elif not a.no_train:
        t = time.perf_counter()
        fxqat.prepare_qat(load_model(detect))
        prep = time.perf_counter() - t
        steps = qat_step(detect, imgsz=320, threads=a.threads)
        ratio = steps["fxqat QAT"]["step_s"] / steps["FP32"]["step_s"]
        mem_ratio = steps["fxqat QAT"]["peak_rss_mb"] / steps["FP32"]["peak_rss_mb"]
        print(f"prepare_qat {detect}: {prep:.2f} s; QAT step / FP32 step (320, batch 8): {ratio:.2f}x time, "
              f"{mem_ratio:.2f}x peak RSS (target <= 1.3x)")
        extra.update(prepare_s=prep, qat_step=steps)
    for n in notes:
        print("note:", n)
    tasks = {r["task"] for r in rows}
    name = "deploy" if [s for s, _ in specs] == ["yolov8n.yaml"] else "deploy_tasks" if tasks - {"detect"} \
        else "deploy_models"
    print("saved", save(name, rows, extra))


if __name__ == "__main__":
    main()

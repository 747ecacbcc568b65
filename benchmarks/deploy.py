"""The deployment suite: one table per model, every row of a model timed in the same interleaved rounds.

Rows (640, batch 1, 2 threads, per model): torch FP32; ONNX Runtime FP32 and its INT8 PTQ (quantize_static, QDQ,
per-channel); OpenVINO FP32 and NNCF INT8 (MIXED preset, head arithmetic ignored); plain torch.ao INT8 (onednn);
fxqat INT8 torch; fxqat QDQ on ONNX Runtime (default and ``onnxruntime.yaml``) and on OpenVINO. Columns: median
latency over interleaved rounds (row order rotating each round) and its spread (interquartile range / median),
model file size, peak memory (RSS high-water mark of a child process that loads the model and runs 5 inferences).
Then per model the ratios the targets are stated in. Also (first model): prepare time and QAT step time / memory vs
an FP32 training step. Peers that are not installed are skipped with a note.

    python -m benchmarks [--models yolov8n,yolov8s,yolo11n,yolo11s] [--imgsz 640] [--rounds 5] [--quick] [--placement-ab]
                         [--fp32 best.pt] [--data data.yaml] [--no-memory] [--no-train]

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

from .common import save, table  # noqa: E402
from .peers import (  # noqa: E402
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


def build(args, work: Path, spec: str = "yolov8n.yaml") -> tuple[dict, list[str]]:
    """{row: (runner, kind, artifact path)} and notes for skipped peers, for one model (``args.fp32`` or ``spec``)."""
    notes: list[str] = []
    model = load_model(args.fp32 or spec, nc=None if args.fp32 else 10).eval()
    calib = _calib_images(args.data, args.imgsz)
    rows: dict[str, tuple] = {}
    fp32_pt = work / "fp32_model.pt"
    torch.save(model, fp32_pt)
    rows["torch FP32"] = (model, "torch", fp32_pt)
    fp32_onnx = export_fp32_onnx(model, work / "fp32.onnx", args.imgsz)
    rows["ONNX Runtime FP32"] = (OnnxRunner(fp32_onnx, threads=args.threads), "ort", fp32_onnx)
    ort_int8 = ort_quantize_static(fp32_onnx, work / "ort_int8.onnx", calib)
    rows["ONNX Runtime INT8 (quantize_static)"] = (OnnxRunner(ort_int8, threads=args.threads), "ort", ort_int8)
    has_ov = importlib.util.find_spec("openvino") is not None
    if has_ov:
        rows["OpenVINO FP32"] = (openvino_runner(fp32_onnx, args.threads), "openvino", fp32_onnx)
        if importlib.util.find_spec("nncf") is not None:
            xml = nncf_ptq(fp32_onnx, work / "nncf_int8.xml", calib)
            rows["OpenVINO NNCF INT8 (PTQ)"] = (openvino_runner(xml, args.threads), "openvino", xml)
        else:
            notes.append("NNCF not installed: NNCF INT8 row skipped (pip install nncf)")
    else:
        notes.append("OpenVINO not installed: OpenVINO rows skipped (pip install openvino nncf)")
    ao = plain_torch_ao_int8(model, "onednn", list(calib[:8, None]))
    rows["plain torch.ao INT8 (onednn)"] = (ao, None, None)
    qat = fxqat.prepare_qat(model)
    fxqat.calibrate(qat, [calib[i:i + 4] for i in range(0, len(calib), 4)], progress=False)
    qat.eval()
    int8 = fxqat.convert(qat)
    int8_pt = work / "fxqat_int8.pt"
    torch.save(int8, int8_pt)
    rows["fxqat INT8 torch"] = (int8, "torch", int8_pt)
    qdq = fxqat.export_onnx(qat, work / "fxqat_qdq.onnx", imgsz=args.imgsz)
    rows["fxqat QDQ on ONNX Runtime"] = (OnnxRunner(qdq, threads=args.threads), "ort", qdq)
    if has_ov:  # the OpenVINO form (fxqat export format=openvino): no requantization after shared ops
        qdq_ov = fxqat.export_onnx(qat, work / "fxqat_qdq_ov.onnx", imgsz=args.imgsz, requantize_shared=False)
        rows["fxqat QDQ on OpenVINO"] = (openvino_runner(qdq_ov, args.threads), "openvino", qdq_ov)
        if getattr(args, "placement_ab", False):
            rows["fxqat QDQ on OpenVINO, ONNX form"] = (openvino_runner(qdq, args.threads), "openvino", qdq)
    ortq = fxqat.prepare_qat(model, "onnxruntime.yaml")  # pre-activation grids: QLinearConv in ONNX Runtime
    fxqat.calibrate(ortq, [calib[i:i + 4] for i in range(0, len(calib), 4)], progress=False)
    qdq_ort = fxqat.export_onnx(ortq.eval(), work / "fxqat_qdq_ort.onnx", imgsz=args.imgsz)
    rows["fxqat QDQ [onnxruntime.yaml] on ONNX Runtime"] = (OnnxRunner(qdq_ort, threads=args.threads), "ort",
                                                            qdq_ort)
    return rows, notes


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
    ("ONNX Runtime: fxqat [onnxruntime.yaml] / quantize_static", "fxqat QDQ [onnxruntime.yaml] on ONNX Runtime",
     "ONNX Runtime INT8 (quantize_static)", "<= 0.8"),
    ("OpenVINO: fxqat QDQ / OpenVINO FP32", "fxqat QDQ on OpenVINO", "OpenVINO FP32", "<= 0.5 (stretch)"),
    ("OpenVINO: OpenVINO form / ONNX form", "fxqat QDQ on OpenVINO", "fxqat QDQ on OpenVINO, ONNX form", "< 1"),
    ("fxqat INT8 torch / torch FP32", "fxqat INT8 torch", "torch FP32", "<= 0.33"),
)


def run_model(a, spec: str, work: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Build one model's rows, time them in interleaved rounds, measure size / peak memory: (rows, ratios, notes)."""
    rows, notes = build(a, work, spec)
    times = interleaved_times({k: fn for k, (fn, _, _) in rows.items()}, torch.rand(1, 3, a.imgsz, a.imgsz),
                              a.rounds, engines={k: "onednn" for k in rows if "torch.ao" in k},
                              warmup=1 if a.quick else 2, reps=3 if a.quick else 5)
    med = {k: statistics.median(v) for k, v in times.items()}
    name = Path(a.fp32).stem if a.fp32 else Path(spec).stem
    out = []
    for row, (_, kind, path) in rows.items():
        size = _size_mb(path, str(path).replace(".xml", ".bin") if str(path).endswith(".xml") else None) if path else None
        mem = float("nan") if a.no_memory or kind is None else peak_memory_mb(kind, str(path), a.threads, a.imgsz)
        out.append({"model": name, "row": row, "ms": med[row], "spread": spread(times[row]),
                    "speedup_vs_fp32": med["torch FP32"] / med[row], "size_mb": size, "peak_rss_mb": mem,
                    "rounds_ms": times[row]})
    ratios = [{"model": name, "ratio": label, "value": med[n] / med[d], "target": target}
              for label, n, d, target in SUMMARY if n in med and d in med]
    return out, ratios, notes


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolov8n", help="comma-separated Ultralytics model names (YAML, random init)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", default=None, help="FP32 Ultralytics .pt (default: --models YAMLs, random weights)")
    ap.add_argument("--data", default=None, help="data YAML for calibration images (default: generated signs)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-train", action="store_true", help="skip prepare time and the QAT step measurement")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 + 3 calls per row, --no-memory, --no-train")
    ap.add_argument("--placement-ab", action="store_true",
                    help="also time the OpenVINO model exported in the ONNX form (requantized shared ops)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.no_memory, a.no_train = min(a.rounds, 3), True, True
    torch.set_num_threads(a.threads)
    specs = [m if m.endswith((".yaml", ".pt")) else f"{m}.yaml" for m in a.models.split(",") if m]
    if a.fp32:
        specs = specs[:1]
    rows, ratios, notes = [], [], []
    for spec in specs:
        work = Path(tempfile.mkdtemp(prefix="fxqat_bench_"))
        r, q, n = run_model(a, spec, work)
        rows += r
        ratios += q
        notes += [x for x in n if x not in notes]
        print(f"\n{r[0]['model']} {a.imgsz}x{a.imgsz}, batch 1, {a.threads} threads; median of {a.rounds} interleaved "
              "rounds, spread = interquartile range / median")
        print(table([{**x, "spread": f"{100 * x['spread']:.1f}%"} for x in r],
                    ["row", "ms", "spread", "speedup_vs_fp32", "size_mb", "peak_rss_mb"]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print("\nratios (each model's rows timed in the same interleaved rounds):")
    print(table(ratios, ["model", "ratio", "value", "target"]))
    extra = {"imgsz": a.imgsz, "threads": a.threads, "rounds": a.rounds, "notes": notes, "ratios": ratios}
    if not a.no_train:
        t = time.perf_counter()
        fxqat.prepare_qat(load_model(specs[0]))
        prep = time.perf_counter() - t
        steps = qat_step(specs[0], imgsz=320, threads=a.threads)
        ratio = steps["fxqat QAT"]["step_s"] / steps["FP32"]["step_s"]
        mem_ratio = steps["fxqat QAT"]["peak_rss_mb"] / steps["FP32"]["peak_rss_mb"]
        print(f"prepare_qat {specs[0]}: {prep:.2f} s; QAT step / FP32 step (320, batch 8): {ratio:.2f}x time, "
              f"{mem_ratio:.2f}x peak RSS (target <= 1.3x)")
        extra.update(prepare_s=prep, qat_step=steps)
    for n in notes:
        print("note:", n)
    print("saved", save("deploy" if specs == ["yolov8n.yaml"] else "deploy_models", rows, extra))


if __name__ == "__main__":
    main()

"""``fxqat bench``: latency of a model's deployable forms, all measured in one run with interleaved rounds."""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def interleaved_times(fns: dict, x: torch.Tensor, rounds: int, engines: dict | None = None, warmup: int = 2,
                      reps: int = 5) -> dict[str, list[float]]:
    """Per-round ms (each the median of ``reps`` calls after ``warmup`` calls) of each ``fns[name](x)`` over ``rounds``
    interleaved rounds, so machine noise hits every row alike; the row order rotates by one each round, so no row
    always runs right after the same neighbour.

    ``engines``: optional {name: torch.ao quantized engine} set before that row runs.
    """
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if engines and engines.get(name):
                    torch.backends.quantized.engine = engines[name]
                times[name].append(_time(lambda fn=fns[name]: fn(x), warmup, reps))
    return times


def spread(ts: list[float]) -> float:
    """Interquartile range over the median (0.1 = the middle half of the rounds spans 10 % of the median)."""
    if len(ts) < 2:
        return 0.0
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(ts)


def interleaved_medians(fns: dict, x: torch.Tensor, rounds: int, engines: dict | None = None) -> dict[str, float]:
    """Median ms of each row over interleaved rounds (:func:`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, x, rounds, engines).items()}


def forms(model, imgsz: int, threads: int, trust: bool | None = None) -> dict:
    """{label: callable} for an fxqat checkpoint (INT8 torch, QDQ ONNX) or an FP32 model (+ fxqat PTQ INT8)."""
    import fxqat
    from fxqat.checkpoint import is_checkpoint, load_checkpoint
    from fxqat.evaluate import OnnxRunner
    from fxqat.export import export_onnx
    from fxqat.models import load_model

    p = Path(str(model))
    out = {}
    if is_checkpoint(p):
        qat = load_checkpoint(p)
    else:
        fp32 = load_model(model, trust=trust).eval()
        out["FP32 eager (torch)"] = fp32
        qat = fxqat.prepare_qat(fp32)
        fxqat.calibrate(qat, [torch.rand(1, 3, imgsz, imgsz) for _ in range(2)], progress=False)  # latency only
    out["fxqat INT8 (torch, oneDNN)"] = fxqat.convert(qat.eval())
    onnx_path = Path(tempfile.mkdtemp()) / "model.onnx"
    export_onnx(qat, onnx_path, imgsz=imgsz)
    out["fxqat QDQ ONNX (ONNX Runtime)"] = OnnxRunner(onnx_path, threads=threads)
    if importlib.util.find_spec("openvino") is not None:
        from .deploy import OpenVINORunner

        ov_path = export_onnx(qat, onnx_path.with_name("model_openvino.onnx"), imgsz=imgsz, requantize_shared=False)
        out["fxqat QDQ (OpenVINO)"] = OpenVINORunner(ov_path, threads=threads)
    return out


def bench_model(model, imgsz: int = 640, threads: int = 2, rounds: int = 3, trust: bool | None = None) -> list[dict]:
    """``trust``: see :func:`fxqat.models.load_model` (fxqat checkpoints are always read weights-only)."""
    torch.set_num_threads(threads)
    fs = forms(model, imgsz, threads, trust)
    times = interleaved_times(fs, torch.rand(1, 3, imgsz, imgsz), rounds)
    rows = [{"form": k, "ms": statistics.median(v), "spread": spread(v)} for k, v in times.items()]
    base = rows[0]["ms"]
    print(f"{Path(str(model)).name} @ {imgsz}, batch 1, {threads} threads, median of {rounds} interleaved rounds "
          "(spread: interquartile range / median)")
    for r in rows:
        r["speedup"] = base / r["ms"]
        print(f"  {r['form']:<32} {r['ms']:8.1f} ms  ±{100 * r['spread']:4.1f}%   x{r['speedup']:.2f} vs first row")
    from . import native

    print(f"  INT8 torch convolutions: {native.summary()}")
    return rows

"""fxqat INT8 torch against FP32 eager, per model, in interleaved rounds; optionally where the time goes (issue 18).

Rows per model (random init, calibrated on generated sign images, 640, batch 1): torch FP32 eager; fxqat INT8
torch as it runs now (weights split per layer geometry, ``fxqat.modules.int8``; the image quantized inside the first
conv, ``QuantizeIntoConv``); and, where this CPU's u8×s8 kernels saturate, the same INT8 model as converted and run
before those two changes (a separate image Quantize; every layer whose weights exceed ±64 split, depthwise convs
included), for what they are worth in the same rounds. The outputs of the INT8 rows are compared bit for bit.

``--profile``: torch.profiler per-op shares (self CPU time) of FP32 and INT8, and the INT8 convs' share per kind
(dense split / dense unsplit / depthwise), median over ``--profile-runs`` calls. Shares are robust under load where
wall-clock times are not.

    python -m benchmarks.int8_torch [--models yolo11n,yolov8n] [--imgsz 640] [--threads 1] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.bench import interleaved_times, spread  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.modules.int8 import Int8ConvBnAct, cpu_has_vnni, u8s8_conv_saturates  # noqa: E402

from .common import machine, save, table  # noqa: E402
from .deploy import _calib_images  # noqa: E402

NOW, OLD, FP32 = "fxqat INT8 torch", "fxqat INT8 torch as before (issue 18)", "torch FP32 eager"


def convert_as_before(qat):
    """The INT8 model as ``fxqat.convert`` built it before issue 18: no QuantizeIntoConv, and (set on each conv)
    every layer whose weights exceed ±64 split, whatever its geometry."""
    import sys

    from fxqat.passes.int8_layout import QuantizeIntoConv
    from fxqat.passes.pipeline import convert_passes

    mod = sys.modules["fxqat.convert"]
    saved = mod.convert_passes
    mod.convert_passes = lambda: [p for p in convert_passes() if not isinstance(p, QuantizeIntoConv)]
    try:
        old = fxqat.convert(qat)
    finally:
        mod.convert_passes = saved
    for m in old.modules():
        if isinstance(m, Int8ConvBnAct):
            m.split_weights = bool(m.w_int8.to(torch.int16).abs().max() > 64)
    return old


def build(spec: str, imgsz: int) -> dict:
    model = load_model(f"{spec}.yaml", nc=10).eval()
    calib = _calib_images(None, imgsz, 8)
    qat = fxqat.prepare_qat(model)
    fxqat.calibrate(qat, [calib[i:i + 4] for i in range(0, len(calib), 4)], progress=False)
    rows = {FP32: model, NOW: fxqat.convert(qat.eval())}
    if u8s8_conv_saturates():
        rows[OLD] = convert_as_before(qat.eval())
    return rows


def _same(a, b) -> bool:
    """Bit-identical outputs, of any task (segment: predictions and prototypes)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def conv_kind(m: Int8ConvBnAct) -> str:
    depthwise = m.groups > 1 and m.w_int8.shape[1] == 1
    split = m._packed is not None and m._packed[2]
    return f"int8 conv: {'depthwise' if depthwise else 'dense'} {'split' if split else 'unsplit'}"


def profile(model, x, runs: int) -> tuple[list[dict], float]:
    """Per-op (and, for INT8 models, per conv kind) shares of self CPU time, ms per call."""
    from torch.profiler import ProfilerActivity, profile as prof, record_function

    def labelled(m, label):
        def fwd(t, _f=m.forward):
            with record_function(label):
                return _f(t)
        return fwd

    with torch.no_grad():
        model(x)
        convs = [m for m in model.modules() if isinstance(m, Int8ConvBnAct)]
        for m in convs:
            m.forward = labelled(m, conv_kind(m))
        try:
            with prof(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(runs):
                    model(x)
        finally:
            for m in convs:
                del m.forward
    events = p.key_averages()
    total = sum(e.self_cpu_time_total for e in events if not e.key.startswith("int8 conv"))
    rows = [{"op": e.key, "share": e.self_cpu_time_total / total, "ms": e.self_cpu_time_total / 1e3 / runs,
             "count": e.count // runs} for e in events if not e.key.startswith("int8 conv")]
    kinds = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.key.startswith("int8 conv"):
            kinds[e.key][0] += e.cpu_time_total
            kinds[e.key][1] += e.count // runs
    rows += [{"op": k, "share": t / total, "ms": t / 1e3 / runs, "count": c} for k, (t, c) in kinds.items()]
    return sorted(rows, key=lambda r: -r["share"]), total / 1e3 / runs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolo11n,yolov8n")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="per-op and per-conv-kind shares (torch.profiler)")
    ap.add_argument("--profile-runs", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    x = torch.rand(1, 3, a.imgsz, a.imgsz)
    print(f"CPU: {machine()['cpu']}; VNNI: {cpu_has_vnni()}; u8×s8 pair sums saturate (dense 3×3 / 1×1): "
          f"{u8s8_conv_saturates()}; load average at start: {os.getloadavg()[0]:.1f}")
    out, profiles = [], {}
    for spec in a.models.split(","):
        rows = build(spec, a.imgsz)
        with torch.no_grad():
            if OLD in rows:
                same = _same(rows[NOW](x), rows[OLD](x))
                print(f"{spec}: outputs of the two INT8 rows bit-identical: {same}")
        times = interleaved_times(rows, x, a.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in rows:
            out.append({"model": spec, "row": k, "ms": med[k], "spread": spread(times[k]),
                        "speedup_vs_fp32": med[FP32] / med[k]})
        print(f"\n{spec} {a.imgsz}x{a.imgsz}, batch 1, {a.threads} thread(s), median of {a.rounds} interleaved rounds; "
              f"load average now {os.getloadavg()[0]:.1f}")
        print(table([r for r in out if r["model"] == spec], ["row", "ms", "spread", "speedup_vs_fp32"]))
        if a.profile:
            for label in rows:
                prof_rows, total = profile(rows[label], x, a.profile_runs)
                profiles[f"{spec}: {label}"] = prof_rows
                print(f"\n{spec} {label}: self CPU {total:.1f} ms per call (profiled), top ops")
                print(table(prof_rows[:14], ["op", "share", "ms", "count"]))
    print("saved", save("int8_torch", out, {"imgsz": a.imgsz, "threads": a.threads, "rounds": a.rounds,
                                              "profiles": profiles}))


if __name__ == "__main__":
    main()

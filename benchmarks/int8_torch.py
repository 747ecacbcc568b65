"""fxqat INT8 torch against FP32 eager, per model, in interleaved rounds; optionally where the time goes (issue 18).

Rows per model (random init, calibrated on generated sign images, 640, batch 1): torch FP32 eager; fxqat INT8 torch
as it runs now (weights split per layer geometry, ``fxqat.modules.int8``; the image quantized inside the first conv,
``QuantizeIntoConv``; its convolutions through :mod:`fxqat.native`'s direct oneDNN primitives where that path is
available, stretches of them as one native call each, ``fxqat.modules.int8_chain``); the same model with one call
per node (chains off); the same model with fxqat.native off, every convolution through torch's ``onednn::qconv2d_pointwise``
and every residual add through ``quantized::add`` (when the direct path is available, so that the two can be
compared); and, where this CPU's u8×s8 kernels saturate, the same INT8 model as converted and run before those two
changes (a separate image Quantize; every layer whose weights exceed ±64 split, depthwise convs included), for what
they are worth in the same rounds. The outputs of the current and as-before rows are compared bit for bit (the
torch-op row may differ from the direct one by rare one-code roundings).

``--profile``: torch.profiler per-op shares (self CPU time) of FP32 and INT8, and the INT8 convs' share per kind
(dense split / dense unsplit / depthwise), median over ``--profile-runs`` calls. Shares are robust under load where
wall-clock times are not.

``--overhead``: where the INT8 model's time goes around its oneDNN kernels, per call: the wall time; the time inside
torch's convolution op (``onednn::qconv2d_pointwise``, torch.profiler self time); the time oneDNN reports executing
those convolutions (its verbose log, ``torch.backends.mkldnn.verbose``); hence each call's fixed cost around the
kernel, and the rest (other ops, Python); measured on the torch-op row, then the direct row's wall. With OpenVINO
and NNCF installed, NNCF's PTQ of the same network runs beside it: its convolution kernels' time and its other
layers' time (OpenVINO ``PERF_COUNT``), and its wall time. ``--end2end``: YOLO26 / YOLOv10 on their one-to-one
(top-k) path.

    python -m benchmarks.int8_torch [--models yolo11n,yolov8n] [--imgsz 640] [--threads 1] [--rounds 5] [--profile]
                                    [--overhead] [--end2end]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.bench import _time, interleaved_times, spread  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat import native  # noqa: E402
from fxqat.modules.int8 import Int8Add, Int8ConvBnAct, cpu_has_vnni, u8s8_conv_saturates  # noqa: E402

from .common import machine, save, table  # noqa: E402
from .deploy import _calib_images  # noqa: E402

NOW, OLD, FP32 = "fxqat INT8 torch", "fxqat INT8 torch as before (issue 18)", "torch FP32 eager"
TORCH_OP = "fxqat INT8 torch, torch's qconv op (fxqat.native off)"
NO_CHAINS = "fxqat INT8 torch, one call per node (no chains)"


class OneCallPerNode(torch.nn.Module):
    """The same INT8 model, run with ``fxqat.modules.int8_chain.CHAINS`` off: each conv and add makes its own call
    from Python, as before chains (the same primitives: the outputs are equal bit for bit)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from fxqat.modules.int8_chain import one_call_per_node

        with one_call_per_node():
            return self.model(x)


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


def build(spec: str, imgsz: int, end2end: bool = False) -> dict:
    model = load_model(f"{spec}.yaml", nc=10).eval()
    if end2end:
        from fxqat.modules.e2e import has_one2one

        if not has_one2one(model.model[-1]):
            raise SystemExit(f"--end2end: {spec} has no end-to-end (one-to-one) head")
        model.end2end = True  # the one-to-one (top-k) path, as deployed
    calib = _calib_images(None, imgsz, 8)
    qat = fxqat.prepare_qat(model)
    fxqat.calibrate(qat, [calib[i:i + 4] for i in range(0, len(calib), 4)], progress=False)
    rows = {FP32: model, NOW: fxqat.convert(qat.eval())}
    if native.library() is not None:  # the same INT8 model with every conv through torch's op, for comparison
        rows[NO_CHAINS] = OneCallPerNode(rows[NOW])
        rows[TORCH_OP] = torch_op_copy(rows[NOW], imgsz)
    if u8s8_conv_saturates():
        rows[OLD] = convert_as_before(qat.eval())
    return rows


def torch_op_copy(int8_model, imgsz: int):
    """A copy of an INT8 model whose convolutions and adds run torch's ops (not :mod:`fxqat.native`'s direct
    primitives): each layer picks its path at its first call, made here with the direct path off."""
    import copy

    m = copy.deepcopy(int8_model)  # deepcopy drops each layer's packed state
    native.ENABLED = False
    try:
        with torch.no_grad():
            m(torch.rand(1, 3, imgsz, imgsz))
    finally:
        native.ENABLED = True
    assert not any(getattr(c, "runs_direct", False) for c in m.modules())
    assert not any(isinstance(c, Int8Add) and c._prim is not None and c._prim[1] is not None for c in m.modules())
    return m


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


def _onednn_log(fn) -> list[str]:
    """oneDNN's verbose lines (``exec`` records) printed while ``fn()`` runs, read back from file descriptor 1."""
    import sys
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        return [line for line in f.read().splitlines() if ",exec,cpu,convolution," in line]


def wall_ms(model, x, runs: int) -> float:
    """Median ms per call after 3 warm-up calls."""
    with torch.no_grad():
        return _time(lambda: model(x), warmup=3, reps=runs)


def overhead(model, x, runs: int) -> dict:
    """ms per call: wall, inside torch's conv op, oneDNN's convolution kernels; µs of fixed cost per conv call. For a
    model whose convolutions run torch's op (:func:`torch_op_copy`): oneDNN's log here is torch's."""
    from torch.profiler import ProfilerActivity, profile as prof

    wall = wall_ms(model, x, runs)
    with torch.no_grad():
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(runs):
                model(x)
        log = _onednn_log(lambda: [model(x) for _ in range(runs)])
    ops = [e for e in p.key_averages() if e.key == "onednn::qconv2d_pointwise"]
    calls = ops[0].count // runs if ops else 0
    op_ms = ops[0].self_cpu_time_total / 1e3 / runs if ops else 0.0
    kernel_ms = sum(float(line.rsplit(",", 1)[1]) for line in log) / runs
    return {"wall_ms": wall, "conv_calls": calls, "conv_op_ms": op_ms, "conv_kernel_ms": kernel_ms,
            "fixed_us_per_conv": (op_ms - kernel_ms) * 1e3 / max(calls, 1), "rest_ms": wall - op_ms}


def nncf_overhead(model, x, runs: int, threads: int) -> dict | None:
    """NNCF's PTQ of the same network on OpenVINO, ms per call: wall, its convolution kernels and all its other
    layers (PERF_COUNT); None when OpenVINO / NNCF are not installed. Compiled as the deploy suite's NNCF row is
    (the runtime's default float precision), not as :func:`fxqat.diagnose.diagnose` pins it (f32)."""
    import importlib.util
    import tempfile
    from pathlib import Path

    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        return None
    import openvino as ov

    from .peers import export_fp32_onnx, nncf_ptq

    imgsz = x.shape[-1]
    with tempfile.TemporaryDirectory() as d:
        xml = nncf_ptq(export_fp32_onnx(model, Path(d) / "fp32.onnx", imgsz), Path(d) / "nncf.xml",
                       _calib_images(None, imgsz, 8))
        compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                             "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    req, xn = compiled.create_infer_request(), x.numpy()
    for _ in range(3):
        req.infer({0: xn})
    walls, convs, others = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        req.infer({0: xn})
        walls.append(time.perf_counter() - t)
        layers = [c for c in req.get_profiling_info() if c.status.name == "EXECUTED"]
        conv = [c.real_time.total_seconds() for c in layers if c.node_type in ("Convolution", "GroupConvolution")]
        convs.append(sum(conv))
        others.append(sum(c.real_time.total_seconds() for c in layers) - sum(conv))
    return {"wall_ms": statistics.median(walls) * 1e3, "conv_kernel_ms": statistics.median(convs) * 1e3,
            "other_layers_ms": statistics.median(others) * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="yolo11n,yolov8n")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="per-op and per-conv-kind shares (torch.profiler)")
    ap.add_argument("--profile-runs", type=int, default=3)
    ap.add_argument("--overhead", action="store_true",
                    help="wall vs conv op vs oneDNN kernel time per call, and NNCF's convolution kernels beside it")
    ap.add_argument("--overhead-runs", type=int, default=10)
    ap.add_argument("--end2end", action="store_true", help="YOLO26 / YOLOv10 on the one-to-one (top-k) path")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    x = torch.rand(1, 3, a.imgsz, a.imgsz)
    print(f"CPU: {machine()['cpu']}; VNNI: {cpu_has_vnni()}; u8×s8 pair sums saturate (dense 3×3 / 1×1): "
          f"{u8s8_conv_saturates()}; load average at start: {os.getloadavg()[0]:.1f}")
    out, profiles, overheads = [], {}, {}
    for spec in a.models.split(","):
        rows = build(spec, a.imgsz, a.end2end)
        with torch.no_grad():
            for other in (OLD, NO_CHAINS):
                if other in rows:
                    print(f"{spec}: outputs of {NOW!r} and {other!r} bit-identical: "
                          f"{_same(rows[NOW](x), rows[other](x))}")
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
        if a.overhead:
            ov = overhead(rows.get(TORCH_OP, rows[NOW]), x, a.overhead_runs)
            peer = nncf_overhead(rows[FP32], x, a.overhead_runs, a.threads)
            overheads[spec] = {"fxqat INT8 torch": ov, "NNCF PTQ on OpenVINO": peer}
            print(f"\n{spec} fxqat INT8 torch, ms per call (median of {a.overhead_runs}): wall {ov['wall_ms']:.2f}; "
                  f"{ov['conv_calls']} convs: inside torch's op {ov['conv_op_ms']:.2f}, oneDNN kernels "
                  f"{ov['conv_kernel_ms']:.2f} (fixed cost {ov['fixed_us_per_conv']:.1f} µs per call); other ops and "
                  f"Python {ov['rest_ms']:.2f}")
            if TORCH_OP in rows:
                print(f"{spec} fxqat INT8 torch with fxqat.native's direct convolutions: wall "
                      f"{wall_ms(rows[NOW], x, a.overhead_runs):.2f} ms")
            if peer:
                print(f"{spec} NNCF PTQ on OpenVINO: wall {peer['wall_ms']:.2f} ms; convolution kernels "
                      f"{peer['conv_kernel_ms']:.2f} (without SiLU, which OpenVINO runs in separate fused layers), "
                      f"all other layers {peer['other_layers_ms']:.2f}")
    print("saved", save("int8_torch", out, {"imgsz": a.imgsz, "threads": a.threads, "rounds": a.rounds,
                                              "profiles": profiles, "overheads": overheads}))


if __name__ == "__main__":
    main()

"""QAT training step vs FP32 training step: time and peak memory, yolov8n, every row measured in the same run.

Rows: the FP32 Ultralytics ``DetectionModel``; fxqat's QAT graph as it was (torch.ao's observer calls,
``fake_quant.FAST_OBSERVE = False``; BN rescale on the conv output, ``ConvBnAct.RESCALE_WEIGHT = False``); with the
fast observers; with the fast observers and the weight-side rescale; with those and the quantize/dequantize
fake-quant kernel (``fake_quant.FAST_KERNEL``); with those and the straight-through mask reduced to the sides the
batch clips on (``fast_fq.MASK_SHORTCUT``); with those and values and mask in one pass of fxqat.native's fused
kernel (``fast_fq.NATIVE``); with those and the weights' per-channel fake-quant in fxqat.native
(``fast_fq.NATIVE_CHANNEL``); with those and each observer's update and qparams in one native call
(``fake_quant.NATIVE_OBSERVE``); with those and the backward's masked gradient in fxqat.native
(``fast_fq.NATIVE_GRAD``); with those and the BN-folded weight's multiply, observer, fake-quant and divide (and
their backward) in one native pass (``folded_fq.NATIVE_FOLD``, today's default); the default with every observer
frozen after calibration (``fxqat qat ... freeze_observers=0``: fixed ranges, as ModelOpt trains); Ultralytics' own QAT
(``quantize=8``: NVIDIA ModelOpt fake-quant) when ``modelopt`` is importable, else a note.
One step = zero_grad, forward, Ultralytics' detection loss, backward, SGD step, on a fixed random batch, starting
from the shipped FP32 yolov8n (``--model``: another shipped model, checkpoint or YAML).

Time: rounds are interleaved (each round runs every row's steps in turn) so machine noise hits every row alike;
reported: median over rounds of each round's median step, and the spread (min–max of the round medians).
Peak memory: on CPU the peak RSS (VmHWM) of a child process that builds the row and runs 2 steps; on CUDA
``torch.cuda.max_memory_allocated`` in this process, reset before each row.

    python -m benchmarks.qat_step [--sizes 320,640] [--batches 8,16] [--rounds 3] [--steps 2] [--threads 2]
                                  [--device cpu|cuda] [--no-memory] [--rows WORDS] [--model NAME]

``--rows``: only the rows whose name contains one of the comma-separated words (the FP32 row always runs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
import fxqat.quant.fake_quant as fqmod  # noqa: E402
from fxqat.quant import fast_fq, folded_fq  # noqa: E402
from fxqat.quant.fake_quant import set_observers  # noqa: E402
from fxqat.data.toy import toy_batch  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.modules.conv_bn_act import ConvBnAct  # noqa: E402

from .common import machine, save, table  # noqa: E402

FP32 = "FP32 (Ultralytics DetectionModel)"
REF = "fxqat QAT before (torch.ao observer calls, conv output / f)"
FAST = "fxqat QAT + fast observers"
RESCALE = "fxqat QAT + fast observers + weight-side BN rescale"
KERNEL = "fxqat QAT + the above + quantize/dequantize fake-quant kernel"
MASK = "fxqat QAT + the above + mask only where the batch clips"
NATIVE = "fxqat QAT + the above + one-pass native fake-quant kernel"
CHANNEL = "fxqat QAT + the above + native per-channel weight fake-quant"
OBSERVE = "fxqat QAT + the above + one-call native observer update"
GRAD = "fxqat QAT + the above + native masked gradient"
FOLD = "fxqat QAT + the above + BN-folded weight in one native pass (default)"
FROZEN = "fxqat QAT (default), observers frozen after calibration (fixed ranges, as ModelOpt)"
ULTRA = "Ultralytics QAT (quantize=8, ModelOpt)"
# QAT fine-tunes a trained model: every row starts from the shipped FP32 yolov8n (trained by fxqat on its signs data).
# From random init the quantized network's gradients explode (1e9 against FP32's 10 at 320 x 8: activations collapse
# onto few codes and BatchNorm amplifies them), so its rows would time a diverging run.
MODEL = "fxqat-signs-yolov8n"
# row → (fast observers, weight-side rescale, quantize/dequantize fake-quant kernel, mask shortcut, native kernel,
# native per-channel kernel, native observer, native masked gradient, native folded weight): each change measured on
# its own, the row's changes and every earlier one on
ORDER = (REF, FAST, RESCALE, KERNEL, MASK, NATIVE, CHANNEL, OBSERVE, GRAD, FOLD)
TOGGLES = {row: (True,) * i + (False,) * (len(ORDER) - 1 - i) for i, row in enumerate(ORDER)}
DEFAULTS = TOGGLES[FOLD]


def _set(toggles) -> None:
    (fqmod.FAST_OBSERVE, ConvBnAct.RESCALE_WEIGHT, fqmod.FAST_KERNEL, fast_fq.MASK_SHORTCUT, fast_fq.NATIVE,
     fast_fq.NATIVE_CHANNEL, fqmod.NATIVE_OBSERVE, fast_fq.NATIVE_GRAD, folded_fq.NATIVE_FOLD) = toggles


def _ultralytics_qat(det, x):
    """Ultralytics' own QAT preparation (``trainer.args.quantize == 8``): ModelOpt INT8 fake-quant, calibrated on
    the batch. None when ModelOpt is not installed."""
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        return None
    from ultralytics.utils.torch_utils import prepare_qat

    return prepare_qat(det, [x], lambda b: b, batches=1)


def build(row: str, imgsz: int, batch: int, device: str, model: str = MODEL):
    """(model, loss function, step inputs) for one row; None when the row's backend is not installed."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    torch.manual_seed(0)
    det = load_model(model, nc=10) if model.endswith(".yaml") else load_model(model)
    det.args = get_cfg()
    crit = v8DetectionLoss(det)
    x, tgt = toy_batch(batch, imgsz, seed=0)
    tgt["cls"] = tgt["cls"] % len(det.names)
    if row == FP32:
        m = det
    elif row == ULTRA:
        m = _ultralytics_qat(det, x)
        if m is None:
            return None
    else:
        m = fxqat.prepare_qat(det, example_inputs=(x,))
        fxqat.calibrate(m, [x], progress=False)
        if row == FROZEN:
            set_observers(m, False)  # what fxqat qat ... freeze_observers=0 trains with
    m = m.to(device).train()
    crit = v8DetectionLoss(det) if row != FP32 else crit
    tgt = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tgt.items()}
    return m, crit, x.to(device), tgt


def _step(m, crit, x, tgt, opt, row):
    _set(TOGGLES.get(row, DEFAULTS))
    opt.zero_grad(set_to_none=True)
    loss, _ = crit(m(x), tgt)
    loss.sum().backward()
    opt.step()


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _mem_child(row, imgsz, batch, threads, model, q):
    torch.set_num_threads(threads)
    built = build(row, imgsz, batch, "cpu", model)
    if built is None:
        q.put(float("nan"))
        return
    m, crit, x, tgt = built
    opt = torch.optim.SGD(m.parameters(), lr=1e-4)
    for _ in range(2):
        _step(m, crit, x, tgt, opt, row)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    q.put(hwm / 1024)


def peak_rss_mb(row, imgsz, batch, threads, model=MODEL) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_mem_child, args=(row, imgsz, batch, threads, model, q))
    p.start()
    p.join(1800)
    return q.get() if not q.empty() else float("nan")


def measure(imgsz, batch, rounds, steps, device, memory, threads, words=None, model=MODEL):
    rows, notes = {}, []
    for row in (FP32, *ORDER, FROZEN, ULTRA):
        if words and row != FP32 and not any(w in row for w in words):
            continue
        built = build(row, imgsz, batch, device, model)
        if built is None:
            notes.append(f"{ULTRA}: not measured, nvidia-modelopt is not installed (Ultralytics 8.4.190 has the "
                         "quantize=8 path; it needs pip install nvidia-modelopt huggingface_hub)")
            continue
        m, crit, x, tgt = built
        rows[row] = (m, crit, x, tgt, torch.optim.SGD(m.parameters(), lr=1e-4))
    times = {k: [] for k in rows}
    for k, (m, crit, x, tgt, opt) in rows.items():  # warm-up step per row
        _step(m, crit, x, tgt, opt, k)
    for _ in range(rounds):
        for k, (m, crit, x, tgt, opt) in rows.items():
            ts = []
            for _ in range(steps):
                _sync(device)
                t = time.perf_counter()
                _step(m, crit, x, tgt, opt, k)
                _sync(device)
                ts.append(time.perf_counter() - t)
            times[k].append(statistics.median(ts))
    mem = {}
    for k, (m, crit, x, tgt, opt) in rows.items():
        if not memory:
            mem[k] = float("nan")
        elif device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            _step(m, crit, x, tgt, opt, k)
            mem[k] = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem[k] = peak_rss_mb(k, imgsz, batch, threads, model)
    _set(DEFAULTS)
    base_t, base_m = statistics.median(times[FP32]), mem[FP32]
    out = []
    for k, ts in times.items():
        med = statistics.median(ts)
        out.append({"imgsz": imgsz, "batch": batch, "device": device, "row": k, "step_s": med,
                    "spread_s": f"{min(ts):.3f}–{max(ts):.3f}", "vs_fp32_time": med / base_t,
                    "peak_mb": mem[k], "vs_fp32_mem": mem[k] / base_m if base_m == base_m else float("nan")})
    return out, notes


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="320,640")
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--rows", default="", help="only rows whose name contains one of these comma-separated words")
    ap.add_argument("--model", default=MODEL, help="the FP32 starting point: a shipped model's name or checkpoint, or "
                    "a YAML (random init, nc=10)")
    a = ap.parse_args(argv)
    words = [w for w in a.rows.split(",") if w]
    torch.set_num_threads(a.threads)
    allrows, notes = [], []
    for imgsz in (int(s) for s in a.sizes.split(",")):
        for batch in (int(b) for b in a.batches.split(",")):
            rows, n = measure(imgsz, batch, a.rounds, a.steps, a.device, not a.no_memory, a.threads, words, a.model)
            allrows += rows
            notes += [x for x in n if x not in notes]
            print(table(rows, ["imgsz", "batch", "row", "step_s", "spread_s", "vs_fp32_time", "peak_mb",
                               "vs_fp32_mem"]), flush=True)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else machine()["cpu"]
    print(f"\n{a.model} train step on {a.device} ({dev}), {a.threads} threads; median of {a.rounds} interleaved "
          f"rounds x {a.steps} steps")
    print(table(allrows, ["imgsz", "batch", "row", "step_s", "spread_s", "vs_fp32_time", "peak_mb", "vs_fp32_mem"]))
    for n in notes:
        print("note:", n)
    print("saved", save(f"qat_step_{a.device.split(':')[0]}", allrows, {"threads": a.threads, "rounds": a.rounds,
                                                                        "steps": a.steps, "model": a.model,
                                                                        "notes": notes}))


if __name__ == "__main__":
    main()

"""yolov8n INT8 latency on CPU, all rows in one run (batch 1, 640, 2 threads), ratios against peers.

Rows: Ultralytics FP32 eager (as built, and with Conv+BN fused as ``YOLO.predict`` runs it), plain torch.ao FX
INT8 (default qconfig mapping on fxqat's trace) with its x86 and onednn engines, fxqat INT8 (oneDNN fused
Conv+BN+SiLU kernels). Rounds are interleaved so machine noise hits every
row alike. Targets (issue 3): fxqat ≤ 0.7× the fastest plain torch.ao engine, ≥ 4× faster than FP32.
On a CPU without VNNI fxqat's convs run split weights (exact, ~2x the multiply-adds: see ``fxqat.modules.int8``);
a last row then times the unsplit kernels, whose outputs are wrong there, for what exactness costs.

    python -m benchmarks.latency [--imgsz 640] [--rounds 5] [--threads 2] [--no-trim]

``--no-trim`` sets glibc's malloc to keep freed memory (``mallopt``: no heap trimming, no per-buffer ``mmap``) for
every row before any model is built. With glibc's defaults the FP32 model takes ~12 000 minor page faults per
forward here (its activation buffers go back to the OS after each call), plain torch.ao 3 500-4 100 (float SiLU
islands), fxqat INT8 (uint8 end to end) about none.
"""

from __future__ import annotations

import argparse
import copy
import os

os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402

import fxqat  # noqa: E402
from fxqat.models import load_model  # noqa: E402
from fxqat.modules.int8 import Int8ConvBnAct, cpu_has_vnni, u8s8_conv_saturates  # noqa: E402

from .common import interleaved_medians, machine, save, table  # noqa: E402
from .peers import plain_torch_ao_int8  # noqa: E402


def keep_freed_memory() -> None:
    """glibc ``mallopt``: never trim the heap, serve buffers under 256 MB from it (no fresh, zeroed pages)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 256 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise RuntimeError("mallopt failed: --no-trim needs glibc")


def build_rows(imgsz: int):
    model = load_model("yolov8n.yaml", nc=10).eval()
    calib = [torch.rand(1, 3, imgsz, imgsz) for _ in range(4)]
    rows = {"torch FP32 eager": (model, None),
            "torch FP32 eager, Conv+BN fused": (copy.deepcopy(model).fuse(verbose=False), None)}  # as YOLO.predict
    for engine in ("x86", "onednn"):
        rows[f"plain torch.ao INT8 ({engine})"] = (plain_torch_ao_int8(model, engine, calib), engine)
    qat = fxqat.prepare_qat(model)
    fxqat.calibrate(qat, calib, progress=False)
    rows["fxqat INT8 (onednn fused)"] = (fxqat.convert(qat), "onednn")
    if u8s8_conv_saturates():  # what exactness costs here: the same model on the saturating kernels
        unsplit = copy.deepcopy(rows["fxqat INT8 (onednn fused)"][0])
        for m in unsplit.modules():
            if isinstance(m, Int8ConvBnAct):
                m.split_weights = False
        rows["fxqat INT8 unsplit (wrong without VNNI)"] = (unsplit, "onednn")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-trim", action="store_true", help="glibc malloc keeps freed memory, for every row")
    a = ap.parse_args(argv)
    if a.no_trim:
        keep_freed_memory()
    torch.set_num_threads(a.threads)
    rows = build_rows(a.imgsz)
    med = interleaved_medians({k: m for k, (m, _) in rows.items()}, torch.rand(1, 3, a.imgsz, a.imgsz), a.rounds,
                              engines={k: e for k, (_, e) in rows.items()})
    fp32 = med["torch FP32 eager"]
    best_plain = min(v for k, v in med.items() if k.startswith("plain"))
    out = [{"model": k, "ms": v, "vs_fp32": fp32 / v, "vs_best_plain_ao": v / best_plain} for k, v in med.items()]
    print(f"yolov8n {a.imgsz}x{a.imgsz}, batch 1, {a.threads} threads, median of {a.rounds} interleaved rounds, "
          f"malloc {'keeping freed memory (--no-trim)' if a.no_trim else 'glibc defaults'}")
    print(f"CPU: {machine()['cpu']}; VNNI: {cpu_has_vnni()}; fxqat INT8 convs: "
          f"{'split weights (u8×s8 pair sums saturate here)' if u8s8_conv_saturates() else 'unsplit'}")
    print(table(out, ["model", "ms", "vs_fp32", "vs_best_plain_ao"]))
    f = med["fxqat INT8 (onednn fused)"]
    print(f"fxqat / fastest plain torch.ao = {f / best_plain:.2f} (target <= 0.70); "
          f"speed-up over FP32 = {fp32 / f:.2f}x (target >= 4; "
          f"{med['torch FP32 eager, Conv+BN fused'] / f:.2f}x over the BN-fused FP32 model)")
    print("saved", save("latency_no_trim" if a.no_trim else "latency", out,
                        {"imgsz": a.imgsz, "threads": a.threads, "no_trim": a.no_trim}))


if __name__ == "__main__":
    main()

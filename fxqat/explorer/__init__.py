"""The quantization explorer: one self-contained interactive HTML page per QAT graph.

    fxqat explore MODEL_OR_CKPT [data=...] [out=explore.html] [imgsz=320] [images=8] [analysis=DIR] [qconfig=...]

The page shows the graph (Ultralytics layers collapsed, click to open), and per node: op, module path, role, the
qconfig rule that set it (file:line), its quantizers' scales / zero points / observed range, FP32 vs fake-quant
histograms of its weights and output on a few calibration images, SQNR, and the sensitivity rank when ``fxqat
analyze`` results are given. Nodes can be searched, coloured by precision, sensitivity or SQNR, selected, and turned
into a qconfig YAML that raises or skips them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FxqatError
from .build import DEFAULT_IMAGES, analysis_by_node, collect, load_analysis, load_images_for, prepare_for
from .page import embedded_data, render, write

COLOR_MODES = ("precision", "sensitivity", "sqnr", "op")


def _check(imgsz, images, color_by) -> None:
    if not isinstance(imgsz, int) or isinstance(imgsz, bool) or imgsz < 32 or imgsz % 32:
        raise FxqatError(f"imgsz={imgsz!r}: must be a positive multiple of 32 (the model's largest stride), e.g. 320")
    if not isinstance(images, int) or isinstance(images, bool) or images < 1:
        raise FxqatError(f"images={images!r}: the number of calibration images, at least 1")
    if color_by not in COLOR_MODES:
        raise FxqatError(f"color_by={color_by!r}: valid choices are {', '.join(COLOR_MODES)}")


def explore(model, out="explore.html", data=None, imgsz: int = 320, images: int = DEFAULT_IMAGES, analysis=None,
            qconfig=None, color_by: str = "precision", trust: bool | None = None, progress: bool = True) -> Path:
    """Write the explorer page for ``model`` to ``out`` and return its path.

    ``model``: a model file (YAML, .pt), an fxqat QAT checkpoint (its trained ranges are shown as they are), a
    DetectionModel, or a prepared QAT GraphModule (calibrated in place if it has no ranges yet). Without ranges, the
    graph is calibrated on ``images`` images of
    ``data`` (a data YAML, an image folder or a tensor) — or, with no ``data``, of fxqat's built-in traffic-sign
    generator (the page says so). ``analysis``: a ``fxqat analyze`` folder or its sensitivity.json (SQNR per layer
    and sensitivity rank). ``qconfig``: as for :func:`fxqat.prepare_qat` (not with a checkpoint).
    """
    import time

    from ..calibrate import calibrate
    from .build import _needs_calibration

    _check(imgsz, images, color_by)
    if color_by == "sensitivity" and analysis is None:
        raise FxqatError("color_by='sensitivity' needs analysis= (a `fxqat analyze` folder or its sensitivity.json)")
    t = time.perf_counter()
    report = load_analysis(analysis)  # bad analysis= and data= fail before any model work ...
    x, note = load_images_for(data, images, imgsz)
    gm, text, label, from_ckpt = prepare_for(model, qconfig, trust)
    if report is not None:  # ... and an analysis of another model before calibration
        analysis_by_node(report, {n.name for n in gm.graph.nodes})
    if _needs_calibration(gm):
        batches = [x[i:i + 8] for i in range(0, len(x), 8)]
        calibrate(gm, batches, batches=len(batches), progress=progress)
        note = f"calibrated on {note}; histograms from the same images"
    else:
        note = f"ranges as stored{' in the checkpoint' if from_ckpt else ''}; histograms from {note}"
    title = f"fxqat explore — {Path(label).name if isinstance(model, (str, Path)) else label}"
    data_ = collect(gm, x, note, analysis=report, qconfig_text=text, title=title, progress=progress,
                    source_label=f"{Path(label).name}[qconfig]" if from_ckpt else None, color_by=color_by)
    data_["seconds"] = round(time.perf_counter() - t, 2)
    data_["imgsz"] = imgsz
    return write(data_, out)


def write_page(gm, path, color_by: str = "precision", sensitivity=None, expand=(), title: str | None = None,
               imgsz=320) -> Path:
    """The explorer page of ``gm`` as it is (traced or prepared) without running it: structure, rules, quantizer
    state; no histograms (``fxqat.explore`` adds them). What ``fxqat.draw(gm, "x.html")`` writes."""
    if color_by not in COLOR_MODES:
        raise FxqatError(f"color_by={color_by!r}: valid choices are {', '.join(COLOR_MODES)}")
    data = collect(gm, None, "no images run: histograms and SQNR come with fxqat explore / fxqat.explore(...)",
                   analysis=sensitivity, title=title or "fxqat graph", progress=False, color_by=color_by,
                   expand=expand, imgsz=imgsz)
    return write(data, path)


__all__ = ["explore", "write_page", "render", "embedded_data", "COLOR_MODES"]

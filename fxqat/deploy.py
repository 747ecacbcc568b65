"""Exports that load wherever Ultralytics exports load: ``YOLO(path).predict / .val / .track``.

* :func:`yolo_metadata` / :func:`add_onnx_metadata` — the metadata Ultralytics' exporter writes (``stride`` an int,
  ``imgsz``, ``names``, ``args``, ``task``, ``head``, ...), which its ``AutoBackend`` parses back; plus
  ``producer: fxqat``.
* :func:`export_openvino` — Ultralytics' OpenVINO layout: ``<name>_int8_openvino_model/<name>.xml|.bin`` and
  ``metadata.yaml`` (:func:`to_openvino` still writes a bare ``.xml`` / ``.bin`` pair).
* :func:`as_yolo` — the INT8 torch model (or a QAT checkpoint / graph, converted) as an ``ultralytics.YOLO`` object.

TorchScript is refused (:data:`TORCHSCRIPT_UNSUPPORTED`): ``torch.jit.trace`` cannot record the INT8 model's oneDNN
convolutions — the packed weight they take is an opaque MKLDNN tensor ("RuntimeError: Unsupported value kind: Tensor"),
and packing inside the trace fails on ``qconv_prepack``'s arguments ("unsupported input list type: Scalar?").
"""

from __future__ import annotations

import ast
import json
import os
from datetime import datetime
from pathlib import Path

import torch
import torch.nn as nn

from .errors import FxqatError, ModelLoadError
from .evaluate import BatchRunner

os.environ.setdefault("YOLO_OFFLINE", "1")

TASK = "detect"
OPENVINO_SUFFIX = "_int8_openvino_model"
TORCHSCRIPT_UNSUPPORTED = (
    "format=torchscript is not supported: the INT8 model runs oneDNN convolutions on prepacked weights (opaque MKLDNN "
    "tensors) that torch.jit.trace cannot record; deploy with format=onnx or format=openvino, or run the INT8 torch "
    "model in-process with fxqat.deploy.as_yolo(CKPT)")
# Ultralytics' export arguments per format (exporter.export_formats()["Arguments"]) that mean something here
_ARG_KEYS = {"onnx": ("batch", "dynamic", "quantize", "opset", "simplify", "nms"),
             "openvino": ("batch", "dynamic", "quantize", "nms")}


# ------------------------------------------------------------------------------------------------------- metadata
def _head_name(yaml: dict) -> str:
    try:
        return str(yaml["head"][-1][2])  # [from, repeats, module, args]
    except (KeyError, IndexError, TypeError):
        return "Detect"


def yolo_metadata(meta: dict, imgsz, batch: int = 1, dynamic: bool = False, fmt: str = "onnx",
                  opset: int | None = None) -> dict:
    """The metadata dict Ultralytics' exporter writes (``Exporter.metadata``), native types, for a model whose fxqat
    ``meta`` (names, stride, yaml) is given; ``producer`` and ``fxqat_version`` say who wrote it."""
    import ultralytics

    from . import __version__

    if fmt not in _ARG_KEYS:
        raise FxqatError(f"format={fmt}: valid choices: {', '.join(_ARG_KEYS)}")
    yaml = meta.get("yaml") or {}
    pretty = Path(str(yaml.get("yaml_file") or "yolo")).stem.replace("yolo", "YOLO")
    stride = meta.get("stride")
    stride = 32 if stride is None else int(max(torch.as_tensor(stride).reshape(-1).tolist()))
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))
    names = {int(k): str(v) for k, v in (meta.get("names") or {}).items()}
    if not names and meta.get("nc"):
        names = {i: str(i) for i in range(int(meta["nc"]))}
    args = {"batch": int(batch), "dynamic": bool(dynamic), "quantize": 8, "opset": opset, "simplify": False,
            "nms": False}
    return {
        "description": f"Ultralytics {pretty} model, INT8 quantization-aware trained with fxqat",
        "author": "fxqat",
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "stride": stride,
        "task": meta.get("task", TASK),
        "head": _head_name(yaml),
        "batch": int(batch),
        "imgsz": [h, w],
        "names": names,
        "args": {k: args[k] for k in _ARG_KEYS[fmt]},
        "channels": int(yaml.get("channels", 3)),
        "end2end": bool(meta.get("end2end", False)),  # an end-to-end head exported on its one-to-one path
        "producer": "fxqat",
        "fxqat_version": __version__,
        **({"kpt_shape": list(meta["kpt_shape"])} if meta.get("kpt_shape") else {}),
    }


def _onnx_value(key: str, v) -> str:
    # Ultralytics writes str(v) and reads dicts back with ast.literal_eval. ``names`` is JSON (ensure_ascii off: no
    # \u escapes), which is also a Python literal of the same dict, so json.loads readers keep working too.
    return json.dumps({str(k): s for k, s in v.items()}, ensure_ascii=False) if key == "names" else str(v)


def add_onnx_metadata(model, meta: dict, imgsz, batch: int = 1, dynamic: bool = False, opset: int | None = None):
    """Set Ultralytics' metadata (:func:`yolo_metadata`) on an ``onnx.ModelProto``'s ``metadata_props``."""
    md = yolo_metadata(meta, imgsz, batch=batch, dynamic=dynamic, fmt="onnx", opset=opset)
    keep = [p for p in model.metadata_props if p.key not in md]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in md.items():
        p = model.metadata_props.add()
        p.key, p.value = k, _onnx_value(k, v)
    return model


def parse_metadata(raw: dict) -> dict:
    """String metadata (ONNX ``metadata_props``) → native types, as Ultralytics' ``BaseBackend.apply_metadata``
    reads it. Older fxqat exports (``stride`` a list, ``names`` JSON) are read too."""
    out = dict(raw)
    for k, v in raw.items():
        if not isinstance(v, str) or k not in ("stride", "batch", "channels", "imgsz", "names", "args", "end2end"):
            continue
        try:
            val = ast.literal_eval(v)
            if k in ("stride", "batch", "channels"):
                val = int(max(val)) if isinstance(val, (list, tuple)) else int(val)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ModelLoadError(f"metadata {k}={v[:80]!r}: not a value Ultralytics can read") from None
        out[k] = val
    if isinstance(out.get("names"), dict):
        out["names"] = {int(k): str(v) for k, v in out["names"].items()}
    return out


def read_onnx_metadata(path) -> dict:
    """The parsed metadata of an ONNX file (see :func:`parse_metadata`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        return parse_metadata({p.key: p.value for p in model.metadata_props})
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------------- OpenVINO
def require_openvino():
    """The ``openvino`` module, or an FxqatError that says how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise FxqatError("format=openvino needs OpenVINO: pip install 'fxqat[openvino]' (or pip install openvino)"
                         ) from None
    return ov


def to_openvino(onnx_path, out_xml=None) -> Path:
    """Convert a QDQ ONNX model to OpenVINO IR (.xml + .bin); OpenVINO turns the Q/DQ pairs into INT8 kernels.
    A bare IR pair: :func:`export_openvino` writes the folder Ultralytics' ``YOLO()`` loads."""
    ov = require_openvino()
    onnx_path = Path(onnx_path)
    out_xml = Path(out_xml) if out_xml else onnx_path.with_suffix(".xml")
    ov.save_model(ov.convert_model(str(onnx_path)), str(out_xml), compress_to_fp16=False)
    return out_xml


def openvino_dir(model_path) -> Path:
    """Ultralytics' folder name for an INT8 OpenVINO export of ``model_path``: ``best.pt`` → ``best_int8_openvino_model``."""
    p = Path(model_path)
    return p.with_name(p.stem + OPENVINO_SUFFIX)


def export_openvino(onnx_path, out_dir=None, name: str | None = None) -> Path:
    """fxqat's QDQ ONNX model → ``out_dir/<name>.xml|.bin`` + ``metadata.yaml`` (Ultralytics' OpenVINO layout,
    ``YOLO(out_dir)`` loads it). ``out_dir`` defaults to ``<onnx stem>_int8_openvino_model`` beside the ONNX file and
    must end in ``_openvino_model`` (Ultralytics recognizes the format by that name); ``name`` defaults to the ONNX
    file's stem. The model asks for f32 inference of its float parts (box decode), as fxqat's parity tests run it."""
    import yaml

    ov = require_openvino()
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir) if out_dir else openvino_dir(onnx_path)
    if not out_dir.name.endswith("_openvino_model"):
        raise FxqatError(f"{out_dir}: an OpenVINO model folder must end in '_openvino_model' for Ultralytics to load "
                         f"it, e.g. {out_dir.with_name(out_dir.name + OPENVINO_SUFFIX)}")
    md = read_onnx_metadata(onnx_path)
    if md.get("producer") != "fxqat" or "names" not in md:
        raise FxqatError(f"{onnx_path}: not an fxqat ONNX export with Ultralytics metadata; export it again with "
                         "fxqat export CKPT format=openvino")
    args = md.get("args", {})
    md["args"] = {k: args.get(k, 8 if k == "quantize" else None) for k in _ARG_KEYS["openvino"]}
    note = overflow_note(md)
    if note:
        print(note)
    ov_model = ov.convert_model(str(onnx_path))
    # what Ultralytics' exporter stores for OpenVINO's own tools (model_api). The float parts' precision is the
    # runtime's choice: OpenVINO 2026.4's CPU plugin ignores an INFERENCE_PRECISION_HINT stored in the model's
    # rt_info, and Ultralytics compiles with its default (bf16 on CPUs with avx512_bf16 / AMX).
    ov_model.set_rt_info("YOLO", ["model_info", "model_type"])
    ov_model.set_rt_info(True, ["model_info", "reverse_input_channels"])
    ov_model.set_rt_info(114, ["model_info", "pad_value"])
    ov_model.set_rt_info([255.0], ["model_info", "scale_values"])
    ov_model.set_rt_info(0.7, ["model_info", "iou_threshold"])
    ov_model.set_rt_info([v.replace(" ", "_") for v in md["names"].values()], ["model_info", "labels"])
    ov_model.set_rt_info("fit_to_window_letterbox", ["model_info", "resize_type"])
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / f"{name or onnx_path.stem}.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
    (out_dir / "metadata.yaml").write_text(yaml.safe_dump(md, sort_keys=False, allow_unicode=True))
    return out_dir


def overflow_note(md: dict) -> str | None:
    """A warning when an OpenVINO model with 8-bit weights (``fxqat_overflow_fix`` disable, or an export older than
    the option) is made on a CPU without VNNI, where OpenVINO's int8 kernels saturate int16 pair sums."""
    from .modules.int8 import cpu_has_vnni

    if md.get("fxqat_overflow_fix", "disable") != "disable" or cpu_has_vnni():
        return None
    return ("warning: this model's 8-bit weights lose accuracy in OpenVINO on this CPU (no VNNI: int8 products are "
            "summed in saturating int16; PTQ of the shipped yolov8n lost 2.8 pt mAP50-95); export with overflow_fix=enable "
            "(or auto) for a 7-bit weight grid, or train with the openvino_avx2 qconfig")


class OpenVINORunner(BatchRunner):
    """A compiled OpenVINO model as a callable on torch tensors: fxqat's own runner for evaluating the OpenVINO form
    (``fxqat.evaluate.evaluate(openvino_predictor(folder), data)``). ``precision``: the float parts' precision,
    OpenVINO's ``INFERENCE_PRECISION_HINT`` (default ``f32``: the QDQ arithmetic; ``bf16`` is what OpenVINO picks by
    default, and Ultralytics runs, on CPUs with avx512_bf16 / AMX)."""

    def __init__(self, path, threads: int | None = None, precision: str = "f32"):
        ov = require_openvino()
        p = Path(path)
        xml = p if p.suffix in (".xml", ".onnx") else next(iter(sorted(p.glob("*.xml"))), None)
        if xml is None:
            raise ModelLoadError(f"{p}: no OpenVINO .xml model in this folder")
        cfg = {"INFERENCE_PRECISION_HINT": precision, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.compiled = ov.Core().compile_model(str(xml), "CPU", cfg)
        dim0 = self.compiled.input(0).get_partial_shape()[0]
        self.static_batch = dim0.get_length() if dim0.is_static else None

    def run(self, x):
        res = self.compiled(x)
        outs = [torch.from_numpy(res[o].copy()) for o in self.compiled.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)  # segment: (predictions, prototypes)


def openvino_predictor(folder, precision: str = "f32"):
    """An ``*_openvino_model`` folder as an :class:`fxqat.evaluate.Predictor` (names and stride from its
    metadata.yaml), for :func:`fxqat.evaluate.evaluate`; ``precision``: see :class:`OpenVINORunner`."""
    import yaml

    from .evaluate import Predictor

    md = yaml.safe_load((Path(folder) / "metadata.yaml").read_text())
    return Predictor(OpenVINORunner(folder, precision=precision), md["names"], md["stride"], "openvino",
                     md.get("task", TASK))


# ------------------------------------------------------------------------------------------ Ultralytics YOLO object
def _is_qat_graph(m: nn.Module) -> bool:
    from .quant.fake_quant import FakeQuant

    return any(isinstance(x, FakeQuant) for x in m.modules()) and not _is_int8_graph(m)


def _is_int8_graph(m: nn.Module) -> bool:
    from .modules.int8 import Int8ConvBnAct

    return any(isinstance(x, Int8ConvBnAct) for x in m.modules())


def yolo_module(int8_model: nn.Module, names=None, stride=None) -> nn.Module:
    """The INT8 torch model as the ``nn.Module`` Ultralytics' ``AutoBackend`` takes: ``names``, ``stride``,
    ``yaml``, ``task``, and decoded (B, 4 + nc, anchors) predictions from ``forward``."""
    from .evaluate import Predictor

    meta = getattr(int8_model, "meta", {}) or {}
    if meta.get("task", TASK) != TASK:
        raise FxqatError(f"a {meta['task']} model: as_yolo runs detect models only (run the exported ONNX with "
                         "YOLO(path))")
    names = names or meta.get("names")
    stride = stride if stride is not None else meta.get("stride")
    if not names or stride is None:
        raise ModelLoadError(f"{type(int8_model).__name__}: no class names / strides (model.meta); pass names= and "
                             "stride=, or give the model fxqat.convert returned")
    m = Predictor(int8_model.eval(), names, stride, "int8")
    m.task, m.end2end = TASK, False
    m.yaml = {"channels": int((meta.get("yaml") or {}).get("channels", 3)), "nc": len(names)}
    m.args = {"task": TASK}
    return m


def as_yolo(model, task: str = TASK, names=None, stride=None):
    """An ``ultralytics.YOLO`` object running fxqat's INT8 torch model: ``.predict``, ``.val`` and ``.track`` work
    as on any YOLO model (``training`` and ``export`` do not: it is an INT8 inference model).

    ``model``: the INT8 model from :func:`fxqat.convert`, a QAT graph (converted here) or an fxqat QAT checkpoint
    path (loaded and converted); an exported ``.onnx`` file or ``*_openvino_model`` folder is loaded by Ultralytics.
    """
    from ultralytics import YOLO

    if task != TASK:
        raise FxqatError(f"task={task}: as_yolo runs detect models only (segment / pose / obb: run the exported "
                         f"ONNX with YOLO(path)); valid: {TASK}")
    label = "fxqat-int8"
    if isinstance(model, (str, Path)):
        from .checkpoint import is_checkpoint, load_checkpoint

        p = Path(model)
        if p.suffix == ".onnx" or p.name.endswith("_openvino_model"):
            if not p.exists():
                raise ModelLoadError(f"{p}: not found")
            return YOLO(str(p), task=task)
        if not is_checkpoint(p):
            raise ModelLoadError(f"{p}: not an fxqat QAT checkpoint, .onnx file or *_openvino_model folder")
        label, model = str(p), load_checkpoint(p)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"cannot run a {type(model).__name__} in Ultralytics; give fxqat.convert's INT8 model, a "
                             "QAT graph or checkpoint, an .onnx file or an *_openvino_model folder")
    if _is_qat_graph(model):
        from .convert import convert

        model = convert(model)
    elif not _is_int8_graph(model):
        raise ModelLoadError(f"{type(model).__name__}: not an fxqat INT8 model or QAT graph (no Int8ConvBnAct / "
                             "FakeQuant modules); a float Ultralytics model loads with YOLO(path) directly")
    module = yolo_module(model, names, stride)
    # a YOLO object from Ultralytics' own constructor (building the bundled YAML takes a fraction of what convert
    # does), then its model swapped for the INT8 one: AutoBackend takes an nn.Module as it is (it has no fuse())
    y = YOLO("yolov8n.yaml", task=task)
    y.model = module
    y.task, y.cfg, y.ckpt, y.ckpt_path, y.model_name = task, None, {}, None, label
    y.overrides = {"task": task, "model": label}
    return y


# ----------------------------------------------------------------------------------------------------- CLI hints
def next_commands(model_path, imgsz, data=None, source=None, task: str = TASK) -> list[str]:
    """What a user runs next on an export: Ultralytics' own ``yolo predict`` / ``yolo val`` lines (for the model's
    ``task``: detect, segment, pose, obb or classify)."""
    m = str(model_path) + ("/" if Path(model_path).is_dir() else "")
    lines = [f"Predict:   yolo predict task={task} model={m} imgsz={imgsz} source={source or 'path/to/images'}"]
    lines.append(f"Validate:  yolo val task={task} model={m} imgsz={imgsz} data={data or 'path/to/data.yaml'}")
    return lines

"""QDQ ONNX export in the TensorRT explicit-quantization style, and a structural report of the result.

* Every quantized conv reads ``DequantizeLinear(int8 weight initializer, per-channel scales)`` (BN folded) and an
  input from ``DequantizeLinear(QuantizeLinear(x))``.
* Shared grids are preserved: Concat / MaxPool / Resize / Split outputs are re-quantized with the *same* scale and
  zero-point as their inputs (an exact identity, and the pattern ONNX Runtime, OpenVINO and TensorRT fuse into INT8
  Concat/MaxPool/Resize), so no DQ→Q pair around them changes scale. The OpenVINO form
  (``requantize_shared=False``, what ``fxqat export format=openvino`` converts) leaves that identity out: OpenVINO
  moves the dequantize through those ops itself, and ran each requantize after a Split / Resize as its own node.
* DFL, box decode and the class sigmoid stay float. The output is the decoded (B, 4 + nc, anchors) tensor.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from .convert import check_initialized
from .errors import ConvertError
from .passes.base import run_passes
from .passes.pipeline import export_passes, onnx_passes


WEIGHT_FORMS = ("int8", "uint8")
OVERFLOW_FIX = ("auto", "enable", "first_layer", "disable")  # NNCF's names: ENABLE, FIRST_LAYER, DISABLE
# u8 x s8 products summed in pairs must fit int16 where int8 kernels use vpmaddubsw (no VNNI): 255 * 64 * 2 = 32 640
SAFE_WEIGHT_CODE = 64


def export_graph(qat_model: fx.GraphModule, requantize_shared: bool = True) -> fx.GraphModule:
    """The graph that is exported: the export pass list (folded convs, decode in export mode, re-quantization
    after shared ops unless ``requantize_shared=False``) run on a copy of ``qat_model``."""
    gm = copy.deepcopy(qat_model).cpu().eval()
    return run_passes(gm, export_passes(requantize_shared), "export")


def constant_reader(g):
    """``value(name)``: the array of a constant tensor of ONNX graph ``g`` (an initializer or a Constant node, through
    Identity aliases), read when asked; None for a computed tensor."""
    from onnx import numpy_helper

    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}

    def value(name):
        while name in alias:
            name = alias[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return numpy_helper.to_array(consts[name].attribute[0].t) if name in consts else None

    return value


def constant_values(g) -> dict:
    """Every constant tensor of ONNX graph ``g`` by name (initializers, Constant nodes, their Identity aliases)."""
    value = constant_reader(g)
    names = [i.name for i in g.initializer] + [o for n in g.node if n.op_type in ("Constant", "Identity")
                                               for o in n.output[:1]]
    return {k: v for k in names if (v := value(k)) is not None}


def fold_weight_quantizers(model) -> None:
    """QuantizeLinear(constant float weight) → an int8 initializer feeding DequantizeLinear directly."""
    from onnx import numpy_helper

    g = model.graph
    value = constant_reader(g)
    keep = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and value(n.input[0]) is not None and value(n.input[0]).ndim == 4:
            w, s = value(n.input[0]), value(n.input[1])
            zp = value(n.input[2]) if len(n.input) > 2 else np.zeros_like(s, dtype=np.int8)
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            shape[axis] = -1
            info_ = np.iinfo(zp.dtype)
            q = np.clip(np.rint(w / s.reshape(shape)) + zp.reshape(shape).astype(np.int32), info_.min, info_.max)
            g.initializer.append(numpy_helper.from_array(q.astype(zp.dtype), n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in g.node for i in n.input}
    for name in [i.name for i in g.initializer if i.name not in used]:
        g.initializer.remove(next(i for i in g.initializer if i.name == name))


def resolve_overflow_fix(overflow_fix: str) -> tuple[str, str]:
    """``(mode, why)``: "auto" is "enable" on a host without VNNI (``fxqat.modules.int8.cpu_has_vnni``), else
    "disable"; the reason is the sentence the export prints."""
    if overflow_fix not in OVERFLOW_FIX:
        raise ConvertError(f"overflow_fix={overflow_fix!r}: valid choices are {', '.join(OVERFLOW_FIX)}")
    if overflow_fix != "auto":
        return overflow_fix, f"overflow_fix={overflow_fix}"
    from .modules.int8 import cpu_has_vnni

    if cpu_has_vnni():
        return "disable", "overflow_fix=auto: this CPU has VNNI (int8 sums in int32), weights keep their 8-bit grid"
    return "enable", ("overflow_fix=auto: this CPU has no VNNI, where OpenVINO's int8 kernels add u8 x s8 products in "
                      "saturating int16 (accuracy loss); weights re-rounded to a 7-bit grid (scale x 2, codes within "
                      "+-64), NNCF's overflow fix. overflow_fix=disable keeps the 8-bit grid (exact on VNNI CPUs)")


def halve_weight_grids(model, first_layer_only: bool = False) -> list[str]:
    """NNCF's overflow fix on the exported graph, before :func:`fold_weight_quantizers`: every constant conv weight
    whose codes exceed ±64 is quantized again with twice its scale, from its float values (one rounding, codes
    within ±64), so no pair of u8 × s8 products overflows int16 in a ``vpmaddubsw`` kernel. Layers already on a
    narrower grid (e.g. 4-bit weights) stay as they are. Returns the names of the QuantizeLinear nodes changed."""
    from onnx import numpy_helper

    g = model.graph
    value = constant_reader(g)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    changed = []
    for n in g.node:
        if n.op_type != "QuantizeLinear" or value(n.input[0]) is None or value(n.input[0]).ndim != 4:
            continue
        w, s = value(n.input[0]), value(n.input[1])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        zp = value(n.input[2]) if len(n.input) > 2 else None
        if zp is not None and np.any(zp != 0):
            continue  # asymmetric weights: not fxqat's form, left alone
        if np.abs(np.rint(w / s.reshape(shape))).max() > SAFE_WEIGHT_CODE:
            name = f"{n.output[0]}_scale_x2"
            g.initializer.append(numpy_helper.from_array((s * 2).astype(s.dtype), name))
            for c in [n] + [c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"]:
                c.input[1] = name
            changed.append(n.name or n.output[0])
        if first_layer_only:
            break  # the first weight in graph order: the conv reading the image
    return changed


def uint8_weights(model) -> None:
    """int8 conv weights (zero point 0) → the same values as uint8 codes + 128 with zero point 128. ONNX Runtime then
    runs its U8U8 convolutions, which are exact on CPUs without VNNI, where its u8×s8 kernels saturate int16 pair
    sums (ONNX Runtime's own advice for such CPUs). TensorRT wants the int8 form: this is an opt-in."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return numpy_helper.to_array(consts[name].attribute[0].t) if name in consts else None

    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        w = value(n.input[0])
        zp = value(n.input[2]) if len(n.input) > 2 else None
        if w.dtype != np.int8 or w.ndim != 4 or (zp is not None and np.any(zp != 0)):
            continue
        inits[n.input[0]].CopyFrom(numpy_helper.from_array((w.astype(np.int16) + 128).astype(np.uint8), n.input[0]))
        shape = value(n.input[1]).shape  # one zero point per scale (per channel)
        name = f"{n.output[0]}_zero_point_u8"
        g.initializer.append(numpy_helper.from_array(np.full(shape, 128, dtype=np.uint8), name))
        if len(n.input) > 2:
            n.input[2] = name
        else:
            n.input.append(name)
    used = {i for n in g.node for i in n.input}
    for name in [i.name for i in g.initializer if i.name not in used]:
        g.initializer.remove(next(i for i in g.initializer if i.name == name))


def scalar_qparams(model) -> None:
    """Per-tensor scales / zero points as scalars, not shape-[1] tensors: ONNX Runtime fuses DQ, DQ → Add → Q into
    QLinearAdd only with scalar qparams (and TensorRT expects scalars for per-tensor quantization)."""
    from onnx import numpy_helper

    g = model.graph
    qp = {i for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    for t in g.initializer:
        if t.name in qp and list(t.dims) == [1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).reshape(()), t.name))
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] in qp and list(n.attribute[0].t.dims) == [1]:
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t).reshape(())))


def export_onnx(qat_model: fx.GraphModule, path, imgsz=640, dynamic: bool = False, opset: int = 17,
                batch: int = 1, weights: str = "int8", requantize_shared: bool = True,
                overflow_fix: str = "disable") -> Path:
    """Write a QDQ ONNX model of ``qat_model`` to ``path`` and return the path (checked with onnx.checker).

    ``weights``: "int8" (TensorRT's explicit-quantization form) or "uint8" (the same values as uint8 + zero point
    128: exact in ONNX Runtime on CPUs without VNNI, see :func:`uint8_weights`).
    ``requantize_shared``: True (default) quantizes the outputs of Concat / MaxPool / Resize / Split again on their
    input's grid, which ONNX Runtime and TensorRT need to run them in INT8. False leaves that identity out: the
    OpenVINO form (``fxqat export format=openvino``), because OpenVINO moves the dequantize through those ops itself
    and otherwise runs each requantize after a Split / Resize as a separate node (``fxqat.diagnose``: 22 on yolov8n).
    Both forms compute the same values.
    ``overflow_fix``: "disable" (default: the weights on the model's own grid), "enable" (every conv weight with
    codes beyond ±64 on a grid of twice its scale: :func:`halve_weight_grids`, for int8 runtimes on CPUs without
    VNNI, OpenVINO's among them), "first_layer" (only the conv reading the image) or "auto" ("enable" on a host
    without VNNI, else "disable"; see :func:`resolve_overflow_fix`). The mode used is stored in the ONNX metadata
    (``fxqat_overflow_fix``)."""
    import onnx

    if weights not in WEIGHT_FORMS:
        raise ConvertError(f"weights={weights!r}: valid choices are {', '.join(WEIGHT_FORMS)}")
    fix, _ = resolve_overflow_fix(overflow_fix)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    check_initialized(qat_model, "export")
    gm = export_graph(qat_model, requantize_shared)
    segment = getattr(qat_model, "meta", {}).get("task") == "segment"
    outputs = ["output0", "output1"] if segment else ["output0"]  # Ultralytics' names: predictions (+ prototypes)
    x = torch.zeros(batch, 3, h, w)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(gm, (x,), str(path), opset_version=opset, input_names=["images"], output_names=outputs,
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "output0": {0: "batch", 2: "anchors"},
                                        **({"output1": {0: "batch", 2: "mask_height", 3: "mask_width"}}
                                           if segment else {})} if dynamic else None,
                          dynamo=False, do_constant_folding=True)
    model = onnx.load(str(path))
    if fix != "disable":
        halve_weight_grids(model, first_layer_only=fix == "first_layer")
    for rewrite in onnx_passes(weights):
        rewrite(model)
    from .deploy import add_onnx_metadata  # Ultralytics' metadata keys: YOLO(path) predicts / validates / tracks

    add_onnx_metadata(model, getattr(qat_model, "meta", {}), (h, w), batch=batch, dynamic=dynamic, opset=opset)
    p = model.metadata_props.add()
    p.key, p.value = "fxqat_overflow_fix", fix
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def qdq_report(path) -> dict:
    """Q/DQ counts per consuming op type and any scale change through Concat / MaxPool / Resize / Split / Add."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    consts = constant_values(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def qparams(n):
        s = consts.get(n.input[1])
        z = consts.get(n.input[2]) if len(n.input) > 2 else None
        return (None if s is None else tuple(np.ravel(s).round(12)), None if z is None else tuple(np.ravel(z)))

    counts: Counter = Counter()
    for n in g.node:
        if n.op_type == "DequantizeLinear":
            for c in consumers.get(n.output[0], []):
                counts[f"DQ→{c.op_type}"] += 1
        if n.op_type == "QuantizeLinear":
            src = producer.get(n.input[0])
            counts[f"{src.op_type if src else 'input'}→Q"] += 1
    mismatches, add_requant = [], []
    for n in g.node:
        if n.op_type not in ("Concat", "MaxPool", "Resize", "Split", "Add"):
            continue
        ins = [producer.get(i) for i in n.input if i in producer]
        dq_in = {qparams(p) for p in ins if p is not None and p.op_type == "DequantizeLinear"}
        q_out = {qparams(c) for o in n.output for c in consumers.get(o, []) if c.op_type == "QuantizeLinear"}
        if not dq_in or not q_out:
            continue
        if len(dq_in | q_out) > 1:
            entry = {"node": n.name, "op": n.op_type, "in": sorted(map(str, dq_in)), "out": sorted(map(str, q_out))}
            (add_requant if n.op_type == "Add" else mismatches).append(entry)
    n_q = sum(1 for n in g.node if n.op_type == "QuantizeLinear")
    n_dq = sum(1 for n in g.node if n.op_type == "DequantizeLinear")
    return {"quantize_linear": n_q, "dequantize_linear": n_dq, "by_op": dict(sorted(counts.items())),
            "scale_changes": mismatches, "residual_add_requant": add_requant}


def format_report(r: dict) -> str:
    lines = [f"QuantizeLinear {r['quantize_linear']}, DequantizeLinear {r['dequantize_linear']}"]
    lines += [f"  {k:<28} {v}" for k, v in r["by_op"].items()]
    lines.append(f"scale changes around Concat/MaxPool/Resize/Split: {len(r['scale_changes']) or 'none'}")
    for m in r["scale_changes"]:
        lines.append(f"  {m['op']} {m['node']}: in {m['in']} out {m['out']}")
    lines.append(f"residual Adds that requantize (inputs on two grids by design): {len(r['residual_add_requant'])}")
    return "\n".join(lines)

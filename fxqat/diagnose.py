"""Placement diagnosis: run a quantized model on an installed runtime and say where its time goes.

:func:`diagnose` compiles a QDQ ONNX model (or an OpenVINO IR, e.g. NNCF's) with the runtime's profiler on, runs it
a few times on random input and classifies every executed runtime node:

* ``int8``: an integer kernel (OpenVINO runtime precision u8/i8, ONNX Runtime QLinear* / integer tensors);
* ``float``: a layer that executes in float *between a dequantize and a quantize*, i.e. inside the quantized part of
  the network (a layer the export left unquantized, or an op the runtime could not fuse into an integer kernel);
* ``qdq``: a Quantize / Dequantize / requantize node the runtime did not fold into a neighbouring kernel;
* ``reorder``: layout / precision conversions (OpenVINO ``Reorder``, ONNX Runtime ``Transpose`` / NCHWc reorders);
* ``outside``: float work outside the quantized part by design (the box decode after the last dequantize).

Each row carries its share of the summed kernel time. Sources: OpenVINO's per-layer performance counters
(``PERF_COUNT``: executed kernel, runtime precision and the original layers fused into each node, from the
execution graph) and ONNX Runtime's profiler (``enable_profiling``: per-node kernel, provider and tensor types, on the
optimized graph). :func:`compare` puts two diagnoses side by side (fxqat's export vs a peer's PTQ model of the same
network). Timings are one process on a possibly busy machine: use them for where time goes, not for speed claims.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import FxqatError

RUNTIMES = ("openvino", "onnxruntime")
KINDS = ("int8", "float", "qdq", "reorder", "outside")
ISSUE_KINDS = ("float", "qdq", "reorder")
_INT = ("u8", "i8", "u4", "i4", "i32", "uint8", "int8", "int32")
_FLOAT = ("f32", "f16", "bf16", "float", "float16", "bfloat16")
_ORT_REORDER = {"Transpose", "ReorderInput", "ReorderOutput"}
_ORT_INT_OPS = {"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearAveragePool",
                "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearMatMul", "QGemm",
                "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcMaxPool",
                "QLinearReduceMean", "QLinearWhere"}


@dataclass
class LayerRow:
    name: str  # runtime node name
    kind: str  # one of KINDS
    op: str  # what it computes: the runtime layer type, or the original ops fused into it
    kernel: str  # executed kernel / implementation (OpenVINO exec type; ONNX Runtime op + provider)
    precision: str  # runtime precision (OpenVINO) or output tensor type (ONNX Runtime)
    ms: float  # median time per inference over the profiled runs
    share: float = 0.0  # of the summed node time
    note: str = ""


@dataclass
class Diagnosis:
    runtime: str
    model: str
    label: str
    runs: int
    total_ms: float  # summed node time per inference
    rows: list[LayerRow] = field(default_factory=list)

    def by_kind(self) -> dict[str, dict]:
        out = {k: {"count": 0, "ms": 0.0, "share": 0.0} for k in KINDS}
        for r in self.rows:
            o = out[r.kind]
            o["count"] += 1
            o["ms"] += r.ms
            o["share"] += r.share
        return out

    def issues(self, kinds=ISSUE_KINDS) -> list[LayerRow]:
        """Rows of the given kinds, slowest first."""
        return sorted((r for r in self.rows if r.kind in kinds), key=lambda r: -r.ms)

    def by_op(self) -> dict[tuple[str, str], dict]:
        """{(kind, op): count, ms, share} — what :func:`compare` sets side by side."""
        out: dict[tuple[str, str], dict] = defaultdict(lambda: {"count": 0, "ms": 0.0, "share": 0.0})
        for r in self.rows:
            o = out[(r.kind, r.op)]
            o["count"] += 1
            o["ms"] += r.ms
            o["share"] += r.share
        return dict(out)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "by_kind": self.by_kind(),
                "rows": [asdict(r) for r in self.rows]}

    def format(self, top: int = 12) -> str:
        bk = self.by_kind()
        lines = [f"{self.label} on {self.runtime}: {self.total_ms:.2f} ms of node time per inference "
                 f"(median of {self.runs} profiled runs; {len(self.rows)} executed nodes)"]
        lines.append("  " + ", ".join(f"{k} {bk[k]['count']} nodes {100 * bk[k]['share']:.1f}%" for k in KINDS))
        for kind, title in (("float", "float layers between dequantize and quantize"),
                            ("qdq", "Q/DQ nodes the runtime did not fold"),
                            ("reorder", "layout / precision reorders")):
            rows = self.issues((kind,))
            lines.append(f"{title}: {len(rows) or 'none'}"
                         + (f" ({100 * sum(r.share for r in rows):.1f}% of the time)" if rows else ""))
            for r in rows[:top]:
                note = f"  [{r.note}]" if r.note else ""
                lines.append(f"  {100 * r.share:5.1f}%  {r.ms:7.3f} ms  {r.name[:60]:<60} {r.op[:40]:<40} "
                             f"{r.kernel} {r.precision}{note}")
            if len(rows) > top:
                lines.append(f"  ... {len(rows) - top} more ({100 * sum(r.share for r in rows[top:]):.1f}%)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- helpers
def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise FxqatError(f"runtime={runtime!r}: valid choices are {', '.join(RUNTIMES)}")


def _finish(d: Diagnosis) -> Diagnosis:
    total = sum(r.ms for r in d.rows)
    d.total_ms = total
    for r in d.rows:
        r.share = r.ms / total if total else 0.0
    return d


def _region(nodes, inputs, consumers, is_float, passes, is_deq, is_q):
    """Float nodes with a dequantize upstream and a quantize downstream, reached through float nodes only.
    ``inputs``/``consumers``: {node: [node]}; ``is_float(n)``: n computes in float; ``passes(n)``: n also hands a
    float tensor on; ``is_deq(n)``: n hands dequantized (float) values to its consumers; ``is_q(n)``: n quantizes its
    output (or is an integer kernel that reads float input)."""
    up: dict = {}
    down: dict = {}

    def _up(n):
        if n not in up:
            up[n] = False
            up[n] = any(is_deq(p) or (passes(p) and _up(p)) for p in inputs.get(n, ()))
        return up[n]

    def _down(n):
        if n not in down:
            down[n] = False
            down[n] = is_q(n) or any(is_q(c) or (passes(c) and _down(c)) for c in consumers.get(n, ()))
        return down[n]

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * len(nodes) + 1000))
    try:
        return {n: _up(n) and _down(n) for n in nodes if is_float(n)}
    finally:
        sys.setrecursionlimit(limit)


def _medians(per_run: dict[str, list[float]], runs: int) -> dict[str, float]:
    """Median time per node over the profiled runs (a node missing from a run counts 0 there): one slow run on a
    busy machine does not make a node look expensive."""
    return {n: float(np.median(v + [0.0] * (runs - len(v)))) for n, v in per_run.items()}


def _input_shape(shape, imgsz) -> list[int]:
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if len(dims) != 4:
        raise FxqatError(f"model input has shape {shape}: diagnose runs image models with one (N, C, H, W) input")
    return [dims[0] or 1, dims[1] or 3, dims[2] or h, dims[3] or w]


# ---------------------------------------------------------------------------------------------------- OpenVINO
def _ov_qdq_names(model) -> set[str]:
    """Friendly names of the ops that quantize / dequantize in an ov.Model (FakeQuantize; Convert from or to an
    integer type and the Subtract / Multiply by a constant that follow an integer Convert)."""
    names, deq, const = set(), set(), set()
    for op in model.get_ordered_ops():  # topological: producers first
        t = op.get_type_name()
        srcs = [i.get_source_output().get_node() for i in op.inputs()]
        if t == "Constant" or (t == "Convert" and all(s.get_friendly_name() in const for s in srcs)):
            const.add(op.get_friendly_name())
            continue
        if t == "FakeQuantize":
            names.add(op.get_friendly_name())
        elif t == "Convert":
            src = op.input(0).get_element_type().get_type_name()
            dst = op.get_output_element_type(0).get_type_name()
            if src in _INT or dst in _INT:
                names.add(op.get_friendly_name())
                deq.add(op.get_friendly_name())
        elif t in ("Subtract", "Multiply"):
            if any(s.get_friendly_name() in deq for s in srcs) and any(s.get_friendly_name() in const for s in srcs):
                names.add(op.get_friendly_name())
                deq.add(op.get_friendly_name())
    return names


def _diagnose_openvino(path: Path, imgsz, threads: int, runs: int, label: str) -> Diagnosis:
    from .deploy import require_openvino

    ov = require_openvino()
    core = ov.Core()
    model = core.read_model(str(path))
    types = {op.get_friendly_name(): op.get_type_name() for op in model.get_ordered_ops()}
    qdq = _ov_qdq_names(model)
    shape = _input_shape([d.get_length() if d.is_static else -1 for d in model.input(0).get_partial_shape()], imgsz)
    compiled = core.compile_model(model, "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": threads,
                                                 "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    req.infer({0: x})  # warm-up, not counted
    per_run: dict[str, list[float]] = defaultdict(list)
    kernels: dict[str, str] = {}
    for _ in range(runs):
        req.infer({0: x})
        for p in req.get_profiling_info():
            if p.status.name == "EXECUTED":
                per_run[p.node_name].append(p.real_time.total_seconds() * 1e3)
                kernels[p.node_name] = p.exec_type
    times = _medians(per_run, runs)
    ex = compiled.get_runtime_model()
    info, inputs, consumers = {}, defaultdict(list), defaultdict(list)
    for op in ex.get_ordered_ops():
        rt = op.get_rt_info()
        d = {k: rt[k].astype(str) for k in rt.keys()}
        name = op.get_friendly_name()
        info[name] = d
        for i in op.inputs():
            src = i.get_source_output().get_node().get_friendly_name()
            inputs[name].append(src)
            consumers[src].append(name)

    def orig(n):
        return [o for o in info[n].get("originalLayersNames", "").split(",") if o]

    def prec(n):
        return info[n].get("runtimePrecision", "").lower()

    def out_int(n):
        return any(p.strip().lower() in _INT for p in info[n].get("outputPrecisions", "").split(","))

    def layer(n):
        return info[n].get("layerType", "")

    def only_qdq(n):
        o = [x for x in orig(n) if x in types]
        return bool(o) and all(x in qdq for x in o)

    def computes(n):
        return layer(n) not in ("Input", "Output", "Const", "Reorder") and not only_qdq(n)

    def is_float(n):
        return computes(n) and prec(n) in _FLOAT

    def passes(n):
        return (computes(n) or layer(n) == "Reorder") and prec(n) in _FLOAT and not out_int(n)

    def is_deq(n):  # hands dequantized values on: an integer producer, or an integer kernel / DQ with float output
        return out_int(n) or (prec(n) in _INT) or (only_qdq(n) and not out_int(n))

    def is_q(n):
        return out_int(n) or prec(n) in _INT or any(x in qdq and types.get(x) == "FakeQuantize" for x in orig(n))

    between = _region(list(info), inputs, consumers, is_float, passes, is_deq, is_q)
    d = Diagnosis("openvino", str(path), label, runs, 0.0)
    for n, ms in times.items():
        if n not in info or layer(n) in ("Input", "Output", "Const"):
            continue
        ops = [types[o] for o in orig(n) if o in types and o not in qdq]
        op = layer(n) if layer(n) != "Subgraph" or not ops else "+".join(sorted(set(ops)))
        note = ""
        if layer(n) == "Reorder":
            kind = "reorder"
        elif only_qdq(n):
            kind, op = "qdq", "requantize" if prec(n) in _INT and out_int(n) else (
                "quantize" if out_int(n) else "dequantize")
            if any(layer(p) == "Input" for p in inputs[n]):
                note = "model input"
        elif is_float(n):
            kind = "float" if between.get(n) else "outside"
        else:
            kind = "int8"
            if not out_int(n) and any(computes(c) and prec(c) in _INT for c in consumers[n]):
                note = "writes a float output that an integer kernel reads"
        d.rows.append(LayerRow(n, kind, op, kernels.get(n, ""), prec(n), ms, note=note))
    return _finish(d)


# ------------------------------------------------------------------------------------------------- ONNX Runtime
def _diagnose_onnxruntime(path: Path, imgsz, threads: int, runs: int, label: str) -> Diagnosis:
    import onnx
    import onnxruntime as ort

    if path.suffix != ".onnx":
        raise FxqatError(f"{path}: ONNX Runtime diagnoses .onnx models; for an OpenVINO IR use runtime='openvino'")
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).random(_input_shape(inp.shape, imgsz), dtype=np.float32)
        for _ in range(runs + 1):  # the first run is warm-up, not counted
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
        opt = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(windows))
    meta: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        k = next((i for i, (a, b) in enumerate(windows) if a <= e["ts"] <= b), None)
        if k is None:
            continue  # the warm-up run
        n = e["name"][: -len("_kernel_time")]
        per_run[n][k] += e["dur"] / 1e3
        meta[n] = e.get("args", {})
    times = _medians(per_run, len(windows))
    g = opt.graph
    inits = {i.name for i in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    graph_inputs = {i.name for i in g.input}
    nodes = {n.name: n for n in g.node}
    producer = {o: n.name for n in g.node for o in n.output}
    inputs = {n.name: [producer[i] for i in n.input if i in producer] for n in g.node}
    consumers: dict[str, list] = defaultdict(list)
    for n, ps in inputs.items():
        for p in ps:
            consumers[p].append(n)

    def types_of(n, key):
        return [next(iter(t)) for t in meta.get(n, {}).get(key, []) if t]

    def out_type(n):
        t = types_of(n, "output_type_shape")
        return t[0] if t else ""

    def is_qdq(n):
        return nodes[n].op_type in ("QuantizeLinear", "DequantizeLinear")

    def is_int(n):
        return nodes[n].op_type in _ORT_INT_OPS or out_type(n) in _INT

    def is_float(n):
        return n in nodes and not is_qdq(n) and not is_int(n)

    def is_deq(n):
        return nodes[n].op_type == "DequantizeLinear" and nodes[n].input[0] not in inits

    def is_q(n):
        first_input = types_of(n, "input_type_shape")[:1]
        return nodes[n].op_type == "QuantizeLinear" or (is_int(n) and any(t in _FLOAT for t in first_input))

    between = _region(list(nodes), inputs, consumers, is_float, is_float, is_deq, is_q)
    d = Diagnosis("onnxruntime", str(path), label, runs, 0.0)
    for n, ms in times.items():
        if n not in nodes:
            continue
        node = nodes[n]
        kernel = f"{node.op_type} ({meta[n].get('provider', '').replace('ExecutionProvider', '')})"
        note = ""
        if node.op_type in _ORT_REORDER:
            kind = "reorder"
        elif is_qdq(n):
            kind, op = "qdq", "quantize" if node.op_type == "QuantizeLinear" else "dequantize"
            if node.input[0] in inits:
                note = "constant weight, dequantized every run"
            elif node.input[0] in graph_inputs:
                note = "model input"
        elif is_int(n):
            kind = "int8"
        else:
            kind = "float" if between.get(n) else "outside"
        op = op if kind == "qdq" else node.op_type
        d.rows.append(LayerRow(n, kind, op, kernel, out_type(n), ms, note=note))
    return _finish(d)


# ------------------------------------------------------------------------------------------------------ public
def diagnose(path, runtime: str = "openvino", imgsz=640, threads: int = 2, runs: int = 5,
             label: str | None = None) -> Diagnosis:
    """Profile the quantized model at ``path`` (QDQ .onnx; or an OpenVINO .xml / ``*_openvino_model`` folder for
    ``runtime="openvino"``) on ``runtime`` and classify every executed node (see the module docstring). ``imgsz``
    fills the dynamic dimensions of the image input; ``runs`` profiled inferences after one warm-up."""
    _check_runtime(runtime)
    p = Path(path)
    if p.is_dir():
        p = next(iter(sorted(p.glob("*.xml"))), p)
    if not p.is_file():
        raise FxqatError(f"{path}: no such model file (give a QDQ .onnx, an OpenVINO .xml or an *_openvino_model "
                         "folder)")
    if runs < 1:
        raise FxqatError(f"runs={runs}: give at least 1 profiled run")
    label = label or p.stem
    if runtime == "openvino":
        return _diagnose_openvino(p, imgsz, threads, runs, label)
    return _diagnose_onnxruntime(p, imgsz, threads, runs, label)


def compare(a: Diagnosis, b: Diagnosis, top: int = 12) -> str:
    """Two diagnoses side by side (e.g. fxqat's QDQ export vs the runtime's own PTQ of the same network): the time
    share of each kind, then per (kind, op) the node count and share where the two placements differ most."""
    if a.runtime != b.runtime:
        raise FxqatError(f"compare: {a.label} ran on {a.runtime}, {b.label} on {b.runtime}; compare one runtime")
    ka, kb = a.by_kind(), b.by_kind()
    wa, wb = max(len(a.label), 8), max(len(b.label), 8)
    lines = [f"{a.runtime}: {a.label} vs {b.label} (node time per inference: {a.total_ms:.2f} vs {b.total_ms:.2f} ms;"
             " shares of each model's own node time)",
             f"  {'kind':<28} {a.label:>{wa}} {b.label:>{wb}}"]
    for k in KINDS:
        lines.append(f"  {k:<28} {_cell(ka[k]):>{wa}} {_cell(kb[k]):>{wb}}")
    oa, ob = a.by_op(), b.by_op()
    keys = [k for k in set(oa) | set(ob) if k[0] in ISSUE_KINDS]
    keys.sort(key=lambda k: -abs(oa.get(k, {}).get("share", 0) - ob.get(k, {}).get("share", 0)))
    if keys:
        lines.append("  where the placements differ (float / unfolded Q/DQ / reorders by op):")
        for k in keys[:top]:
            lines.append(f"  {(k[0] + ' ' + k[1])[:28]:<28} {_cell(oa.get(k)):>{wa}} {_cell(ob.get(k)):>{wb}}")
    return "\n".join(lines)


def _cell(v: dict | None) -> str:
    if not v or not v["count"]:
        return "-"
    return f"{v['count']}× {100 * v['share']:.1f}%"

"""Per-layer latency on this machine's INT8 kernels, for ``budget=latency:...`` (:mod:`fxqat.analysis.budget`).

For each weight precision offered (4, 8, 16 bits), the model is prepared with every layer at that precision,
calibrated and converted with :func:`fxqat.convert`, exactly as a user would deploy it: 4- and 8-bit layers run
oneDNN's INT8 convolutions (4-bit codes fit without the split a u8×s8 kernel needs for 8-bit codes on CPUs without
VNNI, so they can be faster), 16-bit layers keep simulating in float between a dequantize and a quantize.

The converted graphs are timed node by node (an ``fx.Interpreter`` that times every node's call), batch 1 at the
images' size, in interleaved rounds — one pass of each precision per round — and each node's median over the
rounds is kept. Each node is then charged to the layer that owns it (:func:`owners`): its own conv (and activation),
the quantize of its output, and the dequantizes and other glue that only it reads. The rest — adds, concats,
pools, the head's decode, glue shared by several layers — is the fixed part, taken from the all-8-bit graph.

Predicted latency of a configuration = fixed part + Σ its layers' times at their precisions. The interpreter adds
a small per-node overhead that a plain forward does not have: the plain forwards are timed too (:func:`forward_ms`,
also interleaved), and the all-8-bit graph's difference comes off the fixed part.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.fx as fx

from ..graph.meta import META_KEY
from ..modules.int8 import Quantize


class _NodeTimer(fx.Interpreter):
    """Runs the graph once and records each node's wall time (seconds) in ``times``."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        t = time.perf_counter()
        out = super().run_node(n)
        self.times[n.name] = time.perf_counter() - t
        return out


def owners(cg: fx.GraphModule, layer_paths: dict[str, str]) -> dict[str, str]:
    """Converted graph node name → the layer (``layer_paths``: module path → layer name) it is charged to.

    A node is a layer's when the node carries that layer's module path (its conv, its activation), when it
    quantizes a node of that layer's, or when every node reading it is that layer's (walked from the output
    back, so a dequantize or a conv's pre-activation step feeding only one layer follows that layer)."""
    own: dict[fx.Node, str] = {}
    for n in cg.graph.nodes:
        meta = n.meta.get(META_KEY)
        path = meta.module_path if meta is not None else ""
        if n.op == "call_module" and path in layer_paths:
            own[n] = layer_paths[path]
        elif (n.op == "call_module" and isinstance(cg.get_submodule(n.target), Quantize)
              and len(n.all_input_nodes) == 1 and n.all_input_nodes[0] in own):
            own[n] = own[n.all_input_nodes[0]]
    for n in reversed(cg.graph.nodes):
        if n in own or n.op in ("placeholder", "output", "get_attr") or not n.users:
            continue
        if n.meta.get(META_KEY) is not None and n.meta[META_KEY].module_path:
            continue  # an op of the model's own (add, concat, pool, decode): the fixed part
        users = {own.get(u) for u in n.users}
        if len(users) == 1 and None not in users:
            own[n] = users.pop()
    return {n.name: layer for n, layer in own.items()}


@torch.no_grad()
def node_times(graphs: list[fx.GraphModule], x: torch.Tensor, rounds: int = 15, warmup: int = 2,
               progress: bool = True) -> tuple[list[dict[str, float]], list[dict]]:
    """Each graph's per-node median time (ms) and its plain forward's median and spread (:func:`forward_ms`'s
    fields), over ``rounds`` interleaved rounds: one timed pass and one plain forward of each graph per round, so
    that both see the same load on a shared machine."""
    from tqdm.auto import tqdm

    samples: list[dict[str, list[float]]] = [{} for _ in graphs]
    plain: list[list[float]] = [[] for _ in graphs]
    for r in tqdm(range(warmup + rounds), desc="latency", disable=not progress, unit="round"):
        for g, s, f in zip(graphs, samples, plain):
            timer = _NodeTimer(g)
            timer.run(x)
            t = time.perf_counter()
            g(x)
            if r >= warmup:
                f.append((time.perf_counter() - t) * 1e3)
                for k, v in timer.times.items():
                    s.setdefault(k, []).append(v * 1e3)
    return ([{k: statistics.median(v) for k, v in s.items()} for s in samples], [_stats(f) for f in plain])


def _stats(s: list[float]) -> dict:
    return {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s), "rounds": len(s)}


@torch.no_grad()
def forward_ms(models: list[torch.nn.Module], x: torch.Tensor, rounds: int = 15, warmup: int = 2) -> list[dict]:
    """Median and spread (min, max; ms) of each model's plain forward, timed in interleaved rounds."""
    samples: list[list[float]] = [[] for _ in models]
    for r in range(warmup + rounds):
        for m, s in zip(models, samples):
            t = time.perf_counter()
            m(x)
            if r >= warmup:
                s.append((time.perf_counter() - t) * 1e3)
    return [_stats(s) for s in samples]


def measure_latency(plan, build, x: torch.Tensor, rounds: int = 15, progress: bool = True) -> dict:
    """Fill ``plan.layers[i]["ms"]`` ({bits: ms}) and ``plan.fixed_ms`` from converted graphs at each precision.

    ``build(bits)`` returns the converted (INT8) model of the configuration ``bits`` (layer name → bits);
    ``x``: one image batch (batch 1 is what a latency budget means). Returns the measurement's summary."""
    paths = {r["module_path"]: r["name"] for r in plan.layers}
    graphs = [build(plan.uniform(b)) for b in plan.choices]
    times, real = node_times(graphs, x[:1], rounds=rounds, progress=progress)
    charged = {}
    for b, g, t in zip(plan.choices, graphs, times):
        own = owners(g, paths)
        per = {r["name"]: 0.0 for r in plan.layers}
        for node, ms in t.items():
            if node in own:
                per[own[node]] += ms
        for r in plan.layers:
            r.setdefault("ms", {})[b] = per[r["name"]]
        charged[b] = {"total_ms": sum(t.values()), "fixed_ms": sum(ms for n, ms in t.items() if n not in own),
                      "unowned_layers": sorted(k for k, v in per.items() if v == 0.0)}
    # the interpreter's own per-node overhead, which a plain forward does not have, comes off the fixed part: the
    # all-8-bit prediction then equals its measured forward, and the other precisions' forwards check the prediction
    for b, t in zip(plan.choices, real):
        charged[b]["forward_ms"] = t["median_ms"]
    ref = 8 if 8 in plan.choices else plan.choices[0]
    overhead = charged[ref]["total_ms"] - charged[ref]["forward_ms"]
    plan.fixed_ms = charged[ref]["fixed_ms"] - overhead
    return {"imgsz": list(x.shape[-2:]), "rounds": rounds, "threads": torch.get_num_threads(),
            "interpreter_overhead_ms": overhead, "per_precision": {str(b): v for b, v in charged.items()}}

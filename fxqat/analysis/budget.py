"""Mixed precision under a budget: one weight precision per layer, the most accurate choice that fits.

Measurement ("alone", as :func:`fxqat.analysis.sensitivity.sweep` does it): for every quantized unit with weights
and every candidate precision (4, 8, 16-bit weights; 16 is float-equivalent, float itself costs twice as much for
no measurable gain, so it is never a better choice and is not offered), the head-output noise-to-signal ratio vs
FP32 with ONLY that layer's weights on that grid and everything else float. "Alone" is used because it is the
cheapest measurement (one downstream half-forward per layer and precision, from the cached float activations) and
because under the usual additive-noise model its per-layer values sum: the predicted NSR of a configuration is the
sum of its layers' NSRs plus the measured NSR of the activation grids (all activations quantized, weights float),
which no weight choice changes. "All but this" would need the fully quantized reference, which changes with the
configuration.

Cost: a layer's weights at b bits take ``ceil(params × b / 8)`` bytes plus its float32 scales (one per output
channel). The model size adds what no choice changes: each unit's float32 bias (BatchNorm folded) and every other
parameter in float32 (layers that stay float, DFL). ``budget=size:...`` bounds that total.

``budget=latency:...`` bounds the predicted batch-1 latency at the measured images' size on this machine's INT8
kernels instead: each layer's time at each precision is measured on converted models (:mod:`.latency`), and the
predicted latency of a configuration is the fixed part plus the sum of its layers' times.

Choice: a multiple-choice knapsack solved exactly by dynamic programming over the cost (bytes or ms) discretized to
``BINS`` steps of the span between the cheapest and the dearest configuration; each layer's extra cost over its
cheapest choice is rounded UP to whole steps, so a solution always fits its budget in real cost units. The step
depends on the model only, so a larger budget never gives a larger predicted NSR.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FxqatError
from ..quant.fake_quant import FakeQuant
from .sensitivity import Runner, _set, find_units, group_nsr, head_groups

CHOICES = (4, 8, 16)
BINS = 4000
KINDS = ("size", "latency")
COST = {"size": "bytes", "latency": "ms"}  # each layer row's cost per precision, per budget kind
HEADS = ("detect", "e2e", "segment", "pose", "obb", "classify")  # role prefixes of the head convs
UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "kib": 1024, "mib": 1024 ** 2}
TIME_UNITS = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 1e-3}  # → ms
_BUDGET = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(?P<unit>[a-z]*|%)")
EXAMPLES = ("e.g. size:2.5MB, size:800KB, size:2500000 (bytes; KB/MB = 1000/1000², KiB/MiB = 1024/1024²), "
            "latency:30ms (also s, us; batch 1 at analyze's imgsz on this machine's INT8 kernels), latency:85% or "
            "size:70% (of the all-8-bit model's)")


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float  # bytes for kind "size", milliseconds for kind "latency"; percent if relative
    text: str
    relative: bool = False  # value is a percentage of the all-8-bit configuration's size or latency


def parse_budget(text: str) -> Budget:
    """``size:2.5MB`` / ``size:800KB`` / ``size:2500000`` → :class:`Budget` (bytes); ``latency:30ms`` /
    ``latency:0.03s`` / ``latency:30`` → milliseconds; ``latency:85%`` / ``size:70%`` → a percentage of the
    all-8-bit configuration's (``relative``). Anything else: FxqatError."""
    if not isinstance(text, str) or ":" not in text:
        raise FxqatError(f"budget={text!r}: give KIND:VALUE, valid kinds: {', '.join(KINDS)} ({EXAMPLES})")
    kind, value = (s.strip() for s in text.lower().split(":", 1))
    if kind not in KINDS:
        raise FxqatError(f"budget={text!r}: unknown kind {kind!r}; valid kinds: {', '.join(KINDS)} ({EXAMPLES})")
    units, what = (UNITS, "size") if kind == "size" else (TIME_UNITS, "latency")
    units = {**units, "%": 1.0}
    m = _BUDGET.fullmatch(value) if value.isascii() else None
    if m is None or m["unit"] not in units:
        raise FxqatError(f"budget={text!r}: {value!r} is not a {what}; {EXAMPLES}")
    v = float(m["num"]) * units[m["unit"]]
    if not math.isfinite(v) or v <= 0:
        raise FxqatError(f"budget={text!r}: the {what} must be positive and finite; {EXAMPLES}")
    return Budget(kind, v, text, relative=m["unit"] == "%")


def mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def show(kind: str, v: float) -> str:
    """A cost in the budget kind's unit: bytes as MB, latency as ms."""
    return mb(v) if kind == "size" else f"{v:.2f} ms"


@dataclass
class BudgetPlan:
    """Per-layer measurements and the knapsack table; :meth:`solve` picks the bits for a budget in the cost unit of
    ``kind`` (bytes for "size", ms for "latency": each layer row then also has ``ms`` {bits: value})."""
    layers: list[dict]  # name, module_path, role, params, scales, nsr {bits: value}, bytes {bits: value}[, ms]
    act_nsr: float  # activation grids alone (weights float): the part no weight choice changes
    fixed_bytes: int  # biases and float parameters: the part of the size no weight choice changes
    choices: tuple[int, ...] = CHOICES
    kind: str = "size"
    fixed_ms: float | None = None  # the latency no weight choice changes (set by the latency measurement)
    _table: tuple | None = field(default=None, repr=False)

    def size(self, bits: dict[str, int]) -> int:
        return self.fixed_bytes + sum(r["bytes"][bits[r["name"]]] for r in self.layers)

    def latency(self, bits: dict[str, int]) -> float:
        return self.fixed_ms + sum(r["ms"][bits[r["name"]]] for r in self.layers)

    def cost(self, bits: dict[str, int]) -> float:
        return self.size(bits) if self.kind == "size" else self.latency(bits)

    def with_kind(self, kind: str) -> BudgetPlan:
        if kind not in KINDS:
            raise FxqatError(f"budget kind {kind!r}: valid kinds: {', '.join(KINDS)}")
        if kind == "latency" and self.fixed_ms is None:
            raise FxqatError("a latency budget needs the per-layer latencies: fxqat.analysis.latency.measure_latency")
        self.kind, self._table = kind, None
        return self

    def resolve(self, budget: Budget) -> float:
        """The budget in this plan's cost unit: a percentage is of the all-8-bit configuration's cost."""
        return budget.value / 100 * self.cost(self.uniform(8)) if budget.relative else budget.value

    def nsr(self, bits: dict[str, int]) -> float:
        return self.act_nsr + sum(r["nsr"][bits[r["name"]]] for r in self.layers)

    def uniform(self, b: int, keep8: tuple[str, ...] = ()) -> dict[str, int]:
        """Every layer at ``b`` bits; layers whose role starts with one of ``keep8`` at 8 bits."""
        return {r["name"]: 8 if keep8 and r["role"].startswith(keep8) else b for r in self.layers}

    @property
    def min_bytes(self) -> int:
        return self.size(self.uniform(min(self.choices)))

    @property
    def max_bytes(self) -> int:
        return self.size(self.uniform(max(self.choices)))

    def _extreme(self, pick) -> dict[str, int]:
        key = COST[self.kind]
        return {r["name"]: pick(self.choices, key=lambda b, r=r: (r[key][b], -b)) for r in self.layers}

    @property
    def min_cost(self) -> float:
        """The cheapest configuration's cost (each layer at its cheapest precision)."""
        return self.cost(self._extreme(min))

    @property
    def max_cost(self) -> float:
        return self.cost(self._extreme(max))

    def check(self, budget: float) -> None:
        if budget >= self.min_cost:
            return
        if self.kind == "size":
            raise FxqatError(f"budget {mb(budget)} ({int(budget)} bytes) is below the smallest feasible "
                             f"size, {mb(self.min_bytes)} ({self.min_bytes} bytes: every layer's weights at "
                             f"{min(self.choices)} bits plus {self.fixed_bytes} bytes of biases and float "
                             "parameters); give at least that")
        raise FxqatError(f"budget {budget:.2f} ms is below the fastest configuration measured, {self.min_cost:.2f} ms "
                         "(every layer at its fastest precision, batch 1 on this machine's INT8 kernels); give at "
                         "least that")

    def _dp(self):
        if self._table is None:
            key = COST[self.kind]
            span = self.max_cost - self.min_cost
            step = max(span / BINS, 1.0 if self.kind == "size" else 1e-6)
            n = int(math.ceil(span / step)) + len(self.layers)  # + rounding slack
            dp = np.zeros(n + 1)  # dp[c]: least NSR over the layers so far with extra cost <= c steps
            pick = np.zeros((len(self.layers), n + 1), dtype=np.int8)
            for i, r in enumerate(self.layers):
                lo = min(r[key].values())
                cand = np.full((len(self.choices), n + 1), np.inf)
                for j, b in enumerate(self.choices):
                    w = int(math.ceil((r[key][b] - lo) / step - 1e-9))
                    cand[j, w:] = dp[:n + 1 - w] + r["nsr"][b]
                pick[i] = cand.argmin(0)
                dp = cand.min(0)
            self._table = (step, dp, pick)
        return self._table

    def solve(self, budget: float) -> dict[str, int]:
        """The bits per layer of least predicted NSR with :meth:`cost` <= ``budget`` (bytes or ms, by ``kind``)."""
        self.check(budget)
        key = COST[self.kind]
        step, _, pick = self._dp()
        c = min(int((budget - self.min_cost) // step), pick.shape[1] - 1)
        bits: dict[str, int] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            r = self.layers[i]
            b = self.choices[pick[i, c]]
            bits[r["name"]] = b
            c -= int(math.ceil((r[key][b] - min(r[key].values())) / step - 1e-9))
        return {r["name"]: bits[r["name"]] for r in self.layers}

    def frontier(self, points: int = 40) -> list[dict]:
        """Solutions for ``points`` budgets from the cheapest to the dearest configuration: cost, predicted NSR and
        SQNR (dB)."""
        lo, hi = self.min_cost, self.max_cost
        return [self.point(self.solve(lo + t * (hi - lo))) for t in np.linspace(0, 1, points)]

    def point(self, bits: dict[str, int]) -> dict:
        n = self.nsr(bits)
        p = {"size_bytes": self.size(bits), "nsr": n, "sqnr_db": -10 * math.log10(max(n, 1e-20)),
             "counts": {b: sum(v == b for v in bits.values()) for b in self.choices}}
        if self.fixed_ms is not None:
            p["latency_ms"] = self.latency(bits)
        return p


def sizes(gm, choices=CHOICES) -> BudgetPlan:
    """The costs alone (no NSRs yet): each weight-quantized layer's bytes per precision, and the fixed bytes."""
    layers, in_units, fixed = [], set(), 0
    for u in find_units(gm):
        m = gm.get_submodule(u.module_path)
        if m.weight_fq is None:
            continue
        in_units.update(f"{u.module_path}.{k}" for k, _ in m.named_parameters())
        params, scales = m.conv.weight.numel(), m.weight_fq.scale.numel()
        fixed += 4 * m.conv.weight.shape[0]  # the folded bias, float32
        layers.append({"name": u.name, "module_path": u.module_path, "role": u.role, "params": params,
                       "scales": scales, "nsr": {}, "bytes": {b: -(-params * b // 8) + 4 * scales for b in choices}})
    fixed += 4 * sum(p.numel() for k, p in gm.named_parameters() if k not in in_units and not k.endswith("scale"))
    return BudgetPlan(layers, 0.0, fixed, tuple(choices))


@torch.no_grad()
def measure(gm, images: torch.Tensor, choices=CHOICES, progress: bool = True) -> BudgetPlan:
    """Per-layer head-output NSR at each weight precision ("alone", see the module doc) on a calibrated graph."""
    from tqdm.auto import tqdm

    gm.eval()
    plan = sizes(gm, choices)
    units = [u for u in find_units(gm) if u.weight_fq is not None]
    all_fq = [m for m in gm.modules() if isinstance(m, FakeQuant)]
    weight_fq = {id(u.weight_fq) for u in units}
    runner = Runner(gm, list(head_groups(gm).values()))
    _set(all_fq, False)
    ref = runner.run_from(images, keep=True)
    float_cache = runner.cache
    acts = [m for m in all_fq if id(m) not in weight_fq]
    _set(acts, True)
    runner.cache = None
    plan.act_nsr = group_nsr(ref, runner.run_from(images))
    _set(acts, False)
    bar = tqdm(total=len(units) * len(choices), desc="budget", disable=not progress, unit="choice")
    for u, row in zip(units, plan.layers):
        m = gm.get_submodule(u.module_path)
        orig = m.weight_fq
        for b in choices:
            m.set_weight_spec(orig.spec.with_(bits=b))
            m.weight_fq.to(m.conv.weight.device)
            runner.cache = float_cache
            row["nsr"][b] = group_nsr(ref, runner.run_from(images, u.first))
            bar.update()
        m.weight_fq = orig
    bar.close()
    _set(all_fq, True)
    return plan


def budget_yaml(plan: BudgetPlan, bits: dict[str, int], base, budget: Budget, measured_db: float | None = None,
                value: float | None = None) -> str:
    """A qconfig (``base`` plus one exact-name rule per layer) that ``fxqat.prepare_qat`` / ``fxqat qat`` take."""
    from ..qconfig.io import dump_qconfig

    p = plan.point(bits)
    counts = ", ".join(f"{n} layers at {b} bits" for b, n in p["counts"].items() if n)
    latency = f", predicted latency {p['latency_ms']:.2f} ms" if "latency_ms" in p else ""
    if value is None and not budget.relative:
        value = budget.value
    within = show(budget.kind, value) if value is not None else budget.text
    header = (f"# Generated by fxqat.analyze budget={budget.text}: one weight precision per layer, chosen to minimize\n"
              f"# the predicted head-output error within {within}.\n"
              f"# chosen: {counts}\n"
              f"# predicted size {mb(p['size_bytes'])} ({p['size_bytes']} bytes){latency}, predicted head NSR "
              f"{p['nsr']:.3e} (SQNR {p['sqnr_db']:.2f} dB)"
              + (f", measured {measured_db:.2f} dB" if measured_db is not None else "") + "\n"
              "#   fxqat.prepare_qat(model, qconfig='budget_qconfig.yaml')  or  fxqat qat ... qconfig=budget_qconfig.yaml\n"
              + ("# note: 16-bit layers run in float in fxqat.convert's INT8 model (its kernels take weights of at most "
                 "8 bits)\n" if p["counts"].get(16) else ""))
    rules = [{"match": {"name": r["name"]}, "weight": {"bits": bits[r["name"]]}} for r in plan.layers]
    return dump_qconfig(base, rules, header)


AXES = {"size": ("size_bytes", 1e-6, "model size (MB: weights at their bits + scales + float biases)"),
        "latency": ("latency_ms", 1.0, "predicted latency (ms, batch 1, this machine's INT8 kernels)")}


def plot_frontier(front: list[dict], marks: dict[str, dict], path, kind: str = "size") -> None:
    """Predicted head SQNR vs the budget's cost (size or latency) of the solutions considered; ``marks``: label →
    point (``measured_db`` too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, k, xlabel = AXES[kind]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[key] * k for p in front], [p["sqnr_db"] for p in front], ".-", color="#1f77b4",
            label="budget solutions (predicted)")
    styles = {"chosen": ("*", "#d62728", 14), "uniform W8": ("s", "#2ca02c", 8), "uniform W4": ("v", "#9467bd", 8)}
    for label, p in marks.items():
        mk, col, size = styles.get(label, ("o", "#7f7f7f", 8))
        ax.plot([p[key] * k], [p["sqnr_db"]], mk, color=col, ms=size, label=f"{label} (predicted)")
        if p.get("measured_db") is not None:
            ax.plot([p[key] * k], [p["measured_db"]], mk, mfc="none", color=col, ms=size,
                    label=f"{label} (measured)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("head-output SQNR (dB)")
    ax.set_title(f"mixed-precision frontier: accuracy proxy vs {kind}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_budget(gm, model, base, images: torch.Tensor, budget: Budget, progress: bool = True,
               rounds: int = 15) -> dict:
    """Measure (:func:`measure`; for a latency budget also :func:`.latency.measure_latency`), choose for ``budget``,
    write the qconfig text and check it: the chosen configuration and uniform W8 / W4 references are prepared,
    calibrated and their head SQNR measured (a latency budget: also converted and their forwards timed)."""
    import fxqat

    from .latency import forward_ms, measure_latency
    from .sensitivity import head_sqnr

    plan = measure(gm, images, progress=progress)
    batches = [images[i:i + 8] for i in range(0, len(images), 8)]

    def prepared(b):
        q = fxqat.prepare_qat(model, fxqat.load_qconfig(budget_yaml(plan, b, base, budget)))
        fxqat.calibrate(q, batches, progress=False)
        return q

    timing = None
    if budget.kind == "latency":
        timing = measure_latency(plan, lambda b: fxqat.convert(prepared(b)), images, rounds=rounds,
                                 progress=progress)
    plan.with_kind(budget.kind)
    value = plan.resolve(budget)  # bytes or ms
    bits = plan.solve(value)
    refs = {"uniform W8": plan.uniform(8), "uniform W4": plan.uniform(4),
            "W4, first conv + head 8-bit": plan.uniform(4, ("first_conv",) + HEADS)}
    points, converted = {}, {}
    for label, b in [("chosen", bits)] + list(refs.items()):
        q = prepared(b)
        points[label] = {**plan.point(b), "measured_db": head_sqnr(q, images)}
        if timing is not None:
            converted[label] = fxqat.convert(q)
    if timing is not None:  # the real forwards of the converted models, interleaved: the prediction's check
        for label, t in zip(converted, forward_ms(list(converted.values()), images[:1], rounds=rounds)):
            points[label]["measured_ms"] = t["median_ms"]
            points[label]["measured_ms_spread"] = [t["min_ms"], t["max_ms"]]
    text = budget_yaml(plan, bits, base, budget, points["chosen"]["measured_db"], value)
    chosen = points["chosen"]
    unit = COST[budget.kind]
    return {"budget": budget.text, "kind": budget.kind, "budget_value": value, "unit": unit,
            "budget_percent": budget.value if budget.relative else None,
            **({"budget_bytes": value} if budget.kind == "size" else {"budget_ms": value}),
            "bits": bits, "size_bytes": chosen["size_bytes"], "latency_ms": chosen.get("latency_ms"),
            "measured_ms": chosen.get("measured_ms"), "nsr": chosen["nsr"], "sqnr_db": chosen["sqnr_db"],
            "measured_sqnr_db": chosen["measured_db"], "counts": chosen["counts"], "act_nsr": plan.act_nsr,
            "fixed_bytes": plan.fixed_bytes, "fixed_ms": plan.fixed_ms, "min_bytes": plan.min_bytes,
            "max_bytes": plan.max_bytes, "min_cost": plan.min_cost, "max_cost": plan.max_cost, "timing": timing,
            "method": f"alone NSR per layer and precision, summed; exact DP over {BINS} {unit} bins (costs rounded up)",
            "references": points, "frontier": plan.frontier(), "layers": plan.layers, "qconfig": text}


def write_budget(result: dict, out) -> dict:
    """``budget_qconfig.yaml``, ``budget.json`` (everything but the YAML text) and ``frontier.png`` in ``out``."""
    import json
    from pathlib import Path

    out = Path(out)
    (out / "budget_qconfig.yaml").write_text(result["qconfig"])
    (out / "budget.json").write_text(json.dumps({k: v for k, v in result.items() if k != "qconfig"}, indent=2))
    marks = {k: v for k, v in result["references"].items() if k in ("chosen", "uniform W8", "uniform W4")}
    plot_frontier(result["frontier"], marks, out / "frontier.png", result["kind"])
    return {"budget_qconfig": out / "budget_qconfig.yaml", "budget_json": out / "budget.json",
            "frontier": out / "frontier.png"}


def budget_table(result: dict) -> str:
    """A few lines for the CLI: the chosen point and the references, predicted and measured."""
    lat = result["kind"] == "latency"
    lines = [f"budget {result['budget']}: {', '.join(f'{n} layers at {b} bits' for b, n in result['counts'].items())}",
             f"{'configuration':<30}{'size':>12}" + (f"{'latency':>10}{'measured':>10}" if lat else "")
             + f"{'predicted':>12}{'measured':>11}"]
    for label, p in result["references"].items():
        ms = f"{p['latency_ms']:>7.2f} ms{p['measured_ms']:>7.2f} ms" if lat else ""
        lines.append(f"{label:<30}{mb(p['size_bytes']):>12}{ms}{p['sqnr_db']:>9.2f} dB{p['measured_db']:>8.2f} dB")
    return "\n".join(lines)

"""Histograms and SQNR per node from a few calibration images: FP32 vs fake-quant, computed in one walk.

The graph runs twice side by side, node by node: once with every quantizer off (FP32) and once as configured
(fake-quant). For each tensor node the page gets both values' histograms over one shared range (``BINS`` bins;
counts sum to the tensor's element count over all images) and

* ``sqnr_db``: the node's value in the fake-quant run vs FP32 (every error upstream included; a producer is read
  after its own quantizer, the value its consumers see);
* ``act_sqnr_db``: the node's own quantizer alone on the FP32 value (local rounding and clipping error).

Weights of quantized convs: the BN-folded weight vs its fake-quantized copy, and their SQNR. A value is freed as soon
as its last user ran, so memory stays at a forward pass's working set (twice).
"""

from __future__ import annotations

import math

import torch
from torch import fx
from tqdm.auto import tqdm

from ..quant.fake_quant import FakeQuant, fake_quants
from .records import num

BINS = 64


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float | None:
    sig = float(torch.linalg.vector_norm(ref.float()))
    if sig == 0.0:
        return None
    noise = max(float(torch.linalg.vector_norm(ref.float() - x.float())), 1e-30)
    return num(min(20 * math.log10(sig / noise), 200.0))


def _range(v: torch.Tensor) -> tuple[float, float]:
    lo, hi = torch.aminmax(v)
    return float(lo), float(hi)


def histogram(a: torch.Tensor, b: torch.Tensor | None, bins: int = BINS) -> dict:
    """Counts of ``a`` (and ``b``) over one range covering both: ``{"lo", "hi", "a", "b", "n"}``."""
    vals = [a.detach().float()] + ([] if b is None else [b.detach().float()])
    ranges = [_range(v) for v in vals]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # count the finite values only
        vals = [v[torch.isfinite(v)] for v in vals]
        ranges = [_range(v) for v in vals if v.numel()]
        lo, hi = min((r[0] for r in ranges), default=0.0), max((r[1] for r in ranges), default=0.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    out = {"lo": num(lo), "hi": num(hi), "n": int(a.numel())}
    for key, v in zip("ab", vals):
        # bins of width (hi - lo) / bins from lo; the top edge belongs to the last bin; every finite value counts
        if v.numel() < 2 ** 24:  # float32 counts are exact below 2^24
            out[key] = [int(c) for c in torch.histc(v, bins, lo, hi).tolist()]
        else:
            idx = ((v.reshape(-1).double() - lo) * (bins / (hi - lo))).floor().clamp(0, bins - 1).long()
            out[key] = torch.bincount(idx, minlength=bins).tolist()
    return out


def shape_of(v) -> str:
    """The value's shape per image (batch dimension shown as 1), as fxqat.summary writes shapes."""
    if torch.is_tensor(v):
        return "x".join(str(d) for d in ((1, *v.shape[1:]) if v.dim() else ()))
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(shape_of(x) for x in v) + ")"
    return ""


class _State:
    """Turns every quantizer off (FP32) or restores the configured state. Weight quantizers take their grid from
    the folded weights once, here, instead of at each of the walk's two forward passes (same weights, same grid)."""

    def __init__(self, gm: fx.GraphModule):
        self.fqs = fake_quants(gm)
        self.saved = [fq.fake_quant_enabled for fq in self.fqs]
        self.weight_fqs = []
        for m in gm.modules():
            wfq = getattr(m, "weight_fq", None)
            if isinstance(wfq, FakeQuant) and wfq.always_observe and hasattr(m, "folded"):
                wfq.observe(m.folded()[0])
                wfq.always_observe = False
                self.weight_fqs.append(wfq)

    def restore(self):
        self.quant()
        for wfq in self.weight_fqs:
            wfq.always_observe = True

    def fp32(self):
        for fq in self.fqs:
            object.__setattr__(fq, "fake_quant_enabled", False)  # a plain flag: skip nn.Module's __setattr__

    def quant(self):
        for fq, s in zip(self.fqs, self.saved):
            object.__setattr__(fq, "fake_quant_enabled", s)


@torch.no_grad()
def node_stats(gm: fx.GraphModule, images: torch.Tensor, progress: bool = True) -> dict[str, dict]:
    """``{node name: {"shape", "act": histogram, "sqnr_db", "act_sqnr_db", "weight": histogram, "weight_sqnr_db"}}``."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    state = _State(gm)
    interp = fx.Interpreter(gm)
    was_training = gm.training
    gm.eval()
    envs: tuple[dict, dict] = ({}, {})
    quant_of = {}  # producer → the quantizer node reading it (its statistics are taken there, once)
    for n in nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuant) and n.args and \
                isinstance(n.args[0], fx.Node):
            quant_of.setdefault(n.args[0], n)
    out: dict[str, dict] = {}
    try:
        for n in tqdm(nodes, desc="histograms", disable=not progress, unit="node"):
            if n.op == "output":
                break
            vals = []
            for env, mode in zip(envs, (state.fp32, state.quant)):
                if n.op == "call_module":  # only modules hold quantizers
                    mode()
                if n.op == "placeholder":
                    v = images
                else:
                    interp.env = env
                    args, kwargs = interp.fetch_args_kwargs_from_env(n)
                    v = getattr(interp, n.op)(n.target, args, kwargs)
                env[n] = v
                vals.append(v)
            f, q = vals
            m = gm.get_submodule(n.target) if n.op == "call_module" else None
            rec = out.setdefault(n.name, {"shape": shape_of(f)})
            if torch.is_tensor(f) and f.is_floating_point() and n not in quant_of:
                rec["act"] = histogram(f, q)
                rec["sqnr_db"] = sqnr_db(f, q)
                if isinstance(m, FakeQuant):
                    rec["act_sqnr_db"] = sqnr_db(f, m.fake_quant(f))
                    src = n.args[0]  # the producer's panel shows its value as its consumers see it
                    if isinstance(src, fx.Node) and quant_of.get(src) is n:
                        out[src.name].update({k: rec[k] for k in ("act", "sqnr_db", "act_sqnr_db")})
            wfq = getattr(m, "weight_fq", None)
            if isinstance(wfq, FakeQuant) and hasattr(m, "folded"):
                w = m.folded()[0]
                wq = wfq.fake_quant(w)
                rec = out.setdefault(n.name, {})
                rec["weight"] = histogram(w, wq)
                rec["weight_sqnr_db"] = sqnr_db(w, wq)
            for a in n.all_input_nodes:  # free values no later node reads
                if last_use[a] <= index[n]:
                    for env in envs:
                        env.pop(a, None)
    finally:
        state.restore()
        gm.train(was_training)
    return out

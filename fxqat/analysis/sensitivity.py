"""Sensitivity sweeps on a calibrated QAT graph.

Units are the quantized convs: a unit is the conv's weight quantizer plus the activation quantizer of the grid its
output lands on. For every unit fxqat measures, on the calibration images,

* ``weight_sqnr`` / ``act_sqnr``: local quantization error of its weights and of its output (dB, higher = better);
* ``alone_nsr``: head-output noise-to-signal ratio vs FP32 with ONLY this unit quantized;
* ``gain``: how much of the fully-quantized model's head-output noise disappears when ONLY this unit stays float.

The head output is Detect's box and class maps; a segment / pose / OBB model adds its own outputs (mask
coefficients and prototypes, keypoints, angle logits: ``fxqat.tasks.TaskSpec.outputs``), each measured as a
separate group: the noise-to-signal ratio is the mean of the groups' ratios, so a small output (the angle) counts as
much as a large one (the prototypes). ``summary["outputs_sqnr_db"]`` has each group's SQNR.

Each measurement re-runs just the part of the graph downstream of the unit, starting from cached activations of the
float (or fully quantized) run, so a sweep costs about half a forward pass per unit and mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.meta import info
from ..graph.registry import op_kind
from ..modules.conv_bn_act import ConvBnAct
from ..passes.insert_quantizers import grid_of
from ..quant.fake_quant import FakeQuant


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    noise = (ref - x).float().pow(2).sum()
    sig = ref.float().pow(2).sum()
    return float(10 * torch.log10(sig / noise.clamp_min(1e-20)))


def nsr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float((ref - x).float().pow(2).sum() / ref.float().pow(2).sum().clamp_min(1e-20))


@dataclass
class Unit:
    name: str  # conv node name
    module_path: str
    role: str
    layer: int | None
    weight_fq: FakeQuant | None
    act_fq: FakeQuant | None
    act_path: str | None
    first: int  # index of the first node whose output changes when the unit is toggled




def head_groups(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Head-output groups: "detect" (box and class maps) and each of the task's own output roles (a classify
    model: its logits only)."""
    from ..tasks import ONE2ONE_ROLES, spec

    nodes = list(gm.graph.nodes)
    task = getattr(gm, "meta", {}).get("task", "detect")
    detect = head_roles(gm)  # the deployed branch set (an end-to-end model's one-to-one path)
    groups = {} if task == "classify" else {"detect": [n for n in nodes if info(n).role in detect]}
    one2one = getattr(gm, "meta", {}).get("end2end", False)
    for role in spec(task).outputs:
        role = ONE2ONE_ROLES.get(role, role) if one2one else role  # YOLO26 on its one-to-one path
        groups[role] = [n for n in nodes if info(n).role == role]
    missing = [k for k, v in groups.items() if not v]
    if missing:
        raise ValueError(f"no head outputs found for {missing} (roles {', '.join(detect)} and the task's)")
    return groups


def group_nsr(ref: list[torch.Tensor], x: list[torch.Tensor]) -> float:
    """Mean noise-to-signal ratio over head-output groups (one group: :func:`nsr`)."""
    return sum(nsr(r, y) for r, y in zip(ref, x)) / len(ref)


def group_sqnr_db(ref: list[torch.Tensor], x: list[torch.Tensor]) -> float:
    if len(ref) == 1:
        return sqnr_db(ref[0], x[0])
    return float(-10 * torch.log10(torch.tensor(max(group_nsr(ref, x), 1e-20))))


class Runner(fx.Interpreter):
    """Runs ``gm`` from node index ``start`` with earlier values taken from ``cache``; returns the head outputs, one
    flattened tensor per group."""

    def __init__(self, gm: fx.GraphModule, head: list[list[fx.Node]]):
        super().__init__(gm)
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.head = head
        self.cache: dict[fx.Node, object] | None = None

    def run_from(self, x: torch.Tensor, start: int = 0, keep: bool = False) -> list[torch.Tensor]:
        env: dict[fx.Node, object] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "output":
                break
            if i < start and self.cache is not None:
                env[n] = self.cache[n]
                continue
            if n.op == "placeholder":
                env[n] = x
                continue
            self.env = env
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            env[n] = getattr(self, n.op)(n.target, args, kwargs)
        if keep:
            self.cache = env
        return [torch.cat([env[h].flatten(1) for h in group], 1) for group in self.head]


def find_units(gm: fx.GraphModule) -> list[Unit]:
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    by_path: dict[str, list[int]] = {}
    for n in nodes:
        if n.op == "call_module" and op_kind(gm, n) == "quant":
            by_path.setdefault(n.target, []).append(index[n])
    units = []
    for n in nodes:
        if n.op != "call_module" or not isinstance(gm.get_submodule(n.target), ConvBnAct):
            continue
        m = gm.get_submodule(n.target)
        path = grid_of(n)
        act = gm.get_submodule(path) if path else None
        if m.weight_fq is None and act is None:
            continue
        first = min([index[n]] + (by_path.get(path, []) if path else []))
        units.append(Unit(n.name, info(n).module_path, info(n).role or "conv", info(n).layer, m.weight_fq, act, path,
                          first))
    return units


def _set(fqs, enabled: bool) -> None:
    for fq in fqs:
        if fq is not None:
            fq.fake_quant_enabled = enabled


def head_roles(gm: fx.GraphModule) -> tuple[str, str]:
    """Roles of the head outputs measured: the deployed branch set's last convs — an end-to-end model on its
    one-to-one path (``gm.meta["end2end"]``) is measured at ``e2e.box_last`` / ``e2e.cls_last``."""
    if getattr(gm, "meta", {}).get("end2end"):
        return ("e2e.box_last", "e2e.cls_last")
    return ("detect.box_last", "detect.cls_last")


@torch.no_grad()
def sweep(gm: fx.GraphModule, images: torch.Tensor, progress: bool = True) -> tuple[list[dict], dict]:
    """Per-unit local SQNRs and end-to-end sensitivities (see module doc). ``gm`` must be calibrated."""
    from tqdm.auto import tqdm

    gm.eval()
    groups = head_groups(gm)
    units = find_units(gm)
    all_fq = [m for m in gm.modules() if isinstance(m, FakeQuant)]
    runner = Runner(gm, list(groups.values()))

    _set(all_fq, False)
    ref = runner.run_from(images, keep=True)  # FP32 reference, activations cached
    float_cache = runner.cache
    rows = {u.name: {"name": u.name, "module_path": u.module_path, "role": u.role, "layer": u.layer,
                     "quantizer": u.act_path} for u in units}
    bar = tqdm(total=2 * len(units), desc="sensitivity", disable=not progress, unit="layer")
    for u in units:  # local errors and "quantized alone"
        r = rows[u.name]
        if u.weight_fq is not None:
            w, _ = gm.get_submodule(u.module_path).folded()
            u.weight_fq.fake_quant_enabled = True
            r["weight_sqnr"] = sqnr_db(w, u.weight_fq(w))
            u.weight_fq.fake_quant_enabled = False
        if u.act_fq is not None:
            conv_node = next(n for n in gm.graph.nodes if n.name == u.name)
            out = float_cache[conv_node]
            u.act_fq.fake_quant_enabled = True
            r["act_sqnr"] = sqnr_db(out, u.act_fq(out))
            u.act_fq.fake_quant_enabled = False
        _set([u.weight_fq, u.act_fq], True)
        runner.cache = float_cache
        r["alone_nsr"] = group_nsr(ref, runner.run_from(images, u.first))
        _set([u.weight_fq, u.act_fq], False)
        bar.update()

    _set(all_fq, True)
    runner.cache = None
    full = runner.run_from(images, keep=True)
    total = group_nsr(ref, full)
    for u in units:  # "all quantized but this one"
        _set([u.weight_fq, u.act_fq], False)
        rest = group_nsr(ref, runner.run_from(images, u.first))
        _set([u.weight_fq, u.act_fq], True)
        rows[u.name]["gain"] = (total - rest) / total if total > 0 else 0.0
        bar.update()
    bar.close()
    out = list(rows.values())
    for r in out:
        r["score"] = max(r["gain"], 0.0) + r["alone_nsr"] / max(total, 1e-20) * 0.5
    summary = {"head_sqnr_db": group_sqnr_db(ref, full), "head_nsr": total, "units": len(units),
               "outputs_sqnr_db": {k: sqnr_db(r, y) for k, r, y in zip(groups, ref, full)}}
    return out, summary


@torch.no_grad()
def head_sqnr(gm: fx.GraphModule, images: torch.Tensor) -> float:
    """Head-output SQNR (dB) of ``gm`` as configured vs the same graph with every quantizer off."""
    gm.eval()
    runner = Runner(gm, list(head_groups(gm).values()))
    fqs = [m for m in gm.modules() if isinstance(m, FakeQuant)]
    states = [m.fake_quant_enabled for m in fqs]
    _set(fqs, False)
    ref = runner.run_from(images)
    for m, s in zip(fqs, states):
        m.fake_quant_enabled = s
    return group_sqnr_db(ref, runner.run_from(images))

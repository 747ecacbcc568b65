"""Distributed QAT with ``torch.distributed`` (DDP): gradients are averaged by DDP; quantizer and BatchNorm state
is kept identical across ranks by :func:`sync_quant_state` after every optimizer step.

* min/max observers: element-wise MIN / MAX across ranks (the union of every rank's data);
* moving-average observers and BN running statistics: mean across ranks;
* scales and zero-points are then recomputed from the synced observers on every rank.

``python -m fxqat.distributed`` (or :func:`run_ddp`) runs a small QAT job on N CPU ranks with the gloo backend;
under ``torchrun`` call :func:`ddp_qat` from each rank.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .data.toy import toy_batch
from .quant.fake_quant import FakeQuant


@torch.no_grad()
def sync_quant_state(model: nn.Module) -> None:
    """Make every rank's quantizer ranges and BN statistics identical (see module doc)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for m in model.modules():
        if isinstance(m, FakeQuant):
            obs = m.observer
            if hasattr(obs, "min_val") and obs.min_val.numel() and m.observe_enabled:
                if m.spec.observer == "minmax":
                    dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN)
                    dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX)
                else:
                    dist.all_reduce(obs.min_val)
                    dist.all_reduce(obs.max_val)
                    obs.min_val /= world
                    obs.max_val /= world
                scale, zp = obs.calculate_qparams()
                m.scale.data.copy_(scale.reshape(-1).clamp_min(1e-8).expand_as(m.scale)
                                   if scale.numel() == 1 else scale.reshape(-1).clamp_min(1e-8))
                m.zero_point.copy_(zp.to(m.zero_point).reshape(-1).expand_as(m.zero_point))
            flag = m.initialized.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            m.initialized.fill_(bool(flag))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            dist.all_reduce(m.running_mean)
            dist.all_reduce(m.running_var)
            m.running_mean /= world
            m.running_var /= world


def ddp_qat(rank: int, world: int, model: str = "yolov8n.yaml", steps: int = 3, imgsz: int = 64, batch: int = 2,
            out: str | None = None, port: int = 29531) -> dict:
    """One rank of a DDP QAT run (gloo, CPU). Returns this rank's final state_dict (and saves it to ``out``)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    from .models import load_model
    from .passes.pipeline import prepare_qat

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        det = load_model(model, nc=10)
        det.args = get_cfg()
        crit = v8DetectionLoss(det)
        x0, _ = toy_batch(batch, imgsz, seed=100 + rank)
        gm = prepare_qat(det, example_inputs=(x0,))
        sync_quant_state(gm)
        gm.train()
        ddp = nn.parallel.DistributedDataParallel(gm, broadcast_buffers=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
        for step in range(steps):
            x, tgt = toy_batch(batch, imgsz, seed=1000 * rank + step)  # each rank sees different data
            opt.zero_grad()
            loss, _ = crit(ddp(x), tgt)
            loss.sum().backward()
            opt.step()
            sync_quant_state(gm)
        state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        if out:
            torch.save(state, Path(out) / f"rank{rank}.pt")
        return state
    finally:
        dist.destroy_process_group()


def run_ddp(world: int = 2, steps: int = 3, out: str | None = None, port: int = 29531) -> Path:
    """Spawn ``world`` CPU ranks running :func:`ddp_qat`; returns the folder holding ``rank<i>.pt``."""
    import torch.multiprocessing as tmp

    out = Path(out or tempfile.mkdtemp(prefix="fxqat_ddp_"))
    out.mkdir(parents=True, exist_ok=True)
    tmp.spawn(_spawned, args=(world, steps, str(out), port), nprocs=world, join=True)
    return out


def _spawned(rank: int, world: int, steps: int, out: str, port: int) -> None:
    torch.set_num_threads(1)
    ddp_qat(rank, world, steps=steps, out=out, port=port)


if __name__ == "__main__":
    folder = run_ddp()
    from .checkpoint import load_file

    states = [load_file(folder / f"rank{i}.pt", fxqat_only=True) for i in range(2)]
    same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    print(f"2 ranks, identical weights and quantizer state: {same} ({folder})")

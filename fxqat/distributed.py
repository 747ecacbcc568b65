"""Distributed QAT (DDP) through the Ultralytics trainer: devices, process groups, launching, quantizer-state sync.

``fxqat qat MODEL data=D.yaml device=0,1`` (one process per GPU, NCCL) or ``device=cpu nproc=2`` (two gloo ranks on
the CPU) re-launches itself under ``torch.distributed.run``; ``torchrun --nproc_per_node=N -m fxqat.cli qat ...``
(or any launcher that sets ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``) runs the ranks directly. Every rank rebuilds
the same QAT graph (prepare + calibrate), the Ultralytics trainer shards the data with its distributed sampler and
DDP averages the gradients; :func:`sync_quant_state` keeps quantizer ranges and BN statistics identical across ranks
after every training batch, in at most three collectives whatever the model size:

* one MIN all-reduce: min/max observers' ``min_val`` and ``-max_val`` (the union of every rank's data) and the
  quantizers' ``initialized`` flags;
* one SUM all-reduce (then / world): moving-average and percentile observers' ranges, BN running statistics;
* one broadcast from rank 0, only if the model has histogram or MSE observers (their histograms cannot be merged:
  their ranges follow rank 0's data).

Weight quantizers are left out: they re-observe the weights, which DDP keeps identical, on every forward. Scales and
zero-points are then recomputed from the synced observers on every rank (a learned LSQ scale is a parameter: DDP
syncs its gradient). ``python -m fxqat.distributed ARGS`` is ``fxqat qat ARGS``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import FxqatError
from .quant.fake_quant import FakeQuant

MINMAX_KINDS = ("minmax",)
MEAN_KINDS = ("moving_average", "percentile")


# ----------------------------------------------------------------------------------------------- quantizer state sync
def _buckets(model: nn.Module):
    """(MIN bucket as (tensor, sign) pairs, SUM-bucket tensors, broadcast tensors, quantizers to refresh)."""
    lo, mean, bcast, refresh = [], [], [], []
    for m in model.modules():
        if isinstance(m, FakeQuant):
            if m.spec.fixed is not None or m.always_observe:
                continue
            lo.append((m.initialized, 1.0))
            obs = m.observer
            if not m.observe_enabled or not hasattr(obs, "min_val") or not obs.min_val.numel():
                continue
            if m.spec.observer in MINMAX_KINDS:
                lo += [(obs.min_val, 1.0), (obs.max_val, -1.0)]  # MIN of -max_val is -(MAX of max_val)
            elif m.spec.observer in MEAN_KINDS:
                mean += [obs.min_val, obs.max_val]
            else:
                bcast += list(obs.buffers())
            if not m.spec.learnable:
                refresh.append(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            mean += [m.running_mean, m.running_var]
    return lo, mean, bcast, refresh


def _flat(tensors, signs=None) -> torch.Tensor:
    """One float64 vector of ``tensors`` (times ``signs``): float32 ranges and 0/1 flags are exact in it."""
    parts = [t.detach().reshape(-1).double() for t in tensors]
    if signs is not None:
        parts = [p * s for p, s in zip(parts, signs)]
    return torch.cat(parts)


def _unflat(flat: torch.Tensor, tensors, signs=None) -> None:
    i = 0
    for k, t in enumerate(tensors):
        n = t.numel()
        v = flat[i:i + n]
        if signs is not None:
            v = v * signs[k]
        t.copy_(v.reshape(t.shape).to(t.dtype))
        i += n


@torch.no_grad()
def sync_quant_state(model: nn.Module, group=None) -> int:
    """Make every rank's quantizer ranges and BN statistics identical (see the module doc). Returns the number of
    collectives issued (0 without a process group of more than one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    world = dist.get_world_size(group)
    lo, mean, bcast, refresh = _buckets(model)
    n = 0
    if lo:  # MIN of (min_val, -max_val, initialized): one collective for both ends of every min/max range
        tensors, signs = [t for t, _ in lo], [s for _, s in lo]
        buf = _flat(tensors, signs)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN, group=group)
        _unflat(buf, tensors, signs)
        for m in model.modules():
            if isinstance(m, FakeQuant):
                m._ready = False  # ``initialized`` may have changed: re-read it
        n += 1
    if mean:
        buf = _flat(mean)
        dist.all_reduce(buf, group=group)
        _unflat(buf / world, mean)
        n += 1
    if bcast:
        buf = _flat(bcast)
        dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        _unflat(buf, bcast)
        n += 1
    for m in refresh:
        if bool(m.initialized):
            m.refresh_qparams()
    return n


# --------------------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Plan:
    """Where a QAT run trains: ``kind`` cpu | cuda, ``ids`` the CUDA device ids, ``world`` the number of ranks."""

    kind: str
    ids: tuple[int, ...]
    world: int

    @property
    def backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"


def plan_devices(device=None, nproc: int | None = None, cuda_available: bool | None = None) -> Plan:
    """Read ``device`` (Ultralytics' convention: ``cpu``, ``0``, ``0,1``, ``cuda:0``; None: GPU 0 if there is one,
    else the CPU) and ``nproc`` (processes; for the CPU, the number of gloo ranks)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if nproc is not None and (isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1):
        raise FxqatError(f"nproc={nproc!r}: a positive number of processes")
    text = "" if device is None else str(device).strip().lower().replace(" ", "")
    if text in ("", "none"):
        text = "0" if cuda else "cpu"
    if text.startswith("cuda:"):
        text = text[5:]
    if text in ("cpu", "-1"):
        return Plan("cpu", (), nproc or 1)
    parts = text.split(",")
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise FxqatError(f"device={device!r}: give cpu, a GPU index (0) or distinct GPU indices (0,1,2,3)")
    ids = tuple(int(p) for p in parts)
    if not cuda:
        raise FxqatError(f"device={device!r}: this machine has no CUDA GPU; use device=cpu (and nproc=N for N "
                         "CPU ranks)")
    if ids[-1] >= torch.cuda.device_count() and cuda_available is None:
        raise FxqatError(f"device={device!r}: GPU {max(ids)} does not exist ({torch.cuda.device_count()} visible)")
    if nproc is not None and nproc != len(ids):
        raise FxqatError(f"nproc={nproc} with device={device}: one process per GPU, so nproc must be {len(ids)} "
                         "(or omitted)")
    return Plan("cuda", ids, len(ids))


def launched_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) set by a launcher (torchrun, SLURM via torchrun); (1, 0, 0) without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, 0
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device=None, nproc: int | None = None) -> tuple[torch.device, str, Plan]:
    """Join the launcher's process group if there is one. Returns (this rank's torch device, the ``device`` string for
    this rank's Ultralytics trainer, the plan). Without a launcher a plan of several ranks is an error: only the CLI
    launches workers (:func:`launch`)."""
    world, rank, local = launched_world()
    if world > 1:
        if device is None and nproc is None:
            device = "0" if torch.cuda.is_available() else "cpu"
        if nproc is not None and nproc != world:
            raise FxqatError(f"nproc={nproc}, but the launcher started {world} processes; omit nproc under torchrun")
        plan = plan_devices(device, None)
        if plan.kind == "cuda" and plan.world == 1 and world > 1:  # torchrun without device= list: GPU = local rank
            plan = Plan("cuda", tuple(range(world)), world)
        if plan.kind == "cuda" and local >= len(plan.ids):
            raise FxqatError(f"device={device}: names {len(plan.ids)} GPUs but the launcher started local rank "
                             f"{local}; give one GPU per process")
        plan = Plan(plan.kind, plan.ids, world)
        dev = torch.device("cuda", plan.ids[local]) if plan.kind == "cuda" else torch.device("cpu")
        if plan.kind == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(plan.backend, rank=rank, world_size=world,
                                    device_id=dev if plan.kind == "cuda" else None)
        if rank == 0:
            print(f"DDP: world size {world} ({plan.backend}, {plan.kind})", flush=True)
        return dev, (str(dev.index) if plan.kind == "cuda" else "cpu"), plan
    plan = plan_devices(device, nproc)
    if plan.world > 1:
        how = f"device={device}" + (f" nproc={nproc}" if nproc else "")
        raise FxqatError(f"{how} asks for {plan.world} processes, and this is one process: run "
                         f"`fxqat qat ... {how}` (it launches them) or `torchrun --nproc_per_node={plan.world} -m "
                         "fxqat.cli qat ...`")
    if plan.kind == "cuda":
        return torch.device("cuda", plan.ids[0]), str(plan.ids[0]), plan
    return torch.device("cpu"), "cpu", plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cli_args: list[str], world: int, env: dict | None = None) -> int:
    """Run ``python -m fxqat.cli *cli_args`` on ``world`` local ranks under ``torch.distributed.run``; returns the
    launcher's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "fxqat.cli", *cli_args]
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    print(f"DDP: launching {world} processes: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, env=full_env).returncode


def check_ranks_agree(model: nn.Module) -> str:
    """After a DDP run: every rank's weights, buffers (quantizer and BN state) and quantizer / BN flags must be
    identical. One all-gather of a sha256 digest; rank 0 logs it, and a difference is an error naming the ranks.
    With ``FXQAT_DDP_DUMP=DIR`` every rank also writes its state to ``DIR/rank<r>.pt`` (for debugging a run)."""
    from .checkpoint import _flags, digest

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    mine = digest({"state": state, "flags": _flags(model)})
    rank, world = dist.get_rank(), dist.get_world_size()
    dump = os.environ.get("FXQAT_DDP_DUMP")
    if dump:
        os.makedirs(dump, exist_ok=True)
        torch.save(state, os.path.join(dump, f"rank{rank}.pt"))
    every = [None] * world
    dist.all_gather_object(every, mine)
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise FxqatError(f"DDP: ranks {odd} ended with weights or quantizer state different from rank 0's "
                         f"(digests {', '.join(d[:12] for d in every)}); please report this with the command line")
    if rank == 0:
        print(f"DDP: all {world} ranks end with identical weights and quantizer state (sha256 {mine[:16]})",
              flush=True)
    return mine


@contextlib.contextmanager
def cpu_ddp(active: bool):
    """Ultralytics wraps the model in ``DistributedDataParallel(model, device_ids=[device.index])``, which DDP
    refuses for a CPU module ([None]); for CPU ranks the trainer module sees a DDP without device ids."""
    if not active:
        yield
        return
    import types

    import ultralytics.engine.trainer as ul_trainer

    def ddp(module, device_ids=None, **kw):
        return nn.parallel.DistributedDataParallel(module, **kw)

    class _NN:
        parallel = types.SimpleNamespace(DistributedDataParallel=ddp)

        def __getattr__(self, name):
            return getattr(nn, name)

    saved = ul_trainer.nn
    ul_trainer.nn = _NN()
    try:
        yield
    finally:
        ul_trainer.nn = saved


if __name__ == "__main__":  # ``python -m fxqat.distributed ARGS`` = ``fxqat qat ARGS``
    from .cli import main

    sys.exit(main(["qat", *sys.argv[1:]]))


@contextlib.contextmanager
def single_process_ultralytics():
    """Ultralytics as if no process group existed (``RANK`` / ``LOCAL_RANK`` -1 in its modules): a validation one
    rank runs alone (the PTQ start, epoch 0) then neither gathers from nor waits at a barrier for the other ranks,
    which are training meanwhile. Restored on exit."""
    import sys

    saved = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("ultralytics") and mod is not None:
            for attr in ("RANK", "LOCAL_RANK"):
                if isinstance(getattr(mod, attr, None), int):
                    saved.append((mod, attr, getattr(mod, attr)))
                    setattr(mod, attr, -1)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)

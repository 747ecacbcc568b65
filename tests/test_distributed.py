"""DDP: device plans, the CLI's launcher, and the bucketed quantizer / BN state sync (2 gloo ranks, tiny model).

The real ``fxqat qat`` under DDP (2 ranks vs 1 rank) is in test_distributed_qat.py (slow)."""

import socket

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from fxqat.distributed import Plan, plan_devices, rank_device
from fxqat.errors import FxqatError
from fxqat.quant.fake_quant import FakeQuant
from fxqat.quant.spec import QuantSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny(histogram: bool = False) -> nn.ModuleDict:
    torch.manual_seed(0)
    mods = {"mm": FakeQuant(QuantSpec(observer="minmax")),
            "ma": FakeQuant(QuantSpec(observer="moving_average")),
            "pc": FakeQuant(QuantSpec(observer="percentile", percentile=99.0)),
            "w": FakeQuant(QuantSpec(bits=8, symmetric=True, per_channel=0, observer="minmax"), channels=3),
            "bn": nn.BatchNorm2d(3)}
    mods["w"].always_observe = True
    if histogram:
        mods["hist"] = FakeQuant(QuantSpec(observer="histogram"))
    return nn.ModuleDict(mods).train()


def _data(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(2, 3, 4, 4, generator=g) * (1 + rank) + rank


def _feed(model: nn.ModuleDict, rank: int, steps: int = 3):
    for step in range(steps):
        x = _data(rank, step)
        for name, m in model.items():
            m(x if name != "w" else x[0])


def _rank(rank: int, world: int, port: int, out: str, histogram: bool) -> None:
    import torch.distributed as dist

    from fxqat.distributed import sync_quant_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        calls = []
        real = {k: getattr(dist, k) for k in ("all_reduce", "broadcast", "all_gather")}
        for k, fn in real.items():
            setattr(dist, k, lambda *a, _k=k, _fn=fn, **kw: (calls.append(_k), _fn(*a, **kw))[1])
        model = _tiny(histogram)
        _feed(model, rank)
        n = sync_quant_state(model)
        for k, fn in real.items():
            setattr(dist, k, fn)
        torch.save({"state": model.state_dict(), "n": n, "calls": calls}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, histogram=False):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path), histogram), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_bucketed_sync_two_gloo_ranks(tmp_path):
    """One spawn of 2 gloo ranks (process start-up dominates: one run checks every bucket)."""
    a, b = _spawn(tmp_path, histogram=True)
    for k in a["state"]:
        if not k.startswith("w."):  # weight quantizer: see below
            assert torch.equal(a["state"][k], b["state"][k]), k  # tolerance: exact, every rank gets the reduced value
    # one MIN (min/max ranges and flags) + one SUM (moving averages, percentiles, BN) + one broadcast (histogram)
    assert a["n"] == 3 and a["calls"] == ["all_reduce", "all_reduce", "broadcast"] == b["calls"]
    refs = []
    for r in range(2):
        m = _tiny(histogram=True)
        _feed(m, r)
        refs.append(m.state_dict())
    s = a["state"]
    # min/max: the union of both ranks' data
    assert float(s["mm.observer.min_val"]) == min(float(r["mm.observer.min_val"]) for r in refs)
    assert float(s["mm.observer.max_val"]) == max(float(r["mm.observer.max_val"]) for r in refs)
    # moving averages, percentiles, BN statistics: the mean of the ranks' (float64 sum / 2, rounded to float32)
    for k in ("ma.observer.min_val", "ma.observer.max_val", "pc.observer.min_val", "pc.observer.max_val",
              "bn.running_mean", "bn.running_var"):
        mean = ((refs[0][k].double() + refs[1][k].double()) / 2).float()
        torch.testing.assert_close(s[k], mean, rtol=0, atol=0, msg=k)
    assert not torch.equal(refs[0]["ma.observer.max_val"], refs[1]["ma.observer.max_val"])  # the ranks did differ
    # histogram observers cannot be merged: rank 0's state
    for k in ("hist.observer.histogram", "hist.observer.min_val", "hist.observer.max_val", "hist.scale"):
        assert torch.equal(s[k], refs[0][k]), k
    # scales follow the synced ranges (as the observer computes them from the merged range)
    fq = FakeQuant(QuantSpec(observer="minmax"))
    fq.observer.min_val.copy_(s["mm.observer.min_val"])
    fq.observer.max_val.copy_(s["mm.observer.max_val"])
    fq.refresh_qparams()
    assert torch.equal(fq.scale, s["mm.scale"]) and torch.equal(fq.zero_point, s["mm.zero_point"])
    # weight quantizers are left alone (they follow the weights, identical under DDP; here each rank fed its own)
    assert torch.equal(s["w.scale"], refs[0]["w.scale"]) and torch.equal(b["state"]["w.scale"], refs[1]["w.scale"])


def test_sync_is_a_no_op_without_process_group():
    from fxqat.distributed import sync_quant_state

    m = _tiny()
    _feed(m, 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert sync_quant_state(m) == 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ----------------------------------------------------------------------------------------------------- devices
@pytest.mark.parametrize("device,nproc,plan", [
    ("cpu", None, Plan("cpu", (), 1)), ("cpu", 2, Plan("cpu", (), 2)), (None, 3, Plan("cpu", (), 3)),
    ("0", None, Plan("cuda", (0,), 1)), ("0,1", None, Plan("cuda", (0, 1), 2)), ("cuda:1", 1, Plan("cuda", (1,), 1)),
    (" 2, 3 ", 2, Plan("cuda", (2, 3), 2)), (None, None, Plan("cuda", (0,), 1)),
])
def test_plan_devices(device, nproc, plan):
    cuda = plan.kind == "cuda"
    assert plan_devices(device, nproc, cuda_available=cuda) == plan
    assert plan.backend == ("nccl" if cuda else "gloo")


@pytest.mark.parametrize("device,nproc,msg", [
    ("0,0", None, "distinct GPU indices"), ("gpu", None, "give cpu"), ("0,1", 3, "nproc must be 2"),
    ("cpu", 0, "positive number"), ("1", None, "no CUDA GPU"),
])
def test_plan_devices_refusals(device, nproc, msg):
    with pytest.raises(FxqatError, match=msg):
        plan_devices(device, nproc, cuda_available=msg != "no CUDA GPU")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=12), st.one_of(st.none(), st.integers(-2, 5)))
def test_plan_devices_never_crashes(device, nproc):
    try:
        plan = plan_devices(device, nproc, cuda_available=True)
    except FxqatError:
        return
    assert plan.world >= 1 and plan.kind in ("cpu", "cuda")


def test_one_process_refuses_several_ranks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(FxqatError, match="torchrun --nproc_per_node=2"):
        rank_device("cpu", 2)
    assert rank_device("cpu", None)[1] == "cpu"


def test_cli_relaunches_itself_under_torchrun(monkeypatch):
    """`fxqat qat ... device=cpu nproc=2` runs the same command on 2 ranks (no nproc: the launcher sets the world)."""
    import fxqat.distributed as d
    from fxqat.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = {}

    def fake_launch(args, world, env=None):
        seen.update(args=args, world=world)
        return 0

    monkeypatch.setattr(d, "launch", fake_launch)
    assert main(["qat", "m.pt", "data=d.yaml", "epochs=2", "device=cpu", "nproc=2", "lr0=0.001"]) == 0
    assert seen["world"] == 2
    assert seen["args"] == ["qat", "m.pt", "data=d.yaml", "epochs=2", "lr0=0.001", "device=cpu"]
    monkeypatch.setattr(d, "launch", lambda args, world, env=None: 3)
    assert main(["qat", "m.pt", "data=d.yaml", "device=cpu", "nproc=2"]) == 1  # a failed worker fails the command


def test_cpu_ddp_lets_ultralytics_wrap_a_cpu_module():
    """Ultralytics calls DistributedDataParallel(model, device_ids=[None]) on CPU, which DDP refuses; inside
    cpu_ddp the trainer module's DDP drops the device ids; outside, Ultralytics' module is untouched."""
    import torch.distributed as dist
    import ultralytics.engine.trainer as ul_trainer

    from fxqat.distributed import cpu_ddp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        m = nn.Linear(2, 2)
        with pytest.raises(ValueError, match="device_ids"):
            ul_trainer.nn.parallel.DistributedDataParallel(m, device_ids=[None])
        with cpu_ddp(True):
            ddp = ul_trainer.nn.parallel.DistributedDataParallel(m, device_ids=[None], find_unused_parameters=True)
            assert ul_trainer.nn.Module is nn.Module  # everything else is torch.nn
        assert isinstance(ddp, nn.parallel.DistributedDataParallel) and ul_trainer.nn is nn
        assert torch.equal(ddp(torch.ones(1, 2)), m(torch.ones(1, 2)))
    finally:
        dist.destroy_process_group()


def test_single_process_ultralytics_sets_and_restores_the_rank_globals(monkeypatch):
    """Inside, Ultralytics' validator modules see no process group (RANK / LOCAL_RANK -1); outside, the ranks again."""
    import ultralytics.engine.validator as V
    import ultralytics.models.yolo.detect.val as D

    from fxqat.distributed import single_process_ultralytics

    for m in (V, D):
        monkeypatch.setattr(m, "RANK", 0)
    monkeypatch.setattr(V, "LOCAL_RANK", 0)
    with single_process_ultralytics():
        assert V.RANK == D.RANK == V.LOCAL_RANK == -1
    assert V.RANK == D.RANK == V.LOCAL_RANK == 0

"""Mixed precision under a budget (fxqat.analysis.budget): measurements, the knapsack, the YAML, the CLI."""

import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.analysis.budget import TIME_UNITS, UNITS, BudgetPlan, budget_yaml, measure, parse_budget
from fxqat.analysis.sensitivity import head_sqnr
from fxqat.cli import main
from fxqat.errors import FxqatError
from fxqat.models import load_model
from fxqat.qconfig import as_qconfig

from ..conftest_helpers import liven, signs_like_images


def _synthetic(n: int, seed: int = 0) -> BudgetPlan:
    """A plan with random layer sizes and NSRs (more bits: less error)."""
    rnd = random.Random(seed)
    layers = []
    for i in range(n):
        params, e = rnd.randint(100, 50_000), rnd.uniform(1e-6, 1e-3)
        layers.append({"name": f"l{i}", "module_path": f"model.{i}", "role": "conv", "params": params, "scales": 8,
                       "nsr": {4: e, 8: e / rnd.uniform(5, 30), 16: e / 1e4},
                       "bytes": {b: -(-params * b // 8) + 32 for b in (4, 8, 16)}})
    return BudgetPlan(layers, act_nsr=1e-5, fixed_bytes=1234)


def test_knapsack_is_exact_up_to_one_bin_per_layer():
    plan = _synthetic(6)
    combos = [dict(zip([r["name"] for r in plan.layers], c)) for c in itertools.product((4, 8, 16), repeat=6)]
    step = plan._dp()[0]
    for t in [i / 12 for i in range(1, 13)]:
        budget = plan.min_bytes + t * (plan.max_bytes - plan.min_bytes)
        bits = plan.solve(budget)
        assert plan.size(bits) <= budget  # costs rounded up: the choice always fits in real bytes
        # no worse than the true optimum with 6 bins (one per layer, the rounding) less budget
        best = min((plan.nsr(c) for c in combos if plan.size(c) <= budget - 6 * step), default=float("inf"))
        assert plan.nsr(bits) <= best * (1 + 1e-12)


def test_larger_budget_never_predicts_more_error():
    plan = _synthetic(40, seed=1)
    budgets = sorted(random.Random(2).uniform(plan.min_bytes, plan.max_bytes * 1.1) for _ in range(60))
    preds = [plan.nsr(plan.solve(b)) for b in budgets]
    assert all(b <= a for a, b in zip(preds, preds[1:]))
    assert plan.solve(plan.max_bytes + 40 * plan._dp()[0]) == plan.uniform(16)  # enough for the rounding: all 16
    assert plan.solve(plan.min_bytes) == plan.uniform(4)
    front = plan.frontier(10)
    assert [p["size_bytes"] for p in front] == sorted(p["size_bytes"] for p in front)
    assert all(b["sqnr_db"] >= a["sqnr_db"] for a, b in zip(front, front[1:]))


def _with_latency(plan: BudgetPlan, seed: int = 3) -> BudgetPlan:
    """Latencies as the INT8 kernels give them: 4-bit no slower than 8-bit (sometimes equal), 16-bit (float) slower."""
    rnd = random.Random(seed)
    for r in plan.layers:
        t8 = rnd.uniform(0.1, 2.0)
        r["ms"] = {4: t8 if rnd.random() < 0.3 else t8 * rnd.uniform(0.5, 1.0), 8: t8, 16: t8 * rnd.uniform(1.5, 5)}
    plan.fixed_ms = 4.2
    return plan.with_kind("latency")


def test_latency_knapsack_is_exact_up_to_one_bin_per_layer():
    plan = _with_latency(_synthetic(6))
    combos = [dict(zip([r["name"] for r in plan.layers], c)) for c in itertools.product((4, 8, 16), repeat=6)]
    assert plan.min_cost == pytest.approx(min(plan.latency(c) for c in combos))
    assert plan.max_cost == pytest.approx(max(plan.latency(c) for c in combos))
    step = plan._dp()[0]
    for t in [i / 12 for i in range(1, 13)]:
        budget = plan.min_cost + t * (plan.max_cost - plan.min_cost)
        bits = plan.solve(budget)
        assert plan.latency(bits) <= budget + 1e-9
        best = min((plan.nsr(c) for c in combos if plan.latency(c) <= budget - 6 * step), default=float("inf"))
        assert plan.nsr(bits) <= best * (1 + 1e-12)
    # with 4 bits as fast as 8 (a layer's tie), the less noisy 8 bits is chosen; all 16 fits only the largest budget
    assert plan.solve(plan.max_cost + 6 * step) == plan.uniform(16)
    ties = [r["name"] for r in plan.layers if r["ms"][4] == r["ms"][8]]
    fastest = plan.solve(plan.min_cost)
    assert all(fastest[n] == 8 for n in ties) and plan.latency(fastest) == pytest.approx(plan.min_cost)


def test_infeasible_and_unknown_kinds_refused():
    plan = _synthetic(5)
    with pytest.raises(FxqatError, match=f"smallest feasible size.*{plan.min_bytes} bytes"):
        plan.solve(plan.min_bytes - 1)
    lat = _with_latency(_synthetic(5))
    with pytest.raises(FxqatError, match=f"below the fastest configuration measured, {lat.min_cost:.2f} ms"):
        lat.solve(lat.min_cost - 0.01)
    with pytest.raises(FxqatError, match="needs the per-layer latencies"):
        _synthetic(5).with_kind("latency")
    with pytest.raises(FxqatError, match="valid kinds: size, latency"):
        parse_budget("flops:5G")
    assert parse_budget("latency:0.03s").value == pytest.approx(30.0)
    assert parse_budget("latency:2500us").value == pytest.approx(2.5)
    assert parse_budget("latency: 40").value == 40.0  # milliseconds by default
    rel = parse_budget("latency:85%")
    assert rel.relative and rel.value == 85.0 and not parse_budget("latency:85ms").relative
    assert lat.resolve(rel) == pytest.approx(0.85 * lat.latency(lat.uniform(8)))
    size = _synthetic(5)
    assert size.resolve(parse_budget("size:70%")) == pytest.approx(0.7 * size.size(size.uniform(8)))
    assert size.resolve(parse_budget("size:2MB")) == 2e6


def test_cli_refuses_bad_budgets_before_model_work(capsys):
    for arg, fragment in [("budget=latency:3xs", "is not a latency"), ("budget=size:2.5XB", "is not a size"),
                          ("budget=latency:0ms", "positive"), ("budget=flops:2G", "valid kinds: size, latency"),
                          ("budget=size:0", "positive"), ("budget=2.5MB", "give KIND:VALUE")]:
        assert main(["analyze", "no_such_model.pt", "data=missing.yaml", arg]) == 2
        err = capsys.readouterr().err
        assert f"fxqat analyze: {arg}: " in err and fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def setup():
    model = liven(load_model("yolov8n.yaml", nc=2))
    x = signs_like_images(4, 64)
    gm = fxqat.prepare_qat(model)
    fxqat.calibrate(gm, [x], progress=False)
    return model, x, measure(gm, x, progress=False)


def _prepared(model, x, plan, bits):
    text = budget_yaml(plan, bits, as_qconfig(None), parse_budget("size:1MB"))
    gm = fxqat.prepare_qat(model, fxqat.load_qconfig(text))
    fxqat.calibrate(gm, [x], progress=False)
    return gm


def _real_bytes(gm) -> float:
    """Weights as prepared: each weight quantizer's bits × its conv's weight count / 8."""
    return sum(m.weight_fq.spec.bits * m.conv.weight.numel() / 8 for m in gm.modules()
               if getattr(m, "weight_fq", None) is not None)


@pytest.mark.slow  # ~80 s on the loaded 2-core machine (189 partial forwards)
def test_measurements_are_ordered_by_bits(setup):
    _, _, plan = setup
    assert len(plan.layers) == 63
    for r in plan.layers:  # per layer, some sit at float32's noise floor (~1e-14): only 4 vs 16 bits is strict
        assert r["nsr"][4] > r["nsr"][16] >= 0
        assert r["bytes"][4] < r["bytes"][8] < r["bytes"][16]
        assert r["bytes"][8] - r["bytes"][4] == r["params"] // 2  # 4 more bits per weight
    total = {b: sum(r["nsr"][b] for r in plan.layers) for b in plan.choices}
    assert total[4] > 10 * total[8] > 10 * total[16]  # 16-bit weights: float-equivalent
    assert plan.min_bytes < plan.max_bytes


@pytest.mark.slow
def test_chosen_config_fits_and_predicts_measured_sqnr(setup):
    model, x, plan = setup
    budgets = [plan.min_bytes + t * (plan.max_bytes - plan.min_bytes) for t in torch.linspace(0, 1, 25).tolist()]
    preds = [plan.nsr(plan.solve(b)) for b in budgets]
    assert all(b >= a for a, b in zip(preds[1:], preds[:-1]))  # a larger budget never predicts more error
    assert preds[-1] < preds[0] / 10
    budget = plan.min_bytes + 0.35 * (plan.max_bytes - plan.min_bytes)
    bits = plan.solve(budget)
    assert plan.size(bits) <= budget and len(set(bits.values())) > 1  # really mixed
    gm = _prepared(model, x, plan, bits)
    assert {n.name: gm.get_submodule(n.target).weight_fq.spec.bits for n in gm.graph.nodes
            if n.name in bits} == bits  # the YAML's rules reach every layer
    assert _real_bytes(gm) <= budget  # real weight bytes of the prepared model fit (scales and biases on top)
    w4 = _prepared(model, x, plan, plan.uniform(4))
    measured, measured_w4 = head_sqnr(gm, x), head_sqnr(w4, x)
    predicted = plan.point(bits)["sqnr_db"]
    assert measured > measured_w4 + 3  # ordered correctly vs uniform W4, by a margin
    assert abs(measured - predicted) < 3.0  # additive-noise prediction within 3 dB of the measured SQNR


@settings(max_examples=200, deadline=None)
@given(value=st.floats(1e-3, 1e9, allow_nan=False), unit=st.sampled_from(["", "B", "KB", "MB", "KiB", "MiB", "kb"]),
       space=st.sampled_from(["", " "]))
def test_parse_budget_round_trip(value, unit, space):
    text = f"size:{value:.6f}{space}{unit}"
    expected = round(value, 6) * UNITS[unit.lower()]
    b = parse_budget(text)
    assert b.kind == "size" and b.value == pytest.approx(expected, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(value=st.floats(1e-3, 1e6, allow_nan=False), unit=st.sampled_from(["", "ms", "s", "us", "MS"]),
       space=st.sampled_from(["", " "]))
def test_parse_latency_round_trip(value, unit, space):
    b = parse_budget(f"latency:{value:.6f}{space}{unit}")
    assert b.kind == "latency" and b.value == pytest.approx(round(value, 6) * TIME_UNITS[unit.lower()], rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=20) | st.from_regex(r"(size|latency):[-+0-9.eE]{0,6}([a-zA-Z]{0,4}|%)", fullmatch=True))
def test_parse_budget_strict(text):
    try:
        b = parse_budget(text)
    except FxqatError as e:
        assert "\n" not in str(e) and "size:2.5MB" in str(e) and "latency:30ms" in str(e)  # one line, examples
        return
    assert b.kind in ("size", "latency") and b.value > 0 and b.value != float("inf")
    assert b.relative == text.strip().endswith("%")
    number = text.split(":", 1)[1].strip().lower().rstrip("bkmisu%").rstrip(" ")
    assert number.replace(".", "", 1).isdigit() and number.isascii()  # only plain decimals get through


@pytest.mark.slow  # a sweep, the budget measurements and four calibrations: minutes on the loaded machine
def test_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    imgs = (signs_like_images(2, 64) * 255).byte().permute(0, 2, 3, 1).numpy()
    (tmp_path / "images").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "an"
    args = ["analyze", "yolov8n.yaml", f"data={tmp_path / 'images'}", "imgsz=32", "images=2", f"out={out}"]
    assert main(args + ["budget=size:2.5MB"]) == 0
    text = capsys.readouterr().out
    assert "budget size:2.5MB" in text and "uniform W4" in text
    rep = json.loads((out / "budget.json").read_text())
    assert rep["budget_bytes"] == 2.5e6 and rep["size_bytes"] <= 2.5e6 < rep["max_bytes"]
    assert rep["min_bytes"] < rep["size_bytes"]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    qc = fxqat.load_qconfig(out / "budget_qconfig.yaml")
    gm = fxqat.prepare_qat(load_model("yolov8n.yaml"), qc)
    assert _real_bytes(gm) <= 2.5e6
    assert sorted({r.weight["bits"] for r in qc.rules if r.weight}) == sorted({int(b) for b in rep["bits"].values()})
    assert main(args + ["budget=size:100KB"]) == 1  # below all-4-bit: the smallest feasible size is named
    assert "smallest feasible size" in capsys.readouterr().err


@pytest.mark.slow  # the sweep, three converted models timed, four references converted and timed
def test_latency_budget_end_to_end(tmp_path):
    from fxqat.analysis import analyze

    model = liven(load_model("yolov8n.yaml", nc=2))
    x = signs_like_images(2, 64)
    rep = analyze(model, x, imgsz=64, images=2, out=tmp_path, budget="latency:10s", progress=False)
    b = rep.budget
    assert b["kind"] == "latency" and b["budget_ms"] == 10_000.0
    assert b["min_cost"] < b["max_cost"] <= 10_000.0
    assert set(b["bits"].values()) == {16}  # every layer fits in float: the least error
    # the dearest configuration is each layer at its slowest precision: 16 bits for most, but on a model this small
    # timing noise can make a layer's 8-bit time the slower one
    assert b["min_cost"] < b["latency_ms"] <= b["max_cost"] + 1e-9
    for p in b["references"].values():
        assert p["measured_ms"] > 0 and p["latency_ms"] > 0
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "predicted latency" in (tmp_path / "budget_qconfig.yaml").read_text()
    with pytest.raises(FxqatError, match="below the fastest configuration measured"):
        analyze(model, x, imgsz=64, images=2, budget="latency:0.001ms", progress=False)

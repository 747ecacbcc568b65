"""Mixed precision under a budget (fxqat.analysis.budget): measurements, the knapsack, the YAML, the CLI."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.analysis.budget import UNITS, budget_yaml, measure, parse_budget
from fxqat.analysis.sensitivity import head_sqnr
from fxqat.cli import main
from fxqat.errors import FxqatError
from fxqat.models import load_model
from fxqat.qconfig import as_qconfig

from ..conftest_helpers import liven, signs_like_images


@pytest.fixture(scope="module")
def setup():
    model = liven(load_model("yolov8n.yaml", nc=2))
    x = signs_like_images(8, 96)
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


def test_measurements_are_ordered_by_bits(setup):
    _, _, plan = setup
    assert len(plan.layers) == 63
    for r in plan.layers:  # fewer bits: more error (16-bit weights are float-equivalent: orders below 8-bit)
        assert r["nsr"][4] > r["nsr"][8] > r["nsr"][16] >= 0
        assert r["nsr"][16] < 1e-3 * r["nsr"][4] + 1e-12
        assert r["bytes"][4] < r["bytes"][8] < r["bytes"][16]
    assert plan.min_bytes < plan.max_bytes


def test_chosen_config_fits_and_is_monotone(setup):
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
    # the knapsack beats the greedy-free alternative of the same size class: uniform W4 is cheaper but worse
    w4 = _prepared(model, x, plan, plan.uniform(4))
    measured, measured_w4 = head_sqnr(gm, x), head_sqnr(w4, x)
    predicted = plan.point(bits)["sqnr_db"]
    assert measured > measured_w4 + 3  # ordered correctly vs uniform W4, by a margin
    assert abs(measured - predicted) < 3.0  # additive-noise prediction within 3 dB of the measured SQNR


def test_infeasible_and_latency_refused(setup):
    _, _, plan = setup
    with pytest.raises(FxqatError, match=f"smallest feasible size.*{plan.min_bytes} bytes"):
        plan.solve(plan.min_bytes - 1)
    with pytest.raises(FxqatError, match="latency budgets are not supported.*valid kinds: size"):
        parse_budget("latency:5ms")
    with pytest.raises(FxqatError, match="valid kinds: size"):
        parse_budget("flops:5G")


@settings(max_examples=200, deadline=None)
@given(value=st.floats(1e-3, 1e9, allow_nan=False), unit=st.sampled_from(["", "B", "KB", "MB", "KiB", "MiB", "kb"]),
       space=st.sampled_from(["", " "]))
def test_parse_budget_round_trip(value, unit, space):
    text = f"size:{value:.6f}{space}{unit}"
    expected = round(value, 6) * UNITS[unit.lower()]
    b = parse_budget(text)
    assert b.kind == "size" and b.value == pytest.approx(expected, rel=1e-12)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=20) | st.from_regex(r"size:[-+0-9.eE]{0,6}[a-zA-Z]{0,4}", fullmatch=True))
def test_parse_budget_strict(text):
    try:
        b = parse_budget(text)
    except FxqatError as e:
        assert "\n" not in str(e) and "size:2.5MB" in str(e)  # one line, with an example
        return
    assert b.kind == "size" and b.value > 0 and b.value != float("inf")
    number = text.split(":", 1)[1].strip().lower().rstrip("bkmi").rstrip(" ")
    assert number.replace(".", "", 1).isdigit() and number.isascii()  # only plain decimals get through


def test_cli_end_to_end(tmp_path, capsys):
    from PIL import Image

    imgs = (signs_like_images(4, 64) * 255).byte().permute(0, 2, 3, 1).numpy()
    (tmp_path / "images").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / "images" / f"{i}.png")
    out = tmp_path / "an"
    args = ["analyze", "yolov8n.yaml", f"data={tmp_path / 'images'}", "imgsz=64", "images=4", f"out={out}"]
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
    assert main(args + ["budget=latency:3ms"]) == 2
    assert "valid kinds: size" in capsys.readouterr().err

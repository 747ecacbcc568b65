"""Per-layer latency for latency budgets (fxqat.analysis.latency): which node each layer is charged, and the
measurement's bookkeeping. No timing is asserted (the machine is shared): only structure and sums."""

import pytest
import torch

import fxqat
from fxqat.analysis.budget import budget_yaml, parse_budget, sizes
from fxqat.analysis.latency import forward_ms, measure_latency, node_times, owners
from fxqat.modules.conv_bn_act import FrozenConvBnAct
from fxqat.modules.int8 import Dequantize, Int8ConvBnAct, Quantize
from fxqat.models import load_model
from fxqat.qconfig import as_qconfig

from ..conftest_helpers import liven, signs_like_images


@pytest.fixture(scope="module")
def tiny():
    model = liven(load_model("yolov8n.yaml", nc=2))
    x = signs_like_images(2, 64)
    gm = fxqat.prepare_qat(model)
    fxqat.calibrate(gm, [x], progress=False)
    plan = sizes(gm)
    for r in plan.layers:  # the YAML header reads the NSRs; their values do not matter here
        r["nsr"] = {b: 0.0 for b in plan.choices}

    def build(bits):
        q = fxqat.prepare_qat(model, fxqat.load_qconfig(budget_yaml(plan, bits, as_qconfig(None),
                                                                    parse_budget("latency:1ms"))))
        fxqat.calibrate(q, [x], progress=False)
        return fxqat.convert(q)

    return plan, build, x


def _owned(cg, own, layer):
    return [n for n in cg.graph.nodes if own.get(n.name) == layer]


def test_each_layer_owns_its_conv_its_output_quantize_and_its_own_dequantize(tiny):
    plan, build, _ = tiny
    paths = {r["module_path"]: r["name"] for r in plan.layers}
    for bits, conv_type in [(8, Int8ConvBnAct), (16, FrozenConvBnAct)]:
        cg = build(plan.uniform(bits))
        own = owners(cg, paths)
        mods = {n.name: cg.get_submodule(n.target) for n in cg.graph.nodes if n.op == "call_module"}
        for r in plan.layers:
            convs = [n for n in _owned(cg, own, r["name"]) if isinstance(mods.get(n.name), conv_type)]
            assert len(convs) == 1, (bits, r["name"], _owned(cg, own, r["name"]))
        # every quantize reading a layer's conv is that layer's; every dequantize read by one layer only is too
        for n in cg.graph.nodes:
            m = mods.get(n.name)
            if isinstance(m, Quantize) and n.args[0].name in own:
                assert own[n.name] == own[n.args[0].name]
            if isinstance(m, Dequantize):
                readers = {own.get(u.name) for u in n.users}
                assert own.get(n.name) == (readers.pop() if len(readers) == 1 else None)
        # the model's own ops stay in the fixed part: adds, concats, the head's decode
        kinds = {type(mods[k]).__name__ for k in mods if k not in own}
        assert {"Int8Add", "Detect"} & kinds and not any(isinstance(mods[k], conv_type) for k in mods if k not in own)
        if bits == 16:  # a float layer: dequantize in, quantize out, both charged to it
            assert sum(isinstance(mods[n], (Quantize, Dequantize)) for n in own if n in mods) >= len(plan.layers)


def test_measure_latency_charges_every_node_once(tiny):
    plan, build, x = tiny
    timing = measure_latency(plan, build, x, rounds=1, progress=False)
    assert timing["imgsz"] == [64, 64] and timing["rounds"] == 1
    for b in plan.choices:
        t = timing["per_precision"][str(b)]
        assert t["unowned_layers"] == []  # every layer was charged some node
        charged = sum(r["ms"][b] for r in plan.layers)
        assert charged + t["fixed_ms"] == pytest.approx(t["total_ms"], rel=1e-9)  # nothing counted twice or lost
        assert all(r["ms"][b] > 0 for r in plan.layers)
    eight = timing["per_precision"]["8"]
    assert timing["interpreter_overhead_ms"] == pytest.approx(eight["total_ms"] - eight["forward_ms"], rel=1e-9)
    assert plan.fixed_ms == pytest.approx(eight["fixed_ms"] - timing["interpreter_overhead_ms"], rel=1e-9)
    plan.with_kind("latency")
    assert plan.latency(plan.uniform(8)) == pytest.approx(eight["forward_ms"], rel=1e-9)  # calibrated on its forward
    bits = plan.solve((plan.min_cost + plan.max_cost) / 2)
    assert plan.latency(bits) <= (plan.min_cost + plan.max_cost) / 2


def test_node_times_and_forward_ms_shapes(tiny):
    plan, build, x = tiny
    cg = build(plan.uniform(8))
    times, plain = node_times([cg, cg], x[:1], rounds=3, warmup=0, progress=False)
    names = {n.name for n in cg.graph.nodes}
    assert len(times) == 2 and set(times[0]) == names and all(v >= 0 for v in times[0].values())
    assert len(plain) == 2 and all(p["rounds"] == 3 and 0 < p["min_ms"] <= p["median_ms"] for p in plain)
    (f,) = forward_ms([cg], x[:1], rounds=3, warmup=0)
    assert f["rounds"] == 3 and 0 < f["min_ms"] <= f["median_ms"] <= f["max_ms"]
    with torch.no_grad():
        torch.testing.assert_close(cg(x[:1]), build(plan.uniform(8))(x[:1]), rtol=0, atol=0)  # timing changes nothing

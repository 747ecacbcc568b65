"""benchmarks/accuracy.py's ``--variants`` parser and variant qconfigs (no training: the benchmark itself runs them)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.accuracy import RECIPE_KEYS, VARIANTS, main, parse_variants, recipe_label, tag, variant_qconfig
from fxqat.qconfig import as_qconfig

recipes = st.fixed_dictionaries({}, optional={
    "lr0": st.floats(1e-6, 1.0, allow_nan=False), "epochs": st.integers(1, 50),
    "freeze_bn": st.integers(0, 50), "freeze_observers": st.integers(0, 50),
    "dampen": st.floats(0.0, 10.0, allow_nan=False), "freeze_osc": st.floats(1e-6, 0.999, allow_nan=False)})
items = st.tuples(st.sampled_from(sorted(VARIANTS)), recipes)


def _text(name, recipe):
    return ":".join([name] + [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in recipe.items()])


@settings(max_examples=60, deadline=None)
@given(st.lists(items, min_size=1, max_size=5))
def test_variants_round_trip(parsed):
    text = ",".join(_text(n, r) for n, r in parsed)
    assert parse_variants(text) == parsed


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_anything_else_is_a_value_error_naming_the_choices(text):
    try:
        out = parse_variants(text)
    except ValueError as e:
        assert any(w in str(e) for w in ("valid variants are", "key=value", "given twice", "is not a", "out of range"))
    else:  # only valid specs parse
        assert all(n in VARIANTS and set(r) <= set(RECIPE_KEYS) for n, r in out)


@pytest.mark.parametrize("text,msg", [("w4a4", "valid variants are w8a8, w8a8_lsq, w4a8, w4a8_lsq"),
                                      ("w4a8:lr=1", "key one of lr0, epochs, freeze_bn, freeze_observers"),
                                      ("w4a8:epochs=0", "out of range"), ("w4a8:lr0=-1", "out of range"),
                                      ("w4a8:epochs=2:epochs=3", "given twice"), ("w4a8:epochs=x", "not an integer")])
def test_bad_variants_are_refused(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_variants(text)


def test_cli_refuses_variants_with_qconfig_or_several_lr0(capsys):
    for argv, msg in ((["--variants", "w4a8", "--qconfig", "tensorrt"], "give one or the other"),
                      (["--variants", "w4a8", "--lr0", "1e-4,1e-3"], "NAME:lr0="),
                      (["--variants", "w4a9"], "valid variants are")):
        with pytest.raises(SystemExit):
            main(["--fp32", "x.pt", "--data", "d.yaml", *argv])
        assert msg in capsys.readouterr().err


def test_variant_qconfigs():
    for name, (preset, learnable) in VARIANTS.items():
        qc = as_qconfig(variant_qconfig(name))
        ref = as_qconfig(preset)
        assert qc.weight.learnable is qc.activation.learnable is learnable and not qc.input.learnable
        assert qc.weight.with_(learnable=False) == ref.weight.with_(learnable=False)
        assert [r.__dict__ | {"where": ""} for r in qc.rules] == [r.__dict__ | {"where": ""} for r in ref.rules]
        assert tag(variant_qconfig(name)) == (f"W{ref.weight.bits}A8", learnable)
    assert tag(None) == ("W8A8", False) and tag("w4a8") == ("W4A8", True)  # the w4a8 preset learns its scales
    assert recipe_label(3, 3e-4, {"freeze_bn": 0}) == "3 ep lr0=0.0003 freeze_bn=0"


@pytest.mark.parametrize("task,second,main_metric", [("detect", "mAP50", "mAP50-95"),
                                                     ("segment", "mask_mAP50", "mask_mAP50-95"),
                                                     ("pose", "pose_mAP50", "pose_mAP50-95"),
                                                     ("obb", "mAP50", "mAP50-95"), ("classify", "top5", "top1")])
def test_each_task_reports_its_own_metrics(task, second, main_metric):
    from benchmarks.accuracy import table_layout, task_metrics
    from fxqat.tasks import spec

    assert task_metrics(task) == (second, main_metric)
    columns, head, formats = table_layout(task)
    assert columns[3:5] == [second, main_metric] and head[3:5] == [second, main_metric]
    assert {second, main_metric} <= set(formats)
    assert {second, main_metric} <= {name for name, _ in spec(task).metrics}  # metrics the validator gives


def test_task_must_match_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["--fp32", "yolov8n.yaml", "--data", "missing.yaml", "--task", "segment"])
    assert "--task segment: yolov8n.yaml is a detect model" in capsys.readouterr().err


def test_task_default_variants_each_change_the_prepared_graph():
    """benchmarks.task_defaults: every variant of every task head flips a rule that changes the quantizers."""
    import fxqat
    from benchmarks.task_defaults import VARIANTS, variant_qconfig
    from fxqat.models import load_model
    from fxqat.quant.fake_quant import FakeQuant

    for task, yaml_name in (("segment", "yolov8n-seg.yaml"), ("pose", "yolov8n-pose.yaml"), ("obb", "yolov8n-obb.yaml"),
                            ("classify", "yolov8n-cls.yaml")):
        model = load_model(yaml_name, nc=3)

        def count(qc, model=model):
            return sum(isinstance(m, FakeQuant) for m in fxqat.prepare_qat(model, qc).modules())

        base = count(variant_qconfig())
        for label, (removed, floated) in VARIANTS[task].items():
            assert count(variant_qconfig(removed, floated)) != base, (task, label)


def test_cli_refuses_bad_budgets(capsys):
    for text, msg in (("size:2.4XB", "is not a size"), ("latency:-3ms", "is not a latency"), ("bytes:3", "valid kinds")):
        with pytest.raises(SystemExit):
            main(["--fp32", "x.pt", "--data", "d.yaml", "--budgets", f"size:2MB,{text}"])
        err = capsys.readouterr().err
        assert "--budgets: " in err and msg in err, err


def test_budget_qconfigs_are_tagged_mixed():
    from fxqat import load_qconfig
    from fxqat.analysis.budget import BudgetPlan, budget_yaml, parse_budget

    layers = [{"name": f"conv{i}", "module_path": f"model.{i}", "role": "conv", "params": 10, "scales": 1,
               "nsr": {4: 1.0, 8: 0.1, 16: 0.0}, "bytes": {4: 5, 8: 10, 16: 20}} for i in range(12)]
    plan = BudgetPlan(layers, act_nsr=0.0, fixed_bytes=0)
    mixed = {r["name"]: (4, 8)[i % 2] for i, r in enumerate(layers)}
    text = budget_yaml(plan, mixed, as_qconfig(None), parse_budget("size:1MB"))
    assert tag(load_qconfig(text)) == ("mixed A8", False)
    uniform = budget_yaml(plan, plan.uniform(8), as_qconfig(None), parse_budget("size:1MB"))
    assert tag(load_qconfig(uniform)) == ("W8A8", False)
    assert tag("w4a8") == ("W4A8", True)  # a preset's few rules (first conv, head at 8 bits) are not a mix


def test_end2end_needs_an_end_to_end_model(capsys):
    with pytest.raises(SystemExit):
        main(["--fp32", "yolov8n.yaml", "--data", "missing.yaml", "--end2end"])
    assert "--end2end: yolov8n.yaml has no end-to-end (one-to-one) head" in capsys.readouterr().err


def test_e2e_head_val_data_is_where_the_map_rows_are_evaluated(tiny_data, tmp_path, monkeypatch):
    """``benchmarks.e2e_head --val-data``: calibration images from ``--data``, every mAP row on ``--val-data``."""
    import benchmarks.e2e_head as e2e_head

    seen = []
    monkeypatch.setattr(e2e_head, "evaluate", lambda model, data, **kw: seen.append(str(data)) or {"mAP50": 0.0,
                                                                                                    "mAP50-95": 0.0})
    other = tmp_path / "other.yaml"
    e2e_head.main(["--fp32", "yolo26n.yaml", "--data", str(tiny_data), "--val-data", str(other), "--imgsz", "64",
                   "--images", "2"])
    assert seen and set(seen) == {str(other)}  # 2 FP32 rows + 5 PTQ rows, none on --data
    assert len(seen) == 7


def test_e2e_head_attn8_rounds_each_softmax_output_an_attention_matmul_reads():
    import torch

    import fxqat
    from benchmarks.e2e_head import quantize_softmax_outputs
    from fxqat.graph.registry import op_kind
    from fxqat.models import load_model

    torch.manual_seed(0)
    model = load_model("fxqat-signs-yolo26n")  # trained: its attention is not uniform
    model.end2end = True
    x = torch.rand(2, 3, 128, 128)
    attn8 = fxqat.prepare_qat(model)
    assert quantize_softmax_outputs(attn8) == 2  # yolo26n: two attention blocks (layers 10 and 22's PSA)
    for n in attn8.graph.nodes:
        if str(n.target).startswith("attn_fq_"):
            (user,) = n.users
            assert op_kind(attn8, user) == "matmul"
    fxqat.calibrate(attn8, [x], progress=False)
    seen = []
    for name, m in attn8.named_modules():
        if name.startswith("attn_fq_"):
            m.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        attn8.eval()(x)
    assert len(seen) == 2
    for a, q in seen:  # softmax rows in [0, 1], rounded onto 256 levels: a real rounding
        assert 0 <= float(a.min()) and float(a.max()) <= 1 and not torch.equal(a, q)
        assert (a - q).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("end2end,val_data", [(True, "big_val.yaml"), (False, None)])
def test_ultralytics_qat_row_is_its_best_pt_evaluated_like_every_row(monkeypatch, end2end, val_data):
    """The Ultralytics QAT row is not its trainer's own validation (one-to-many + NMS for an end-to-end model): its
    best.pt is validated with square letterboxes, on the one-to-one path under --end2end, on --val-data if given."""
    import types

    import ultralytics

    from benchmarks.accuracy import ultralytics_qat

    calls = []
    stats = {"metrics/precision(B)": 0.5, "metrics/recall(B)": 0.5, "metrics/mAP50(B)": 0.8,
             "metrics/mAP50-95(B)": 0.6}

    class FakeYOLO:
        def __init__(self, path):
            self.path = path

        def train(self, **kw):
            calls.append(("train", self.path, kw))
            self.trainer = types.SimpleNamespace(metrics=dict(stats, **{"metrics/mAP50-95(B)": 0.7}), best="best.pt")

        def val(self, **kw):
            calls.append(("val", self.path, kw))
            return types.SimpleNamespace(results_dict=stats)

    monkeypatch.setattr(ultralytics, "YOLO", FakeYOLO)
    r = ultralytics_qat("fp32.pt", "d.yaml", 1, 192, 32, "proj", "detect", val_data, end2end)
    (_, p0, train), (_, p1, val) = calls
    assert p0 == "fp32.pt" and train["quantize"] == 8 and p1 == "best.pt"
    assert val["rect"] is False and val["data"] == (val_data or "d.yaml") and val["imgsz"] == 192
    assert val["nms"] is (False if end2end else None)
    assert r["mAP50-95"] == 0.6 and r["trainer_map"] == 0.7  # the row, and the trainer's own figure beside it


@pytest.mark.parametrize("seed", [None, 3])
def test_seed_reaches_every_fxqat_qat_run(tiny_data, monkeypatch, seed):
    """``--seed`` is the trainer's seed of the fxqat QAT rows (default 0, Ultralytics' own default)."""
    import benchmarks.accuracy as acc

    class Stop(Exception):
        pass

    def fake_train_qat(model, data, **kw):
        raise Stop(kw)

    monkeypatch.setattr(acc, "train_qat", fake_train_qat)
    monkeypatch.setattr(acc, "evaluate", lambda *a, **k: {"mAP50": 0.0, "mAP50-95": 0.0})
    with pytest.raises(Stop) as e:
        main(["--fp32", "yolov8n.yaml", "--data", str(tiny_data), "--imgsz", "64", "--calib", "1", "--batch", "2",
              "--skip-ort", "--skip-ultralytics", *([] if seed is None else ["--seed", str(seed)])])
    assert e.value.args[0]["seed"] == (0 if seed is None else seed)

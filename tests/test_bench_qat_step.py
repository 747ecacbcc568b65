"""``benchmarks.qat_step --rows``: only the named rows are built and stepped, beside the FP32 row they are compared
with. No timing is asserted."""

from benchmarks.qat_step import FP32, FROZEN, MASK, NATIVE, REF, build, measure


def test_rows_filter_keeps_fp32_and_the_named_rows():
    rows, _ = measure(64, 1, rounds=1, steps=1, device="cpu", memory=False, threads=1, words=["batch clips"])
    assert [r["row"] for r in rows] == [FP32, MASK]
    assert rows[0]["vs_fp32_time"] == 1 and rows[1]["step_s"] > 0


def test_no_filter_runs_every_fxqat_row():
    rows, _ = measure(64, 1, rounds=1, steps=1, device="cpu", memory=False, threads=1)
    names = [r["row"] for r in rows]
    assert names[:2] == [FP32, REF] and MASK in names and NATIVE in names


def test_frozen_row_trains_with_fixed_activation_ranges():
    """The frozen-observer row (ModelOpt's regime) really stops the observers: its ranges do not move in a step."""
    import torch

    from fxqat.quant.fake_quant import FakeQuant

    m, crit, x, tgt = build(FROZEN, 64, 2, "cpu")
    fqs = [f for f in m.modules() if isinstance(f, FakeQuant) and f.spec.fixed is None]
    assert fqs and not any(f.observe_enabled for f in fqs)
    before = [f.scale.clone() for f in fqs]
    loss, _ = crit(m(x * 3), tgt)  # a batch far outside the calibrated ranges
    loss.sum().backward()
    assert all(torch.equal(b, f.scale) for b, f in zip(before, fqs))


def test_rows_start_from_the_trained_model_unless_a_yaml_is_given():
    """``--model``: the shipped trained yolov8n by default (every row the same weights), a YAML gives random init."""
    import torch

    from fxqat.models import load_model

    shipped = load_model("fxqat-signs-yolov8n").state_dict()
    trained, *_ = build(FP32, 64, 1, "cpu")
    assert all(torch.equal(v, shipped[k]) for k, v in trained.state_dict().items() if v.is_floating_point())
    fresh, *_ = build(FP32, 64, 1, "cpu", model="yolov8n.yaml")
    w = "model.0.conv.weight"
    assert fresh.state_dict()[w].shape == shipped[w].shape and not torch.equal(fresh.state_dict()[w], shipped[w])


def test_each_row_sets_its_own_switches():
    """Every row turns on its change and the earlier ones, nothing later: the FOLD row is the only one with the
    folded weight's native pass on, REF the one with everything off; the defaults are back afterwards."""
    from benchmarks.qat_step import DEFAULTS, FOLD, GRAD, ORDER, TOGGLES, _set
    from fxqat.quant import fast_fq, folded_fq
    import fxqat.quant.fake_quant as fqmod

    try:
        for row in ORDER:
            _set(TOGGLES[row])
            assert folded_fq.NATIVE_FOLD == (row == FOLD)
            assert fast_fq.NATIVE_GRAD == (row in (GRAD, FOLD))
            assert fqmod.FAST_OBSERVE == (row != REF)
    finally:
        _set(DEFAULTS)
    assert folded_fq.NATIVE_FOLD and fast_fq.NATIVE_GRAD and fqmod.FAST_OBSERVE

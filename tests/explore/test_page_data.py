"""The data the explorer page embeds: rules with file:line, scales equal to the model's quantizers, histograms whose
counts add up, SQNR recomputed independently."""

import math
import re

import pytest
import torch

from fxqat.quant.fake_quant import fake_quants

from .conftest import IMAGES, IMGSZ, QCONFIG, line_of

REL = 1e-6  # the page keeps 7 significant digits


def _rec(data, name):
    return next(n for n in data["nodes"] if n["name"] == name)


def test_rules_name_file_and_line(explored):
    gm, data, _, qfile = explored
    r = _rec(data, "model_2_cv1")["rule"]
    assert r["where"] == f"{qfile}:{line_of(QCONFIG, 'name: model_2_cv1')}"
    assert "bits: 16" in r["text"]
    r = _rec(data, "model_4_m_0_cv1")["rule"]  # the module glob rule
    assert r["where"] == f"{qfile}:{line_of(QCONFIG, 'model.4.*')}" and "bits: 4" in r["text"]
    r = _rec(data, "model_0")["rule"]  # no rule matched: the file's global weight and activation lines
    assert r["where"] == f"{qfile}:{line_of(QCONFIG, 'weight:')}, {qfile}:{line_of(QCONFIG, 'activation:')}"
    r = _rec(data, "model_22_cv2_0_2")["rule"]  # fxqat's built-in rule: its line in config.py
    m = re.fullmatch(r"fxqat/qconfig/config\.py:(\d+)", r["where"])
    import fxqat.qconfig.config as config

    assert m and "detect.box_last" in open(config.__file__).read().splitlines()[int(m[1]) - 1]
    for n in data["nodes"]:  # every quantized node names a file:line
        if n["kind"] in ("conv", "add") or n.get("quantizer"):
            assert n["rule"] and re.match(r".+:\d+", n["rule"]["where"] or ""), n["name"]
    cat = _rec(data, "cat")  # C2f's concat lies on cv1's grid: cv1's rule
    assert cat["grid_owner"] == "model_2_cv1" and cat["rule"]["where"] == _rec(data, "model_2_cv1")["rule"]["where"]


def test_scales_match_the_quantizers(explored):
    gm, data, _, _ = explored
    seen = 0
    for n in data["nodes"]:
        for key in ("quantizer", "weight_quantizer"):
            q = n.get(key)
            if not q:
                continue
            path = q["path"]
            fq = gm.get_submodule(path)
            scale, zp = fq.qparams()
            if q["per_channel"]:
                assert q["scales"] == pytest.approx(scale.tolist(), rel=REL) and q["zero_points"] == zp.tolist()
            else:
                assert q["scale"] == pytest.approx(float(scale), rel=REL) and q["zero_point"] == int(zp)
                lo, hi = (fq.qmin - int(zp)) * float(scale), (fq.qmax - int(zp)) * float(scale)
                assert q["grid"] == pytest.approx([lo, hi], rel=1e-5, abs=1e-12)
                if not math.isfinite(float(fq.observer.min_val)):  # never observed (the image's fixed grid)
                    assert q["observed"] is None
                else:
                    assert q["observed"] == pytest.approx([float(fq.observer.min_val), float(fq.observer.max_val)],
                                                          rel=REL, abs=1e-12)
            seen += 1
    assert seen >= len([m for m in fake_quants(gm)]) * 0.9  # every quantizer appears (shared ones more than once)
    assert _rec(data, "model_2_cv1")["quantizer"]["label"] == "u16"  # the rule's 16-bit grid
    assert _rec(data, "model_4_cv1")["weight_quantizer"]["label"] == "s4c"


def _numel(shape: str) -> int:
    return math.prod(int(d) for d in shape.split("x"))


def test_histograms_sum_to_counts(explored):
    gm, data, _, _ = explored
    checked = 0
    for n in data["nodes"]:
        st = n.get("stats") or {}
        if "act" in st:
            h = st["act"]
            assert len(h["a"]) == len(h["b"]) == data["bins"] == 64
            assert sum(h["a"]) == sum(h["b"]) == h["n"] == _numel(n["shape"]) * IMAGES, n["name"]
            checked += 1
        if "weight" in st:
            assert sum(st["weight"]["a"]) == sum(st["weight"]["b"]) == math.prod(n["weight_shape"])
    assert checked > 100


@torch.no_grad()
def test_histogram_and_sqnr_recomputed(explored):
    """model_2_cv1's FP32 histogram and its SQNR vs FP32, recomputed with plain torch from the same images."""
    from fxqat.explorer.build import signs_images

    gm, data, _, _ = explored
    x = signs_images(IMAGES, IMGSZ)
    seen = {}
    h1 = gm.get_submodule("model.2.cv1").register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    fqs = fake_quants(gm)
    gm.eval()
    for fq in fqs:
        fq.fake_quant_enabled = False
    gm(x)
    f = seen["out"]
    for fq in fqs:
        fq.fake_quant_enabled = True
    h2 = gm.get_submodule("quant.model_2_cv1").register_forward_hook(
        lambda m, i, o: None if "q" in seen else seen.__setitem__("q", o))  # its first call: right after cv1
    gm(x)
    h1.remove(), h2.remove()
    q = seen["q"]
    rec = _rec(data, "model_2_cv1")["stats"]
    lo, hi = rec["act"]["lo"], rec["act"]["hi"]
    assert lo == pytest.approx(min(f.min(), q.min()).item(), rel=REL, abs=1e-9)
    assert hi == pytest.approx(max(f.max(), q.max()).item(), rel=REL, abs=1e-9)
    ref = torch.histogram(f.flatten().double(), bins=64, range=(lo, hi)).hist
    assert sum(abs(a - b) for a, b in zip(rec["act"]["a"], ref.tolist())) <= 2  # bin-edge rounding only
    sqnr = 10 * math.log10(f.pow(2).sum() / (f - q).pow(2).sum())
    assert rec["sqnr_db"] == pytest.approx(sqnr, abs=0.01)

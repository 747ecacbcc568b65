"""Classify models (yolov8n-cls, yolo11n-cls, yolo26n-cls): trace parity, the classifier's quantization, INT8 torch and
QDQ ONNX.

Tolerances: the INT8 model and ONNX Runtime may round a tie differently from the fake-quant model, flipping one code
of an intermediate tensor (as for Detect); so >= 99.9 % of the classifier's input codes lie within one code of the
fake-quant model's, and every logit within the bound that implies: 2 · input step · max_j Σ_i |w_ji| (all inputs
one code off, and the centring that recovers logits from the softmax). Top-1 is compared where the fake-quant
model's top-2 margin exceeds that bound.
"""

import pytest
import torch
import torch.nn as nn

import fxqat
from fxqat.graph.meta import info
from fxqat.models import load_model
from fxqat.modules.heads import ClassifyDecode
from fxqat.modules.int8 import Int8ConvBnAct, Int8GlobalAvgPool
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import assert_traced_matches_in_both_modes, liven, signs_like_images

NC = 10


@pytest.mark.parametrize("name", ["yolov8n-cls.yaml", "yolov8s-cls.yaml", "yolo11s-cls.yaml", "yolo26n-cls.yaml"] + [
    pytest.param(f"{n}-cls.yaml", marks=pytest.mark.slow)
    for n in ("yolo11n", "yolo26s", "yolov8m", "yolov8l", "yolov8x", "yolo11m", "yolo11l", "yolo11x")])
def test_classify_traces_bit_exact_at_its_own_sizes(name):
    model = load_model(name, nc=NC)
    gm = fxqat.trace(model, "eval")
    assert gm.meta["task"] == "classify" and gm.meta["nc"] == NC and gm.meta["reg_max"] is None
    assert_traced_matches_in_both_modes(model, gm, [(224, 224), (160, 160)])
    decode = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(n.target), ClassifyDecode)]
    assert len(decode) == 1  # the softmax: one float leaf deciding train / eval output at run time
    gm.train()
    assert gm(torch.rand(1, 3, 160, 160)).shape == (1, NC)  # training: logits, like Ultralytics


def _prepared(name, imgsz):
    torch.manual_seed(0)
    model = liven(load_model(name, nc=NC))
    with torch.no_grad():  # a peaked softmax, as a trained classifier has (a fresh Linear gives ~uniform scores)
        model.model[-1].linear.weight.mul_(20)
    gm = fxqat.prepare_qat(model)
    fxqat.calibrate(gm, [signs_like_images(4, imgsz, seed=s) for s in range(2)], progress=False)
    return gm.eval()


def _linear(gm):
    return next(n for n in gm.graph.nodes if info(n).role == "classify.linear")


def _check(gm, q_logits_from, x, codes_fq, codes_q, step, w):
    bound = 2 * step * w.abs().sum(1).max().item()
    assert ((codes_fq - codes_q).abs() <= 1).float().mean().item() >= 0.999
    with torch.no_grad():
        p, logits = gm(x)
    c = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731 - softmax keeps logits up to a constant
    y = q_logits_from(x)
    assert y.shape == p.shape == (x.shape[0], NC)
    assert (c(torch.log(y)) - c(logits)).abs().max().item() <= bound
    top2 = logits.topk(2, 1).values
    sure = (top2[:, 0] - top2[:, 1]) > 2 * bound
    assert torch.equal(p.argmax(1)[sure], y.argmax(1)[sure])


@pytest.mark.parametrize("name,imgsz", [("yolov8n-cls.yaml", 160), ("yolo26n-cls.yaml", 160),
                                        pytest.param("yolov8n-cls.yaml", 224, marks=pytest.mark.slow),
                                        pytest.param("yolo11n-cls.yaml", 224, marks=pytest.mark.slow)])
def test_classify_int8_and_onnx_match_fake_quant(name, imgsz, tmp_path):
    from fxqat.evaluate import OnnxRunner

    gm = _prepared(name, imgsz)
    lin = _linear(gm)
    conv = gm.get_submodule(lin.target)
    # the classifier: INT8 per-channel weights, float logits, its input on an 8-bit grid; softmax float
    assert conv.weight_fq is not None and conv.weight_fq.spec.bits == 8 and conv.weight_fq.spec.per_channel == 0
    assert info(lin).qspec.output is None and not any(isinstance(gm.get_submodule(u.target), FakeQuant)
                                                      for u in lin.users if u.op == "call_module")
    fq_in = gm.get_submodule(lin.args[0].target)
    step, zp = float(fq_in.scale), int(fq_in.zero_point)
    q = fxqat.convert(gm)
    # the head's tail on codes: the global pool sums them (no dequantize before it), the Dropout is gone
    mods = {n: q.get_submodule(n.target) for n in q.graph.nodes if n.op == "call_module"}
    (pool,) = [n for n, m in mods.items() if isinstance(m, Int8GlobalAvgPool)]
    assert isinstance(mods[pool.args[0]], Int8ConvBnAct) and not any(isinstance(m, nn.Dropout) for m in mods.values())
    ort = OnnxRunner(fxqat.export_onnx(gm, tmp_path / "cls.onnx", imgsz=imgsz))
    x = torch.cat([signs_like_images(4, imgsz, seed=11), torch.rand(4, 3, imgsz, imgsz)])

    got = {}

    def keep(key, fn):
        def hook(m, i, o):
            got.setdefault(key, fn(o))  # returns None: the output is left as it is

        return hook

    h1 = fq_in.register_forward_hook(keep("fq", lambda o: torch.round(o / step) + zp))
    # the INT8 model's input codes of the classifier: the image-side Quantize is folded into the conv that reads it
    # (QuantizeIntoConv), so they are the conv's float input quantized on its own input grid
    qconv = q.get_submodule(lin.target.replace(".", "_"))
    assert qconv.quantize_input and (qconv.x_scale, qconv.x_zp) == (step, zp)

    def codes(m, i):
        got.setdefault("q", torch.quantize_per_tensor(i[0], m.x_scale, m.x_zp, torch.quint8).int_repr().float())

    h2 = qconv.register_forward_pre_hook(codes)
    with torch.no_grad():
        gm(x), q(x)
    h1.remove(), h2.remove()
    w = conv.weight_fq(conv.folded()[0]).detach().flatten(1)
    with torch.no_grad():
        _check(gm, q, x, got["fq"], got["q"], step, w)
    _check(gm, ort, x, got["fq"], got["q"], step, w)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """One QAT epoch of yolov8n-cls through Ultralytics' ClassificationTrainer on generated sign crops."""
    from fxqat.data.signs import generate
    from fxqat.training import train_qat

    root = tmp_path_factory.mktemp("cls")
    data = generate(root / "data", train=40, val=16, imgsz=128, seed=0, task="classify", progress=False,
                    min_size=0.2, max_size=0.4)
    trainer, best = train_qat("yolov8n-cls.yaml", str(data), epochs=1, imgsz=64, batch=8,
                              project=str(root / "runs"), name="qat", workers=0, calib_batches=1, verbose=False)
    return data, trainer, best


@pytest.mark.slow
def test_classify_qat_checkpoint_and_eval(cls_run, tmp_path):
    import json

    from fxqat.checkpoint import load_checkpoint
    from fxqat.cli import main
    from fxqat.evaluate import evaluate

    data, trainer, best = cls_run
    assert type(trainer).__mro__[1].__name__ == "ClassificationTrainer"
    assert type(trainer.model.criterion).__name__ == "v8ClassificationLoss"
    assert type(trainer.validator).__name__ == "ClassificationValidator"
    gm = load_checkpoint(best)
    assert gm.meta["task"] == "classify"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x)[0], trainer.ema.ema.gm.eval()(x)[0])  # the checkpoint is the EMA model
    r = evaluate(best, str(data), imgsz=64, batch=8)
    assert r == pytest.approx({"top1": trainer.metrics["metrics/accuracy_top1"],
                               "top5": trainer.metrics["metrics/accuracy_top5"]}, abs=1e-6)
    out = tmp_path / "eval.json"
    assert main(["eval", str(best), f"data={data}", "imgsz=64", "batch=8", f"out={out}"]) == 0
    rows = json.loads(out.read_text())
    assert [row["model"] for row in rows] == ["QAT fake-quant", "INT8 torch", "QDQ ONNX (ORT)"]
    assert rows[0]["top1"] == pytest.approx(r["top1"], abs=1e-6)
    n_val = len(list((data / "val").rglob("*.png")))
    for row in rows[1:]:  # INT8 and ONNX: at most two images change class (one-code rounding differences)
        assert abs(row["top1"] - r["top1"]) <= 2 / n_val + 1e-6 and abs(row["top5"] - r["top5"]) <= 2 / n_val + 1e-6


def test_cli_export_of_a_classify_checkpoint(tmp_path, capsys):
    import onnx

    from fxqat.checkpoint import save_checkpoint
    from fxqat.cli import main

    gm = fxqat.prepare_qat(load_model("yolov8n-cls.yaml", nc=NC), example_inputs=(torch.rand(1, 3, 64, 64),))
    ckpt = save_checkpoint(tmp_path / "cls.pt", gm)
    assert main(["export", str(ckpt), "imgsz=64", f"out={tmp_path / 'cls.onnx'}"]) == 0
    assert "yolo predict task=classify" in capsys.readouterr().out
    m = onnx.load(str(tmp_path / "cls.onnx"))
    assert len(m.graph.output) == 1  # the softmax, as Ultralytics exports a classifier
    assert {p.key: p.value for p in m.metadata_props}["task"] == "classify"

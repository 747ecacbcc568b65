"""CUDA: prepare / calibrate / train (AMP) / eval / convert / export with the model on a GPU. Skipped without one
(the CPU checks of the same logic: tests/quant/test_fake_quant_fast.py::test_fake_quant_runs_in_float32_under_cpu_autocast,
tests/test_distributed.py)."""

import pytest
import torch

import fxqat
from fxqat.models import load_model
from fxqat.quant.fake_quant import FakeQuant

from .conftest_helpers import liven, signs_like_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _qat_on_cuda():
    gm = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10))).cuda()
    fxqat.calibrate(gm, [signs_like_images(2, 128, seed=s) for s in range(2)], progress=False)
    return gm


def test_qat_step_under_autocast():
    """A float16 autocast training step: every quantizer computes in float32, loss and gradients are finite, and the
    quantizer state stays on the GPU."""
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    from fxqat.data.toy import toy_batch

    det = load_model("yolov8n.yaml", nc=10)
    det.args = get_cfg()
    crit = v8DetectionLoss(det)
    gm = _qat_on_cuda().train()
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, a, y: dtypes.append((a[0].dtype, y.dtype)))
             for m in gm.modules() if isinstance(m, FakeQuant)]
    x, tgt = toy_batch(4, 128, seed=0)
    tgt = {k: v.cuda() if torch.is_tensor(v) else v for k, v in tgt.items()}
    crit.device = torch.device("cuda")
    opt = torch.optim.SGD(gm.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss, _ = crit(gm(x.cuda()), tgt)
    scaler.scale(loss.sum()).backward()
    scaler.step(opt)
    scaler.update()
    for h in hooks:
        h.remove()
    assert torch.isfinite(loss).all()
    assert any(i == torch.float16 for i, _ in dtypes)  # autocast did hand float16 activations to quantizers
    assert all(o == torch.float32 for _, o in dtypes)  # and every quantizer answered in float32
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in gm.parameters())
    assert all(b.is_cuda for b in gm.buffers())


def test_cuda_trained_model_converts_and_exports_with_parity(tmp_path, tiny_data):
    """fxqat qat on GPU 0 with AMP, then convert (INT8 torch) and export (QDQ ONNX) from the CUDA-trained model:
    INT8 outputs agree with its fake-quant forward as on CPU-trained models."""
    from fxqat.checkpoint import load_checkpoint
    from fxqat.evaluate import OnnxRunner, evaluate
    from fxqat.training import train_qat

    trainer, best = train_qat("yolov8n.yaml", tiny_data, epochs=1, imgsz=128, batch=8, project=str(tmp_path),
                              name="cuda", workers=0, calib_batches=1, device="0", amp=True, verbose=False)
    assert trainer.device.type == "cuda"
    gm = load_checkpoint(best).eval()
    r = evaluate(gm.cuda(), tiny_data, imgsz=128, batch=8)  # eval with the graph on the GPU
    assert 0.0 <= r["mAP50-95"] <= 1.0
    gm = gm.cpu()
    x = signs_like_images(1, 128, seed=5)
    with torch.no_grad():
        ref = gm(x)[0]
        out = fxqat.convert(gm)(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    # tolerance as tests/test_export.py: scores within one uint8 step, boxes within 1 px for >= 99.9 % of values
    assert ((ref[:, 4:] - out[:, 4:]).abs() <= 1 / 255).float().mean() >= 0.999
    path = fxqat.export_onnx(gm, tmp_path / "m.onnx", imgsz=128)
    onnx_out = OnnxRunner(path, threads=2)(x)
    assert ((ref[:, 4:] - onnx_out[:, 4:]).abs() <= 1 / 255).float().mean() >= 0.999
    assert ((ref[:, :4] - onnx_out[:, :4]).abs() <= 1.0).float().mean() >= 0.999

import fxqat
from fxqat.checkpoint import load_checkpoint
from fxqat.evaluate import evaluate


def test_evaluate_every_form(tiny_qat_run, tiny_data, tmp_path):
    _, best = tiny_qat_run
    gm = load_checkpoint(best)
    meta = (gm.meta["names"], gm.meta["stride"])
    onnx_path = fxqat.export_onnx(gm, tmp_path / "m.onnx", imgsz=128)
    results = {
        "fake-quant": evaluate(gm, tiny_data, imgsz=128, batch=8),
        "int8": evaluate(fxqat.convert(gm), tiny_data, imgsz=128, batch=8, names=meta[0], stride=meta[1]),
        "onnx": evaluate(str(onnx_path), tiny_data, imgsz=128, batch=8),
        "checkpoint path": evaluate(str(best), tiny_data, imgsz=128, batch=8),
    }
    for r in results.values():
        assert set(r) == {"mAP50", "mAP50-95", "precision", "recall"}
        assert 0.0 <= r["mAP50-95"] <= r["mAP50"] <= 1.0
    assert results["fake-quant"] == results["checkpoint path"]

"""The mAP a QAT checkpoint stores is the mAP ``fxqat eval`` reports for it (issue 15): the QAT trainer validates
with fxqat's own validation (every image letterboxed to the square ``imgsz``, the run's batch, the standalone
validator's model layout), not with Ultralytics' training validation (rectangular batches, twice the batch, the EMA's
own memory layout), each of which moved a fake-quant model's mAP by up to 1e-3."""

import json

from PIL import Image

MAP = "metrics/mAP50-95(B)"


def test_stored_map_is_what_fxqat_eval_reports(tmp_path, capsys):
    from fxqat.checkpoint import load_checkpoint
    from fxqat.cli import main
    from fxqat.data.signs import generate
    from fxqat.evaluate import evaluate
    from fxqat.training import train_qat

    # the shipped model's data settings (a trained start, so the mAPs compared are real numbers)
    data = generate(tmp_path / "d", train=16, val=16, imgsz=192, seed=0, min_size=0.12, progress=False)
    # wide validation images (a plain resize keeps YOLO's normalized labels valid): rectangular batches would run
    # them at 128x192, fxqat eval letterboxes them into 192x192
    for f in sorted((tmp_path / "d" / "images" / "val").iterdir()):
        Image.open(f).convert("RGB").resize((192, 128)).save(f)
    _, best = train_qat("fxqat-signs-yolov8n", data, epochs=1, imgsz=192, batch=8, project=str(tmp_path), name="q",
                        workers=0, calib_batches=1, verbose=False, ptq_epoch0=False)
    _, ck = load_checkpoint(best, with_extra=True)
    assert ck["epoch"] == 0  # a QAT epoch's own validation (no PTQ start competing)
    row = evaluate(best, data, imgsz=192, batch=8)
    assert row["mAP50-95"] > 0.3
    # the same computation (imgsz and batch as the run's): tolerance 1e-12
    assert abs(row["mAP50-95"] - ck["metrics"][MAP]) <= 1e-12, (row["mAP50-95"], ck["metrics"][MAP])
    # fxqat eval without imgsz / batch takes the run's own, so it reports the stored mAP too
    out = tmp_path / "eval.json"
    assert main(["eval", str(best), f"data={data}", "onnx=false", f"out={out}"]) == 0
    assert "eval: imgsz=192, batch=8 (the QAT run's own)" in capsys.readouterr().out
    cli = json.loads(out.read_text())[0]
    assert cli["model"] == "QAT fake-quant" and abs(cli["mAP50-95"] - ck["metrics"][MAP]) <= 1e-12

"""fxqat's exports run in Ultralytics as its own exports do: ``YOLO(path).val / .predict / .track``.

The model is a yolov8n whose Detect head is set to give confident, well-sized boxes (a model trained for seconds
finds nothing, and a parity check on 0 mAP proves nothing), and the val set is tiny_data's val images labelled with
the INT8 model's own top boxes. On these labels mAP is high, and any mistake on Ultralytics' side of the plumbing —
wrong input size, stride, class ids, batch handling or box scaling — moves it.
"""

import ast
import importlib.util
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.cli import main
from fxqat.deploy import (_onnx_value, as_yolo, export_openvino, openvino_predictor, parse_metadata,
                          next_commands, read_onnx_metadata, yolo_metadata)
from fxqat.evaluate import OnnxRunner, evaluate

from .conftest_helpers import liven, signs_like_images

IMGSZ = 128
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino not installed (pip install 'fxqat[openvino]')")
needs_lap = pytest.mark.skipif(importlib.util.find_spec("lap") is None,
                               reason="lap not installed: Ultralytics' trackers would pip-install it at run time")
# Ultralytics' own runs vs fxqat's evaluation of the same form: the same backend on the same letterboxed batch, so the
# detections are bit-identical and the metrics agree to float round-off (observed: exactly equal).
MAP_TOL = 1e-6


def _image(path) -> torch.Tensor:
    """An image as Ultralytics feeds it at imgsz=128 (these are 128 px: no resize, no padding): RGB, [0, 1]."""
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()[None] / 255


def _detections(fn, img: torch.Tensor, max_det: int = 5) -> torch.Tensor:
    """(n, 6) xyxy, conf, cls: Ultralytics' NMS at its val settings on ``fn``'s decoded output."""
    from ultralytics.utils.nms import non_max_suppression

    with torch.no_grad():
        out = fn(img)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return non_max_suppression(out, conf_thres=0.001, iou_thres=0.7, max_det=max_det)[0]


@torch.no_grad()
def _confident_head(model, seed: int = 0):
    """Detect's last convs scaled so a random net gives boxes of a few strides (DFL bins biased low) and class
    scores spread over (0, 1), instead of image-sized boxes at 0.002 confidence."""
    g = torch.Generator().manual_seed(seed)
    det = model.model[-1]
    for box, cls in zip(det.cv2, det.cv3):
        box[-1].weight.mul_(4.0)
        box[-1].bias.copy_((-0.8 * torch.arange(det.reg_max)).repeat(4))
        cls[-1].weight.mul_(10.0)
        cls[-1].bias.copy_(torch.randn(cls[-1].bias.shape, generator=g) * 1.5 - 4)
    return model


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    from fxqat.checkpoint import save_checkpoint
    from fxqat.models import load_model

    torch.manual_seed(0)  # the model's initial weights: the same labels and mAP every run
    gm = fxqat.prepare_qat(_confident_head(liven(load_model("yolov8n.yaml", nc=10))))
    fxqat.calibrate(gm, [signs_like_images(4, IMGSZ, seed=0)], progress=False)
    gm.eval()
    out = tmp_path_factory.mktemp("deploy")
    return {"best": save_checkpoint(out / "qat.pt", gm), "gm": gm, "int8": fxqat.convert(gm), "dir": out,
            "onnx": fxqat.export_onnx(gm, out / "qat.onnx", imgsz=IMGSZ)}


@pytest.fixture(scope="module")
def labelled(forms, tiny_data, tmp_path_factory):
    """tiny_data's val images, labelled with the INT8 model's 5 best boxes per image, each corner moved by up to
    3 px (seeded: mAP50-95 then sits below its ceiling, where small box differences show) → (data.yaml, images)."""
    src = yaml.safe_load(tiny_data.read_text())
    root = tmp_path_factory.mktemp("selflabelled")
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    images = sorted((tiny_data.parent / src["val"]).glob("*.png"))
    g = torch.Generator().manual_seed(0)
    for p in images:
        shutil.copy(p, root / "images" / "val" / p.name)
        det = _detections(forms["int8"], _image(p))
        det[:, :4] += (torch.rand(len(det), 4, generator=g) * 2 - 1) * 3
        lines = []
        for x1, y1, x2, y2, _, c in det.tolist():
            x1, y1, x2, y2 = (min(max(v, 0.0), IMGSZ) for v in (x1, y1, x2, y2))
            if x2 - x1 > 2 and y2 - y1 > 2:
                lines.append(f"{int(c)} {(x1 + x2) / 2 / IMGSZ:.6f} {(y1 + y2) / 2 / IMGSZ:.6f} "
                             f"{(x2 - x1) / IMGSZ:.6f} {(y2 - y1) / IMGSZ:.6f}\n")
        assert lines, f"{p.name}: the model found nothing to label"
        (root / "labels" / "val" / f"{p.stem}.txt").write_text("".join(lines))
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val",
                                    "names": src["names"]}))
    return data, sorted((root / "images" / "val").glob("*.png"))


def _ultralytics_ov_precision(folder) -> str:
    import openvino as ov

    compiled = ov.Core().compile_model(str(next(folder.glob("*.xml"))), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    return compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # as Ultralytics' OpenVINO backend


def _yolo_val(y, data):
    # rect=False as fxqat's evaluate runs (Ultralytics forces it for fixed-shape exports; for a torch model its
    # default rect=True pads these 128 px images to 160, which changes this random-weight model's boxes)
    m = y.val(data=str(data), imgsz=IMGSZ, batch=8, plots=False, device="cpu", verbose=False, rect=False)
    return {"mAP50": float(m.box.map50), "mAP50-95": float(m.box.map)}


def _assert_same_map(ultra: dict, own: dict):
    print(f"\nmAP50 / mAP50-95: Ultralytics {ultra['mAP50']:.6f} / {ultra['mAP50-95']:.6f}, "
          f"fxqat {own['mAP50']:.6f} / {own['mAP50-95']:.6f}")
    assert own["mAP50"] > 0.5, own  # the labels are this model's own boxes: a broken pipeline scores far lower
    for k in ("mAP50", "mAP50-95"):
        assert abs(ultra[k] - own[k]) <= MAP_TOL, (k, ultra, own)


def _assert_same_boxes(results, ref: torch.Tensor):
    """Ultralytics' predict results == fxqat's detections (same boxes, scores, classes; 1e-3 px / 1e-5 round-off)."""
    assert len(results) == 1
    got = results[0].boxes.data[: len(ref)]
    ref = ref.clone()
    ref[:, :4] = ref[:, :4].clamp(0, IMGSZ)  # Ultralytics clips boxes to the image
    assert got.shape == ref.shape and len(ref) > 0
    assert torch.allclose(got[:, :4], ref[:, :4], atol=1e-3)
    assert torch.allclose(got[:, 4], ref[:, 4], atol=1e-5)
    assert torch.equal(got[:, 5], ref[:, 5])


# ------------------------------------------------------------------------------------------------------------- ONNX
def test_onnx_metadata_is_ultralytics(forms):
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.nn.tasks import guess_model_task

    path, gm = forms["onnx"], forms["gm"]
    ab = AutoBackend(str(path))  # this raised "invalid literal for int() with base 10: '[8, 16, 32]'"
    assert (ab.stride, ab.task, ab.batch, ab.imgsz, ab.channels) == (32, "detect", 1, [IMGSZ, IMGSZ], 3)
    assert ab.names == gm.meta["names"] and ab.metadata["producer"] == "fxqat"
    assert ab.metadata["head"] == "Detect" and ab.metadata["args"]["quantize"] == 8
    assert guess_model_task(str(path)) == "detect"  # YOLO(path) needs no task=
    # every key Ultralytics' exporter writes (Exporter.metadata for a detector)
    assert {"description", "author", "date", "version", "license", "docs", "stride", "task", "head", "batch", "imgsz",
            "names", "args", "channels", "end2end"} <= set(ab.metadata)
    run = OnnxRunner(path)
    assert [o.name for o in run.session.get_outputs()] == ["output0"]
    assert tuple(run(torch.zeros(1, 3, IMGSZ, IMGSZ)).shape) == (1, 4 + len(gm.meta["names"]), 336)
    assert read_onnx_metadata(path)["stride"] == 32


def test_old_fxqat_metadata_still_reads():
    md = parse_metadata({"stride": "[8, 16, 32]", "names": '{"0": "stop", "1": "yield"}', "imgsz": "[320, 320]"})
    assert md == {"stride": 32, "names": {0: "stop", 1: "yield"}, "imgsz": [320, 320]}
    with pytest.raises(fxqat.ModelLoadError, match="metadata imgsz="):
        parse_metadata({"imgsz": "320 by 320"})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.integers(0, 999), st.text(max_size=12), min_size=1, max_size=6))
def test_names_value_reads_as_python_and_json(names):
    s = _onnx_value("names", names)
    assert {int(k): v for k, v in ast.literal_eval(s).items()} == names  # Ultralytics' AutoBackend
    assert {int(k): v for k, v in json.loads(s).items()} == names  # fxqat.evaluate and JSON readers


def test_metadata_values():
    md = yolo_metadata({"names": {0: "a"}, "stride": torch.tensor([8.0, 16.0, 64.0]), "yaml": {"yaml_file":
                        "yolo11n.yaml", "head": [[[1, 2], 1, "Detect", [1]]], "channels": 3}}, (96, 160), batch=2,
                       dynamic=True, fmt="openvino")
    assert (md["stride"], md["imgsz"], md["batch"], md["head"]) == (64, [96, 160], 2, "Detect")
    assert md["args"] == {"batch": 2, "dynamic": True, "quantize": 8, "nms": False}
    assert "YOLO11n" in md["description"]
    with pytest.raises(fxqat.FxqatError, match="valid choices: onnx, openvino"):
        yolo_metadata({}, 320, fmt="tflite")


def test_onnx_val_and_predict_in_ultralytics(forms, labelled):
    from ultralytics import YOLO

    data, images = labelled
    path = str(forms["onnx"])
    _assert_same_map(_yolo_val(YOLO(path), data), evaluate(path, data, imgsz=IMGSZ, batch=8))
    res = YOLO(path).predict(str(images[0]), imgsz=IMGSZ, conf=0.001, max_det=5, device="cpu", verbose=False)
    _assert_same_boxes(res, _detections(OnnxRunner(path), _image(images[0])))


# --------------------------------------------------------------------------------------------------------- OpenVINO
@pytest.fixture(scope="module")
def ov_folder(forms):
    return export_openvino(forms["onnx"])


@needs_openvino
def test_openvino_layout_is_ultralytics(forms, ov_folder):
    from ultralytics.nn.autobackend import AutoBackend

    assert ov_folder == forms["dir"] / "qat_int8_openvino_model"  # Ultralytics' name for an INT8 export of qat.pt
    assert sorted(p.name for p in ov_folder.iterdir()) == ["metadata.yaml", "qat.bin", "qat.xml"]
    md = yaml.safe_load((ov_folder / "metadata.yaml").read_text())
    assert (md["stride"], md["imgsz"], md["task"], md["producer"]) == (32, [IMGSZ, IMGSZ], "detect", "fxqat")
    assert md["args"] == {"batch": 1, "dynamic": False, "quantize": 8, "nms": False}
    ab = AutoBackend(str(ov_folder))
    assert ab.format == "openvino" and ab.names == forms["gm"].meta["names"] and ab.stride == 32
    with pytest.raises(fxqat.FxqatError, match="must end in '_openvino_model'"):
        export_openvino(forms["onnx"], forms["dir"] / "elsewhere")


@needs_openvino
def test_openvino_val_and_predict_in_ultralytics(ov_folder, labelled):
    from ultralytics import YOLO

    data, images = labelled
    # fxqat's runner at the float precision Ultralytics' OpenVINO backend compiles with on this CPU (its default:
    # bf16 where the CPU has avx512_bf16 / AMX, else f32), so the comparison checks the folder, not the precision
    own = openvino_predictor(ov_folder, precision=_ultralytics_ov_precision(ov_folder))
    _assert_same_map(_yolo_val(YOLO(str(ov_folder)), data), evaluate(own, data, imgsz=IMGSZ, batch=8))
    res = YOLO(str(ov_folder)).predict(str(images[0]), imgsz=IMGSZ, conf=0.001, max_det=5, device="cpu",
                                       verbose=False)
    _assert_same_boxes(res, _detections(own, _image(images[0])))


# ------------------------------------------------------------------------------------------------------- INT8 torch
def test_int8_torch_val_and_predict_in_ultralytics(forms, labelled):
    data, images = labelled
    int8, meta = forms["int8"], forms["gm"].meta
    y = as_yolo(forms["best"])  # the checkpoint path: loaded and converted
    assert y.task == "detect" and y.names == meta["names"]
    own = evaluate(int8, data, imgsz=IMGSZ, batch=8, names=meta["names"], stride=meta["stride"])
    assert own["mAP50"] > 0.9  # the labels are this very model's boxes
    _assert_same_map(_yolo_val(y, data), own)
    res = as_yolo(int8).predict(str(images[0]), imgsz=IMGSZ, conf=0.001, max_det=5, device="cpu", verbose=False)
    _assert_same_boxes(res, _detections(int8, _image(images[0])))


def test_as_yolo_refuses_what_it_cannot_run(forms, tmp_path):
    with pytest.raises(fxqat.FxqatError, match="valid: detect"):
        as_yolo(forms["int8"], task="segment")
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(fxqat.ModelLoadError, match="not an fxqat QAT checkpoint"):
        as_yolo(tmp_path / "x.pt")
    with pytest.raises(fxqat.ModelLoadError, match="not an fxqat INT8 model or QAT graph"):
        as_yolo(torch.nn.Conv2d(3, 3, 1))


@needs_lap
@pytest.mark.parametrize("form", ["int8", "onnx", pytest.param("openvino", marks=needs_openvino)])
def test_track_runs_on_a_frame_sequence(form, forms, labelled, tmp_path, request):
    """Four frames of one image sliding right by 4 px: the same objects, so the tracker keeps their ids."""
    from ultralytics import YOLO

    _, images = labelled
    img = cv2.imread(str(images[0]))
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        cv2.imwrite(str(frames / f"{i:03d}.png"), np.roll(img, 4 * i, axis=1))
    tracker = tmp_path / "tracker.yaml"  # ByteTrack with thresholds for this model's scores (~0.9 at best)
    tracker.write_text(yaml.safe_dump({"tracker_type": "bytetrack", "track_high_thresh": 0.5, "track_low_thresh":
                                       0.1, "new_track_thresh": 0.5, "track_buffer": 30, "match_thresh": 0.8,
                                       "fuse_score": True}))
    y = {"int8": lambda: as_yolo(forms["int8"]), "onnx": lambda: YOLO(str(forms["onnx"])),
         "openvino": lambda: YOLO(str(request.getfixturevalue("ov_folder")))}[form]()
    res = y.track(str(frames), imgsz=IMGSZ, tracker=str(tracker), device="cpu", verbose=False)
    assert len(res) == 4
    ids = [set(r.boxes.id.int().tolist()) if r.boxes.id is not None else set() for r in res]
    assert ids[-1] and ids[-1] & ids[1]  # tracks confirmed on frame 2 live on to frame 4


# --------------------------------------------------------------------------------------------------------------- CLI
@needs_openvino
def test_export_command_writes_what_yolo_loads(forms, tmp_path, capsys):
    from ultralytics import YOLO

    best = shutil.copy(forms["best"], tmp_path / "best.pt")
    assert main(["export", str(best), "format=openvino", f"imgsz={IMGSZ}", "report=false"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "best_int8_openvino_model"
    assert f"yolo predict task=detect model={folder}/ imgsz={IMGSZ} source=" in out
    assert f"yolo val task=detect model={folder}/ imgsz={IMGSZ} data=" in out
    assert not (tmp_path / "best.onnx").exists()  # OpenVINO's input, not a result
    assert len(YOLO(str(folder)).predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), verbose=False)) == 1


def test_export_hints_name_the_training_data(tiny_qat_run, tiny_data, capsys):
    _, best = tiny_qat_run  # its checkpoint records the data YAML it was trained on
    out = best.parent / "hint.onnx"
    assert main(["export", str(best), f"imgsz={IMGSZ}", "report=false", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert f"yolo predict task=detect model={out} imgsz={IMGSZ} source={tiny_data.parent / 'images' / 'val'}" in text
    assert f"data={tiny_data}" in text


def test_next_commands(tmp_path):
    lines = next_commands(tmp_path / "m.onnx", 320, data="d.yaml", source=tmp_path / "val")
    assert lines == [f"Predict:   yolo predict task=detect model={tmp_path / 'm.onnx'} imgsz=320 source={tmp_path / 'val'}",
                     f"Validate:  yolo val task=detect model={tmp_path / 'm.onnx'} imgsz=320 data=d.yaml"]
    assert f"model={tmp_path}/ " in next_commands(tmp_path, 320)[0]  # a folder model, as Ultralytics prints it


def test_export_command_refusals(forms, capsys):
    best = str(forms["best"])
    assert main(["export", best, "format=torchscript"]) == 2  # refused where the command line is read, saying why
    assert "torch.jit.trace cannot record" in capsys.readouterr().err
    assert main(["export", best, "format=tflite"]) == 2
    assert "valid choices: onnx, openvino" in capsys.readouterr().err
    assert main(["export", best, "format=openvino", "out=somewhere"]) == 1
    assert "ends in '_openvino_model'" in capsys.readouterr().err

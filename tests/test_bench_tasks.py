"""The deployment suite (``python -m benchmarks``) builds its rows for task models: segment and classify here.

No timings are asserted (speed lives in benchmarks/README.md). What is checked: every requested row is built and runs
on the model's input, or is skipped with a note naming it; the FP32 ONNX export of each task gives the torch model's
outputs (random weights; tolerance 1e-3 absolute + 1e-4 relative: float reassociation in ONNX Runtime's kernels on
boxes of up to 64 px); INT8 rows give outputs of the FP32 model's shapes (segment: predictions and prototypes).
"""

import argparse
import importlib.util

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.deploy import build, model_imgsz, parse_models, ratios_of, select_rows
from benchmarks.peers import DECODE_PATTERN, decode_nodes

IMGSZ = 64
# the rows that touch each task's own export paths: the FP32 export the peers quantize (segment: two outputs) and
# fxqat's OpenVINO form; classify also converts to INT8 torch (seconds; segment's convert is in the slow test)
FAST_ROWS = {"segment": ["ONNX Runtime FP32", "fxqat QDQ on OpenVINO"],
             "classify": ["ONNX Runtime FP32", "fxqat INT8 torch", "fxqat QDQ on OpenVINO"]}


def _args(rows=None, **kw):
    return argparse.Namespace(threads=1, imgsz=IMGSZ, cls_imgsz=IMGSZ, data=None, calib=2, fp32=None,
                              placement_ab=False, rows=rows, **kw)


def _outputs(out, n: int) -> list[torch.Tensor]:
    """The first ``n`` output tensors of any row: torch eval ((y, proto), raw) / (y, raw) / (softmax, logits), ONNX
    Runtime (y, proto) / y, OpenVINO's result dict."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and isinstance(out[0], (tuple, list)):
        out = out[0]
    seq = out if isinstance(out, (tuple, list)) else [out]
    return [torch.as_tensor(np.asarray(o)) for o in seq if not isinstance(o, dict)][:n]


def _check_rows(rows, notes, info, expected):
    n = 2 if info["task"] == "segment" else 1
    x = torch.rand(1, 3, info["imgsz"], info["imgsz"])
    with torch.no_grad():
        ref = _outputs(rows["torch FP32"][0](x), n)
        for row in expected:
            if row not in rows:  # skipped: a note must say so, naming the row
                assert any(f"row '{row}' skipped" in m for m in notes), (row, notes)
                continue
            out = _outputs(rows[row][0](x), n)
            assert [o.shape for o in out] == [r.shape for r in ref], row
            if row.endswith("FP32"):
                for o, r in zip(out, ref):
                    torch.testing.assert_close(o.float(), r, atol=1e-3, rtol=1e-4)
    assert set(rows) - {"torch FP32"} <= set(expected)


@pytest.mark.parametrize("name,task", [("yolov8n-seg", "segment"), ("yolov8n-cls", "classify")])
def test_task_rows_build_and_run(tmp_path, name, task):
    expected = FAST_ROWS[task]
    rows, notes, info = build(_args(",".join(expected)), tmp_path, f"{name}.yaml")
    assert info == {"name": name, "task": task, "imgsz": IMGSZ}
    if importlib.util.find_spec("openvino") is not None:
        assert "fxqat QDQ on OpenVINO" in rows, notes
    assert any(task in m and "float tail" in m for m in notes)
    _check_rows(rows, notes, info, expected)
    # the peers' ignored scope matches the task's decode leaf in the FP32 export: Classify's softmax only
    ops = decode_nodes(tmp_path / "fp32.onnx")
    assert ops and all("/decode/" in o for o in ops), DECODE_PATTERN
    if task == "classify":
        assert [o.rsplit("/", 1)[1] for o in ops] == ["Softmax"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n-seg", "yolov8n-cls"])
def test_task_rows_all_peers(tmp_path, name):
    """Every row, the peers' PTQ among them (NNCF alone takes ~20 s here): built and run, or skipped with a note."""
    rows, notes, info = build(_args(), tmp_path, f"{name}.yaml")
    expected = ["ONNX Runtime FP32", "ONNX Runtime INT8 (quantize_static)", "OpenVINO FP32",
                "OpenVINO NNCF INT8 (PTQ)", "plain torch.ao INT8 (onednn)", "fxqat INT8 torch",
                "fxqat QDQ on ONNX Runtime", "fxqat QDQ on OpenVINO", "fxqat QDQ [onnxruntime.yaml] on ONNX Runtime"]
    _check_rows(rows, notes, info, expected)
    if info["task"] == "segment":  # torch.ao has no per-channel observer for Proto's ConvTranspose
        assert any("plain torch.ao" in m and "ConvTranspose" in m for m in notes), notes


def test_classify_size_and_ratios():
    a = _args()
    a.imgsz, a.cls_imgsz = 640, 224
    assert (model_imgsz("classify", None, a), model_imgsz("segment", None, a), model_imgsz("classify", 96, a)) == \
        (224, 640, 96)
    med = {"fxqat QDQ on OpenVINO": 8.0, "OpenVINO NNCF INT8 (PTQ)": 10.0, "fxqat INT8 torch": 15.0}
    got = {r["ratio"]: r["value"] for r in ratios_of("m", med)}
    assert got == {"OpenVINO: fxqat QDQ / NNCF PTQ": 0.8, "fxqat INT8 torch / NNCF PTQ": 1.5}
    assert ratios_of("m", {"fxqat INT8 torch": 1.0}) == []  # NNCF skipped: no ratio, the row's note says why


def test_select_rows():
    b = [("ONNX Runtime FP32", 1), ("OpenVINO FP32", 2), ("fxqat INT8 torch", 3)]
    assert select_rows(b, None) == b
    assert select_rows(b, "openvino, INT8 TORCH") == b[1:]
    with pytest.raises(SystemExit, match="tensorrt: matches no row; rows: torch FP32"):
        select_rows(b, "tensorrt")


_name = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(_name, st.one_of(st.none(), st.integers(1, 64).map(lambda k: 32 * k))), min_size=1,
                max_size=5))
def test_parse_models_roundtrip(items):
    text = ",".join(n if s is None else f"{n}@{s}" for n, s in items)
    assert parse_models(text) == [(f"{n}.yaml", s) for n, s in items]


@settings(max_examples=25, deadline=None)
@given(_name, st.one_of(st.integers(0, 4096).filter(lambda v: v % 32 or v < 32).map(str),
                        st.from_regex(r"[a-z.]{1,4}", fullmatch=True)))
def test_parse_models_refuses_bad_sizes(name, size):
    with pytest.raises(SystemExit, match="NAME@SIZE"):
        parse_models(f"{name}@{size}")


def test_parse_models_files_and_empty():
    assert parse_models("a.pt, b.yaml@320") == [("a.pt", None), ("b.yaml", 320)]
    with pytest.raises(SystemExit, match="no model given"):
        parse_models(" , ")


def test_end2end_rows_are_built_from_the_one_to_one_network(tmp_path):
    """``--end2end``: the reference and fxqat's rows (and every peer's) run the one-to-one top-k network; a model
    without that head is refused."""
    rows, notes, info = build(_args(rows="fxqat INT8 torch", end2end=True), tmp_path, "yolo26n.yaml")
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        for row in ("torch FP32", "fxqat INT8 torch"):
            out = rows[row][0](x)
            y = out[0] if isinstance(out, tuple) else out
            assert y.shape == (1, 8 * 8 + 4 * 4 + 2 * 2, 6), row  # top-k rows (k = all 84 anchors < max_det)
    with pytest.raises(SystemExit, match="no end-to-end"):
        build(_args(end2end=True), tmp_path, "yolov8n.yaml")

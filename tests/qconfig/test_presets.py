"""Built-in presets: each differs from default.yaml in what its comment claims, and ships as package data."""

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import fxqat
from fxqat.errors import QConfigError
from fxqat.graph.meta import info
from fxqat.qconfig import load_qconfig
from fxqat.qconfig.io import preset_names, preset_text
from fxqat.quant.fake_quant import FakeQuant
from fxqat.quant.spec import NodeQSpec

REPO = Path(__file__).parents[2]
PRESETS = ("default", "head_float", "mixed_w4", "onnxruntime", "openvino_avx2", "tensorrt", "w4a8")
_CACHE: dict = {}


def _prepared(name):
    """(node name → NodeQSpec, quantizer path → FakeQuant) of yolov8n prepared with preset ``name``."""
    if name not in _CACHE:
        gm = fxqat.prepare_qat("yolov8n.yaml", name)
        specs = {n.name: info(n).qspec for n in gm.graph.nodes if isinstance(info(n).qspec, NodeQSpec)}
        scopes = {n.name: info(n) for n in gm.graph.nodes}
        fqs = {p: m for p, m in gm.named_modules() if isinstance(m, FakeQuant) and p.startswith("quant.")}
        _CACHE[name] = (specs, scopes, fqs)
    return _CACHE[name]


def test_preset_list_is_the_package_data():
    assert preset_names() == PRESETS
    assert "openvino" not in preset_names()  # it equalled default.yaml; default.yaml says it is OpenVINO's preset
    for name in PRESETS:
        assert load_qconfig(name) == load_qconfig(f"{name}.yaml")
        assert load_qconfig(name).source == f"fxqat/qconfigs/{name}.yaml"


def test_presets_load_by_name_and_a_file_on_disk_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tensorrt.yaml").write_text("version: 1\nweight: {bits: 6}\n")
    assert load_qconfig("tensorrt.yaml").weight.bits == 6  # the file in the working directory
    assert load_qconfig("tensorrt").activation.symmetric  # the bare name: the preset
    with pytest.raises(QConfigError, match=r"no such qconfig file or built-in preset \(did you mean 'tensorrt'") as e:
        load_qconfig("tensorrtt")
    assert all(n in str(e.value) for n in PRESETS)
    with pytest.raises(QConfigError, match="no such qconfig file; built-in presets load by name"):
        load_qconfig("qconfigs/onnxruntime.yaml")  # the old location works only where that file exists
    (tmp_path / "qconfigs").mkdir()
    (tmp_path / "qconfigs" / "onnxruntime.yaml").write_text(preset_text("onnxruntime"))
    assert load_qconfig("qconfigs/onnxruntime.yaml").preact is not None
    with pytest.raises(QConfigError, match="not a file"):
        load_qconfig(tmp_path / "qconfigs")


def test_head_float_keeps_the_whole_detect_head_float():
    d, scopes, _ = _prepared("default")
    h, _, _ = _prepared("head_float")
    head = [n for n in h if any(t == "Detect" for _, t in scopes[n].scope)]
    convs = [n for n in head if not d[n].shared]
    assert len(convs) == 18  # 3 levels × 2 branches × 3 convs
    assert all(h[n].weight is None and h[n].output is None for n in head)
    assert all(d[n].weight is not None for n in convs)  # default: INT8 weights there
    assert all(h[n] == d[n] for n in h if n not in head)  # backbone and neck as default


def test_mixed_w4_has_4_bit_weights_in_layers_4_to_6_only():
    d, scopes, _ = _prepared("default")
    m, _, _ = _prepared("mixed_w4")
    four = {n for n, q in m.items() if q.weight is not None and q.weight.bits == 4}
    expected = {n for n, q in m.items() if q.weight is not None and scopes[n].layer in (4, 5, 6)}
    assert four == expected and len(four) >= 10
    assert all(d[n].weight.bits == 8 for n in four)


def test_onnxruntime_quantizes_preactivations_sigmoids_and_head_outputs():
    d, _, dq = _prepared("default")
    o, _, oq = _prepared("onnxruntime")
    convs = [n for n, q in o.items() if q.weight is not None]
    assert all(o[n].preact is not None and o[n].sigmoid.fixed == (1 / 255, 0) for n in convs
               if o[n].output is not None)
    assert all(d[n].preact is None for n in d)
    last = [n for n in o if n.startswith("model_22_cv") and n.endswith("_2")]
    assert len(last) == 6 and all(o[n].output is not None and d[n].output is None for n in last)
    assert len(oq) > len(dq)  # head outputs get quantizers of their own


def test_tensorrt_is_symmetric_int8_everywhere_including_the_input():
    _, _, dq = _prepared("default")
    t, _, tq = _prepared("tensorrt")
    assert all(q.spec.symmetric and q.qmin == -128 for q in tq.values())  # every activation grid, zero-point 0
    assert all(int(q.zero_point.abs().max()) == 0 for q in tq.values() if q.spec.fixed is not None)
    inp = tq["quant.x"]
    assert inp.spec.fixed == (pytest.approx(1 / 127), 0) and float(inp.scale) == pytest.approx(1 / 127)
    assert dq["quant.x"].spec.fixed == (pytest.approx(1 / 255), 0) and not dq["quant.x"].spec.symmetric
    assert all(q.weight.symmetric and q.weight.per_channel == 0 for q in t.values() if q.weight is not None)


def test_wheel_ships_the_presets(tmp_path):
    """Build the wheel offline (about 6 s) and load every preset through importlib.resources from its contents."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    shutil.copytree(REPO / "fxqat", src / "fxqat", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("fxqat-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert sorted(p.stem for p in (site / "fxqat" / "qconfigs").glob("*.yaml")) == sorted(PRESETS)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        import fxqat
        assert fxqat.__file__.startswith({str(site)!r}), fxqat.__file__
        from fxqat.qconfig.io import load_qconfig, preset_names
        assert preset_names() == {PRESETS!r}, preset_names()
        for name in preset_names():
            load_qconfig(name)
        print("loaded", len(preset_names()))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "YOLO_OFFLINE": "1", "HOME": str(Path.home())})
    assert run.returncode == 0 and f"loaded {len(PRESETS)}" in run.stdout, run.stderr[-2000:]

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.errors import QConfigError
from fxqat.qconfig import QConfig, load_qconfig
from fxqat.qconfig.schema import LEVELS, SPEC_KEYS
from fxqat.qconfig.io import RULE_KEYS, TOP_KEYS, dump_qconfig

PRESETS = sorted((Path(fxqat.__file__).parent / "qconfigs").glob("*.yaml"))


def test_builtin_preset_by_name():
    assert load_qconfig("tensorrt.yaml").activation.symmetric is True


def _write(tmp_path, text):
    p = tmp_path / "q.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_line_and_choices(tmp_path):
    p = _write(tmp_path, "version: 1\nweight: {bits: 8}\nactivaton: {bits: 8}\n")
    with pytest.raises(QConfigError) as e:
        load_qconfig(p)
    msg = str(e.value)
    assert f"{p}:3" in msg and "activaton" in msg and "activation" in msg


def test_bad_value_and_rule_errors(tmp_path):
    cases = {
        "version: 1\nweight:\n  bits: 32\n": ("bits=32", ":3"),
        "version: 1\nactivation:\n  observer: magic\n": ("valid choices", ":3"),
        "version: 2\n": ("supported: 1", ":1"),
        "weight: {bits: 8}\n": ("version", ""),
        "version: 1\nrules:\n  - match: {role: c2f.concat}\n    skip: true\n    weight: {bits: 4}\n": ("conflicting", ":3"),
        "version: 1\nrules:\n  - match: {colour: red}\n    skip: true\n": ("valid: block, role", ":3"),
        "version: 1\nrules:\n  - match: {role: c2f.cv1}\n    weight: {bitz: 4}\n": ("bitz", ":4"),
        "version: 1\nrules:\n  - match: {role: c2f.cv1}\n": ("sets nothing", ":3"),
        "version: 1\nweight: [1, 2\n": ("YAML syntax error", ":"),
        "version: 1\nversion: 1\n": ("duplicate key", ":2"),
        "version: 1\nsigmoid: true\n": ("needs preact", ":2"),
        "version: 1\npreact: true\nsigmoid: {bits: 8, fixed: 1}\n": ("sigmoid key 'fixed'", ":3"),
    }
    for text, (frag, line) in cases.items():
        p = _write(tmp_path, text)
        with pytest.raises(QConfigError) as e:
            load_qconfig(p)
        assert frag in str(e.value) and f"{p}{line}" in str(e.value), (text, str(e.value))


def test_rule_matching_nothing_is_an_error():
    qc = load_qconfig("version: 1\nrules:\n  - match: {module: 'model.99.*'}\n    skip: true\n")
    with pytest.raises(QConfigError, match="matches no quantizable node"):
        fxqat.prepare_qat("yolov8n.yaml", qc)


def test_precedence_global_block_role_module_name():
    text = """version: 1
rules:
  - match: {name: model_2_cv1}
    weight: {bits: 6}
  - match: {module: "model.2.*"}
    weight: {bits: 5}
  - match: {role: c2f.cv1}
    weight: {bits: 4}
  - match: {block: C2f}
    weight: {bits: 3}
  - match: {block: C2f}
    activation: {bits: 7}
"""
    gm = fxqat.prepare_qat("yolov8n.yaml", load_qconfig(text))
    from fxqat.graph.meta import info

    from fxqat.quant.spec import NodeQSpec

    q = {n.name: info(n).qspec for n in gm.graph.nodes if isinstance(info(n).qspec, NodeQSpec)}
    assert q["model_2_cv1"].weight.bits == 6  # exact name beats everything
    assert q["model_2_cv2"].weight.bits == 5  # module glob beats role and block
    assert q["model_4_cv1"].weight.bits == 4  # role beats block
    assert q["model_4_m_0_cv1"].weight.bits == 3  # block beats global
    assert q["model_4_m_0_cv1"].output.bits == 7  # a later rule of the same level adds its own fields
    assert q["model_1"].weight.bits == 8  # global


def test_dump_roundtrip():
    qc = load_qconfig(PRESETS[0].parent / "mixed_w4.yaml")
    again = load_qconfig(dump_qconfig(qc))
    assert again.weight == qc.weight and again.activation == qc.activation
    assert [(r.level, r.pattern, r.weight) for r in again.rules] == [(r.level, r.pattern, r.weight) for r in qc.rules]
    for name in PRESETS:  # every preset, the fixed input grid and percentile settings included
        qc = load_qconfig(name)
        again = load_qconfig(dump_qconfig(qc))
        for k in ("weight", "activation", "input", "preact", "sigmoid"):
            assert getattr(again, k) == getattr(qc, k), (name, k)
        assert [(r.level, r.pattern, r.weight, r.activation, r.skip) for r in again.rules] == \
            [(r.level, r.pattern, r.weight, r.activation, r.skip) for r in qc.rules]
    qc = load_qconfig("version: 1\nactivation: {observer: percentile, percentile: 99.5}\n")
    assert load_qconfig(dump_qconfig(qc)).activation == qc.activation


def test_sigmoid_grid_is_fixed_by_bits_and_sign(tmp_path):
    qc = load_qconfig(_write(tmp_path, "version: 1\npreact: true\nsigmoid: true\n"))
    assert qc.sigmoid.fixed == (1 / 255, 0)  # (0, 1) onto 0..255
    qc = load_qconfig(_write(tmp_path, "version: 1\npreact: true\nsigmoid: {symmetric: true}\n"))
    assert qc.sigmoid.fixed == (1 / 255, -128)  # (0, 1) onto -128..127
    again = load_qconfig(dump_qconfig(load_qconfig("onnxruntime.yaml")))
    assert again.sigmoid == load_qconfig("onnxruntime.yaml").sigmoid and again.preact is not None


def test_torch_ao_qconfig_mapping():
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    m = get_default_qat_qconfig_mapping("x86").set_module_name("model.0", None)
    gm = fxqat.prepare_qat("yolov8n.yaml", m)
    mod = gm.get_submodule("model.0")
    assert mod.weight_fq is None


# ------------------------------------------------------------------------------------ property-based (hypothesis)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=8))
keys = st.one_of(st.sampled_from(TOP_KEYS + RULE_KEYS + SPEC_KEYS + LEVELS), st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
documents = st.one_of(values, st.dictionaries(keys, values, max_size=6),
                      st.fixed_dictionaries({"version": st.sampled_from([1, 1, 2, "1"]),
                                             "rules": st.lists(st.dictionaries(keys, values, max_size=4), max_size=3)},
                                            optional={"weight": values, "activation": values}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_malformed_documents_raise_only_qconfig_error(doc):
    text = yaml.safe_dump(doc)
    try:
        qc = load_qconfig(text)
    except QConfigError:
        return
    assert isinstance(qc, QConfig)


VALID = (PRESETS[0].parent / "mixed_w4.yaml").read_text()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(0, 8), st.text(max_size=4))
def test_mutated_text_raises_only_qconfig_error(pos, cut, insert):
    text = VALID[:pos] + insert + VALID[pos + cut:]
    try:
        load_qconfig(text)
    except QConfigError:
        pass

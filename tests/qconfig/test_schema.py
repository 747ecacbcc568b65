"""The one qconfig schema: keys per section, match names, unmatched rules, bounds on YAML, the torch.ao bridge."""

import time
import tracemalloc
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxqat.errors import QConfigError
from fxqat.graph.patterns import ROLES
from fxqat.qconfig import QConfig, as_qconfig, load_qconfig
from fxqat.qconfig.config import Rule
from fxqat.qconfig.io import MAX_BYTES, RULE_KEYS, TOP_KEYS
from fxqat.qconfig.schema import LEVELS, SECTION_KEYS, SPEC_FIELDS, block_names


def _err(text) -> str:
    with pytest.raises(QConfigError) as e:
        load_qconfig(text)
    return str(e.value)


def test_schema_is_built_from_the_quantspec_fields():
    from dataclasses import fields

    from fxqat.quant.spec import QuantSpec

    assert SPEC_FIELDS == tuple(f.name for f in fields(QuantSpec))
    assert "percentile" in SECTION_KEYS["activation"] and "per_channel" not in SECTION_KEYS["activation"]
    assert "fixed" in SECTION_KEYS["input"] and "fixed" not in SECTION_KEYS["weight"]
    assert {"C2f", "SPPF", "Detect", "Upsample", "C3k2", "C2PSA"} <= set(block_names())


def test_per_channel_activation_is_refused_with_file_line(tmp_path):
    p = tmp_path / "q.yaml"
    p.write_text("version: 1\nactivation:\n  bits: 8\n  per_channel: 1\n")
    msg = _err(p)
    assert f"{p}:4" in msg and "per tensor" in msg
    rule = "version: 1\nrules:\n  - match: {role: c2f.cv1}\n    activation: {per_channel: 0}\n"
    assert "<string>:4" in _err(rule) and "per tensor" in _err(rule)
    with pytest.raises(QConfigError, match="per tensor"):
        as_qconfig({"activation": {"per_channel": 0}})
    with pytest.raises(QConfigError, match="per tensor"):
        Rule("role", "c2f.cv1", activation={"per_channel": 0})


def test_unknown_role_and_block_suggest_the_closest_and_list_choices():
    msg = _err("version: 1\nrules:\n  - match: {role: c2f.concta}\n    skip: true\n")
    assert "<string>:3" in msg and "unknown role 'c2f.concta'" in msg and "did you mean 'c2f.concat'" in msg
    assert all(r in msg for r in ROLES)
    msg = _err("version: 1\nrules:\n  - match: {block: C2F}\n    skip: true\n")
    assert "<string>:3" in msg and "did you mean 'C2f'" in msg
    load_qconfig("version: 1\nrules:\n  - match: {role: 'detect.*'}\n    skip: true\n")  # a glob matching roles
    assert "unknown role" in _err("version: 1\nrules:\n  - match: {role: 'dtect.*'}\n    skip: true\n")
    with pytest.raises(QConfigError, match="unknown role"):
        as_qconfig({"rules": [{"match": {"role": "nope"}, "skip": True}]})


def test_every_unmatched_rule_is_reported_at_once():
    import fxqat
    from fxqat.graph.registry import op_kind

    qc = load_qconfig("version: 1\nrules:\n  - match: {module: 'model.99.*'}\n    skip: true\n"
                      "  - match: {role: c2f.cv1}\n    weight: {bits: 4}\n"
                      "  - match: {name: no_such_node}\n    skip: true\n")
    gm = fxqat.prepare_qat("yolov8n.yaml")  # nodes with roles
    kind_of = lambda n: op_kind(gm, n)  # noqa: E731
    bad = qc.unmatched_rules(gm.graph.nodes, kind_of)
    assert [r.pattern for r in bad] == ["model.99.*", "no_such_node"]
    with pytest.raises(QConfigError) as e:
        qc.check_rules(gm.graph.nodes, kind_of)
    msg = str(e.value)
    assert "2 rule(s)" in msg and "<string>:3" in msg and "<string>:7" in msg and "<string>:5" not in msg


def test_user_values_are_quoted_shortened():
    long = "x" * 5000
    for text in (f"version: 1\n{long[:1000]}: 1\n", f"version: 1\nactivation: {{observer: {long}}}\n",
                 f"version: 1\nrules:\n  - match: {{module: a}}\n    skip: {long}\n", f"version: {long}\n"):
        msg = _err(text)
        assert len(msg) < 400 and "…" in msg, msg[:500]


def test_percentile_key_belongs_to_the_percentile_observer():
    qc = load_qconfig("version: 1\nactivation: {observer: percentile, percentile: 99.9}\n")
    assert qc.activation.percentile == 99.9
    assert "percentile is used by observer 'percentile' only" in _err("version: 1\nactivation: {percentile: 99.9}\n")
    assert ":2" in _err("version: 1\nactivation: {observer: percentile, percentile: 80}\n")


BOMB = """version: 1
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_yaml_bomb_is_refused_fast_and_small():
    tracemalloc.start()
    t = time.perf_counter()
    msg = _err(BOMB)
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "expands to more than" in msg
    assert dt < 1.0 and peak < 5e6  # measured 0.03 s and 30 kB; expanded it would be 9**9 strings
    assert "recursive" in _err("version: 1\nrules: &r [*r]\n") or "YAML" in _err("version: 1\nrules: &r [*r]\n")
    assert "bytes" in _err("version: 1\n#" + "x" * MAX_BYTES + "\n")
    assert "nested too deeply" in _err("[" * 5000 + "]" * 5000) or "YAML" in _err("[" * 5000 + "]" * 5000)


def test_torch_ao_mapping_maps_observers_by_class_and_bits_from_range():
    from torch import nn
    from torch.ao.quantization import QConfig as AOQConfig
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.fake_quantize import FakeQuantize
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
    from ultralytics.nn.modules import SPPF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = get_default_qat_qconfig_mapping("x86")
        qc = as_qconfig(m)
        # FusedMovingAvgObsFakeQuantize → moving_average; x86 activations are 7-bit (reduce_range: 0..127)
        assert (qc.weight.observer, qc.weight.bits, qc.weight.symmetric, qc.weight.per_channel) == \
            ("moving_average", 8, True, 0)
        assert (qc.activation.observer, qc.activation.bits, qc.activation.symmetric) == ("moving_average", 7, False)
        override = AOQConfig(activation=HistogramObserver.with_args(quant_min=0, quant_max=255),
                             weight=FakeQuantize.with_args(observer=MinMaxObserver, quant_min=-8, quant_max=7,
                                                           dtype=__import__("torch").qint8,
                                                           qscheme=__import__("torch").per_tensor_symmetric))
        m.set_module_name("model.2", override).set_module_name("model.0", None).set_object_type(
            SPPF, AOQConfig(activation=MinMaxObserver.with_args(quant_min=0, quant_max=65535),
                            weight=PerChannelMinMaxObserver.with_args(quant_min=-128, quant_max=127)))
        m.set_object_type(nn.Conv2d, None)  # torch.ao op-level entries do not apply to fxqat
        qc = as_qconfig(m)
    rules = {(r.level, r.pattern): r for r in qc.rules}
    r2 = rules[("module", "model.2")]
    assert r2.activation == {"bits": 8, "symmetric": False, "observer": "histogram"}
    assert r2.weight == {"bits": 4, "symmetric": True, "observer": "minmax", "per_channel": None}
    assert rules[("module", "model.0")].skip
    sppf = rules[("block", "SPPF")]
    assert sppf.activation["bits"] == 16 and sppf.activation["observer"] == "minmax"
    assert sppf.weight["per_channel"] == 0 and sppf.weight["observer"] == "minmax"
    bad = AOQConfig(activation=MinMaxObserver.with_args(quant_min=0, quant_max=200), weight=MinMaxObserver)
    with pytest.raises(QConfigError, match="not a full 2"):
        as_qconfig(m.set_module_name("model.4", bad))


# ------------------------------------------------------------------------------------ property-based (hypothesis)
names = st.one_of(st.sampled_from(TOP_KEYS + RULE_KEYS + SPEC_FIELDS + LEVELS + ROLES + ("C2f", "Detect")),
                  st.text(max_size=6))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True), names)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(names, inner, max_size=4)), max_leaves=10)
rule = st.fixed_dictionaries({"match": st.dictionaries(st.sampled_from(LEVELS + ("colour",)), names, min_size=1,
                                                       max_size=2)},
                             optional={"weight": values, "activation": values, "skip": values, "note": values})
docs = st.fixed_dictionaries({"version": st.sampled_from([1, 1, 2])},
                             optional={k: values for k in ("weight", "activation", "input", "preact", "sigmoid")}
                             | {"rules": st.lists(rule, max_size=3), "default_rules": values})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs, st.sampled_from(["block", "flow"]), st.booleans())
def test_yamlish_documents_give_qconfig_or_qconfig_error(doc, style, anchors):
    if anchors and "weight" in doc:  # one object twice: the YAML text has an anchor and an alias
        doc = {**doc, "activation": doc["weight"]}
        doc["rules"] = [{**r, "weight": doc["weight"]} for r in doc.get("rules", [])]
    text = yaml.safe_dump(doc, default_flow_style=style == "flow")
    for t in (text, doc):
        try:
            qc = load_qconfig(t) if isinstance(t, str) else as_qconfig(t)
        except QConfigError as e:
            assert len(str(e)) < 2000
            continue
        assert isinstance(qc, QConfig)

"""The qconfig YAML a selection downloads: loads with fxqat's loader, keeps the base qconfig, and changes the
prepared graph's precision for exactly the selected nodes."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxqat
from fxqat.errors import FxqatError
from fxqat.explorer.rules import ACTIONS, selection_yaml
from fxqat.graph.meta import info

from .conftest import QCONFIG, line_of


def _recs(data, names):
    by = {n["name"]: n for n in data["nodes"]}
    return [by[n] for n in names]


def test_yaml_raises_the_selected_nodes(explored):
    gm, data, _, qfile = explored
    sel = _recs(data, ["model_6_cv1", "add_1"])
    text = selection_yaml(data["yaml"], sel, "a16")
    qc = fxqat.load_qconfig(text)
    gm2 = fxqat.prepare_qat("yolov8n.yaml", qc, nc=10)
    nodes = {n.name: n for n in gm2.graph.nodes}
    q = info(nodes["model_6_cv1"]).qspec
    assert q.weight.bits == 8 and q.output.bits == 16 and q.output.observer == "minmax"
    line = line_of(text, 'name: "model_6_cv1"')
    assert q.source == f"<string>:{line}"
    assert info(nodes["add_1"]).qspec.output.bits == 16
    assert info(nodes["model_2_cv1"]).qspec.output.bits == 16  # the base file's rules are kept ...
    assert info(nodes["model_4_cv1"]).qspec.weight.bits == 4
    assert info(nodes["model_8_cv1"]).qspec.weight.bits == 8  # ... and nothing else changes
    assert f"# base qconfig: {qfile}" in text


def test_skip_and_float16(explored):
    _, data, _, _ = explored
    # skip: float weights; the output is still put on a grid because the next conv (quantized) reads it
    for action, check in (("skip", lambda q: q.weight is None and q.source.startswith("<string>:")),
                          ("float16", lambda q: q.weight is None and q.output.bits == 16)):
        gm2 = fxqat.prepare_qat("yolov8n.yaml", selection_yaml(data["yaml"], _recs(data, ["model_3"]), action), nc=10)
        q = info(next(n for n in gm2.graph.nodes if n.name == "model_3")).qspec
        assert check(q), (action, q)
    with pytest.raises(FxqatError, match="valid choices are a16, float16, skip"):
        selection_yaml(data["yaml"], [], "int4")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_selection_loads(explored, data):
    """Any subset of the quantizable nodes with any action gives a qconfig that loads, with one name rule per node
    (after the base file's two rules), in order."""
    _, page, _, _ = explored
    quantizable = [n for n in page["nodes"] if n["quantizable"]]
    sel = data.draw(st.lists(st.sampled_from(quantizable), unique_by=lambda n: n["name"], max_size=8))
    action = data.draw(st.sampled_from(sorted(ACTIONS)))
    qc = fxqat.load_qconfig(selection_yaml(page["yaml"], sel, action))
    user = [r for r in qc.rules if r.where != "<default>"]
    assert [r.pattern for r in user[2:]] == [n["name"] for n in sel] and len(user) == 2 + len(sel)
    assert all(r.level == "name" and r.skip == (action == "skip") for r in user[2:])
    assert QCONFIG.count("- match") == 2

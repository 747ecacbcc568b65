"""The annotation is the truth: sharing classes computed once by AnnotateQConfig, read by every later stage."""

import networkx as nx
import pytest

import fxqat
from fxqat.graph.meta import info
from fxqat.graph.registry import op_kind
from fxqat.passes.base import run_passes
from fxqat.passes.fuse_conv_bn_act import FuseConvBnAct
from fxqat.passes.match import MatchPatterns
from fxqat.qconfig import QConfig
from fxqat.quant.spec import NodeQSpec


def _reference_classes(gm, qc):
    """The sharing classes as the quantizer-insertion pass computed them before the annotation carried them
    (fxqat 0.1, insert_quantizers.py), re-derived from op kinds: the reference the annotation must reproduce."""
    nodes = list(gm.graph.nodes)
    kind = {n: op_kind(gm, n) for n in nodes}
    qs = {n: qc.resolve(n, kind[n]) if kind[n] in ("conv", "add") else None for n in nodes}
    shared = {n for n in nodes if kind[n] in ("cat", "pool", "resize", "split")}
    on_grid = {n for n in nodes if kind[n] in ("conv", "add") and qs[n] is not None and qs[n].output is not None}
    for n in nodes:
        q = qs[n]
        if (kind[n] == "conv" and q is not None and q.weight is not None) or \
                (kind[n] == "add" and q is not None and q.output is not None):
            on_grid.update(n.all_input_nodes)
    changed = True
    while changed:
        changed = False
        for n in shared:
            if n in on_grid or any(i in on_grid for i in n.all_input_nodes):
                for v in (n, *n.all_input_nodes):
                    if v not in on_grid:
                        on_grid.add(v)
                        changed = True
    g = nx.Graph()
    g.add_nodes_from(n.name for n in on_grid)
    for n in shared & on_grid:
        for i in n.all_input_nodes:
            g.add_edge(n.name, i.name)
    return sorted(sorted(c) for c in nx.connected_components(g))


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", "yolo11n.yaml"])
def test_annotation_sharing_classes_equal_the_old_computation(yaml):
    from fxqat.passes.annotate import AnnotateQConfig

    qc = QConfig()
    gm = run_passes(fxqat.trace(yaml, "train", nc=10), [FuseConvBnAct(), MatchPatterns()])
    expected = _reference_classes(gm, qc)
    gm = run_passes(gm, [AnnotateQConfig(qc)])
    by_grid: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        q = info(n).qspec
        if isinstance(q, NodeQSpec) and q.grid is not None:
            by_grid.setdefault(q.grid, []).append(n.name)
            assert q.grid in by_grid[q.grid] or q.grid == by_grid[q.grid][0]
    assert sorted(sorted(c) for c in by_grid.values()) == expected
    assert len(expected) == (50 if yaml == "yolov8n.yaml" else len(expected))


def test_every_member_of_a_grid_records_the_class_spec_and_owner():
    qc = {"version": 1, "rules": [{"match": {"name": "model_2_cv1"}, "activation": {"bits": 16}}]}
    gm = fxqat.prepare_qat("yolov8n.yaml", qc, nc=10)
    members = [n for n in gm.graph.nodes if isinstance(info(n).qspec, NodeQSpec) and
               info(n).qspec.grid == "model_2_cv1"]
    # cv1's split halves, the bottleneck's add and the concat share cv1's grid: highest precision wins for all
    assert {op_kind(gm, n) for n in members} >= {"conv", "split", "add", "cat"}
    assert {info(n).qspec.output.bits for n in members} == {16}
    assert gm.get_submodule("quant.model_2_cv1").spec.bits == 16
    shared = [n for n in members if info(n).qspec.shared]
    assert shared and all(op_kind(gm, n) in ("split", "cat") for n in shared)

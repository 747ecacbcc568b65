import copy

import pytest
import torch
from torch import nn

import fxqat
from fxqat.errors import TraceError
from fxqat.graph.meta import META_KEY, info
from fxqat.models import load_model

from .conftest_helpers import assert_bit_exact, assert_traced_matches_in_both_modes

SIZES = [(320, 320), (640, 640), (384, 640)]


@pytest.mark.parametrize("name", ["yolov8n.yaml", "yolov8s.yaml", "yolo11n.yaml"])
def test_parity_train_and_eval_all_sizes(name):
    model = load_model(name, nc=10)
    gm = fxqat.trace(model, "train")
    assert_traced_matches_in_both_modes(model, gm, SIZES)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8m.yaml", "yolov8l.yaml", "yolov8x.yaml"])
def test_parity_large_models(name):
    model = load_model(name).eval()
    gm = fxqat.trace(model, "eval")
    assert_bit_exact(model, gm, torch.rand(1, 3, 320, 320))


def test_batch_and_mode_argument(v8n):
    gm = fxqat.trace(v8n, "train")
    assert gm.training
    out = gm(torch.rand(2, 3, 320, 320))
    assert set(out) == {"boxes", "scores", "feats"}
    assert out["scores"].shape == (2, 10, 2100)
    gm.eval()
    y, raw = gm(torch.rand(2, 3, 320, 320))
    assert y.shape == (2, 4 + 10, 2100)
    with pytest.raises(ValueError, match="valid choices"):
        fxqat.trace(v8n, "predict")


def test_every_node_carries_meta(v8n_graph):
    for node in v8n_graph.graph.nodes:
        assert META_KEY in node.meta
        i = info(node)
        if node.op in ("call_module", "call_function", "call_method"):
            assert i.layer is not None and 0 <= i.layer <= 22, node.name
            assert i.module_path.startswith(f"model.{i.layer}"), (node.name, i.module_path)
            assert i.block in {"Conv", "C2f", "Bottleneck", "SPPF", "Concat", "Upsample", "Detect", "DFL"}, i.block


def test_block_meta_finds_structures(v8n_graph):
    nodes = list(v8n_graph.graph.nodes)
    adds = [n for n in nodes if n.op == "call_function" and n.target is __import__("operator").add]
    assert adds and all(info(n).block == "Bottleneck" and info(n).within("C2f") for n in adds)
    pools = [n for n in nodes if n.op == "call_module" and isinstance(v8n_graph.get_submodule(n.target), nn.MaxPool2d)]
    assert len(pools) == 3 and {info(n).block for n in pools} == {"SPPF"}
    decode = [n for n in nodes if info(n).block == "DFL"]
    assert len(decode) == 1 and info(decode[0]).layer == 22
    assert info(nodes[1]).layer == 0 and info(nodes[1]).module_path == "model.0.conv"


def test_shared_silu_is_split(v8n):
    from ultralytics.nn.modules.conv import Conv

    shared = Conv.default_act
    gm = fxqat.trace(v8n, "eval")
    acts = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.SiLU)]
    assert len(acts) == 57
    assert len({n.target for n in acts}) == len(acts)
    assert len({id(gm.get_submodule(n.target)) for n in acts}) == len(acts)
    assert all(gm.get_submodule(n.target) is not shared for n in acts)
    assert {n.target for n in acts} >= {"model.0.act", "model.1.act", "model.2.m.0.cv1.act"}
    # an attribute set on one activation does not reach another
    gm.get_submodule("model.1.act").tag = "one"
    assert not hasattr(gm.get_submodule("model.2.cv1.act"), "tag")
    assert Conv.default_act is shared  # Ultralytics' class untouched


def test_user_model_untouched(v8n):
    before = {k: v.clone() for k, v in v8n.state_dict().items()}
    gm = fxqat.trace(v8n, "train")
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    gm(torch.rand(2, 3, 64, 64))  # train mode: BN statistics update in the copy only
    for k, v in v8n.state_dict().items():
        assert torch.equal(before[k], v), k


def test_accepts_yolo_object_and_checkpoint(tmp_path, v8n):
    from ultralytics import YOLO

    gm = fxqat.trace(YOLO("yolov8n.yaml"))
    assert len(gm.graph.nodes) > 200
    ckpt = tmp_path / "m.pt"
    torch.save({"model": copy.deepcopy(v8n).half()}, ckpt)
    gm = fxqat.trace(str(ckpt), "eval")
    m = copy.deepcopy(v8n).half().float().eval()
    assert_bit_exact(m, gm, torch.rand(1, 3, 320, 320))


class _Iterating(nn.Module):
    """A layer whose forward iterates its input tensor: untraceable unless declared a leaf."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.f, self.i, self.type = inner, inner.f, inner.i, "Iterating"

    def forward(self, x):
        return torch.stack([self.inner(t[None])[0] for t in x])


def test_untraceable_module_error_and_leaf(v8n):
    model = copy.deepcopy(v8n).eval()
    model.model[1] = _Iterating(model.model[1])
    with pytest.raises(TraceError) as e:
        fxqat.trace(model)
    msg = str(e.value)
    assert "model.1" in msg and "_Iterating" in msg and "leaf_modules" in msg
    gm = fxqat.trace(model, leaf_modules=["model.1"])
    assert "model.1" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert_bit_exact(model, gm, torch.rand(2, 3, 320, 320))
    gm = fxqat.trace(model, leaf_modules=[_Iterating])
    assert_bit_exact(model, gm, torch.rand(1, 3, 320, 320))


def test_leaf_by_type_name_keeps_block_opaque(v8n):
    gm = fxqat.trace(v8n, leaf_modules=["C2f"])
    c2f = [n for n in gm.graph.nodes if n.op == "call_module" and info(n).layer_type == "C2f"]
    assert len(c2f) == 8 and all(info(n).block == "C2f" for n in c2f)
    m = copy.deepcopy(v8n).eval()
    assert_bit_exact(m, gm, torch.rand(1, 3, 320, 320))

import copy
import itertools
import operator
import sys

import pytest
import torch
import torch.fx as fx

import fxqat
from fxqat.modules.int8 import Int8Add, Int8ConvBnAct, Quantize
from fxqat.passes.int8_layout import BinsLastHead, CatWholeChunks, DenseSplitHalves, QuantizeIntoConv, _chunk_of
from fxqat.passes.base import run_passes
from fxqat.passes.lower_int8 import LowerInt8

from ..conftest_helpers import liven, signs_like_images


@pytest.fixture(scope="module")
def qat():
    from fxqat.models import load_model

    gm = fxqat.prepare_qat(liven(load_model("yolov8n.yaml", nc=10)))
    fxqat.calibrate(gm, [signs_like_images(2, 320, seed=s) for s in range(2)], progress=False)
    return gm.eval()


@pytest.fixture(scope="module")
def raw_int8(qat):
    """The converted graph before any layout pass."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules["fxqat.convert"], "convert_passes", lambda: [LowerInt8()])
        return fxqat.convert(qat)


def _mod(gm, n):
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def test_each_layout_pass_keeps_the_output(raw_int8):
    x = signs_like_images(1, 320, seed=5)
    gm = copy.deepcopy(raw_int8)
    with torch.no_grad():
        ref = gm(x)
        gm = run_passes(gm, [BinsLastHead()])
        assert gm.get_submodule("model_22_decode").bins_last
        # DFL's float softmax now reduces over another axis: float32 rounding only (boxes in pixels, scores in [0, 1])
        out = gm(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
        for p in (CatWholeChunks(), DenseSplitHalves(), QuantizeIntoConv()):  # uint8 layout: not one bit may change
            gm = run_passes(gm, [p])
            assert torch.equal(gm(x), out), p.name


def test_converted_c2f_layout(qat):
    q = fxqat.convert(qat)
    dense = [n for n in q.graph.nodes if n.op == "call_function" and n.target.__name__ == "_dense"]
    assert len(dense) == 8  # one per C2f, shared by the first Bottleneck's cv1 and its residual add
    assert {n.meta["fxqat"].block for n in dense} == {"C2f"}
    for n in q.graph.nodes:  # no conv or add reads a strided split half any more
        if isinstance(_mod(q, n), (Int8ConvBnAct, Int8Add)):
            assert not any(_chunk_of(a) for a in n.all_input_nodes), n.name
    c2f_cats = [n for n in q.graph.nodes if n.op == "call_function" and n.target is torch.cat and
                n.meta["fxqat"].block == "C2f"]
    assert len(c2f_cats) == 8
    for c in c2f_cats:  # the concat reads cv1's output whole, not its two chunk pieces
        first = c.args[0][0]
        assert isinstance(_mod(q, first), Int8ConvBnAct) and first.meta["fxqat"].module_path.endswith(".cv1")
        assert not any(_chunk_of(a) for a in c.args[0])


@pytest.mark.parametrize("split", [True, False])
def test_the_image_is_quantized_inside_the_first_conv(qat, raw_int8, split):
    # the pass removes the image's Quantize and the first conv quantizes (and, for split weights, doubles) the image
    # itself: the same codes either way; forced split / unsplit so that both paths run on any CPU
    q = fxqat.convert(qat)
    first = next(n for n in q.graph.nodes if isinstance(_mod(q, n), Int8ConvBnAct))
    assert first.args[0].op == "placeholder" and _mod(q, first).quantize_input
    assert not any(isinstance(m, Quantize) for m in q.modules())
    raw = copy.deepcopy(raw_int8)
    for gm in (q, raw):
        for m in gm.modules():
            if isinstance(m, Int8ConvBnAct):
                m.split_weights, m._packed = split, None
    x = signs_like_images(2, 320, seed=6)
    with torch.no_grad():
        a, b = _mod(q, first)(x), raw.get_submodule(first.target)(raw.get_submodule("quant_x")(x))
    assert torch.equal(a, b) and _mod(q, first)._packed[2] == split


def test_converted_graph_golden(qat, golden):
    golden("yolov8n_int8_summary.txt", fxqat.summary(fxqat.convert(qat), imgsz=320).to_text())


def _chunk_cat_graph(k: int, order: tuple[int, ...], chunk_dim: int, cat_dim: int) -> fx.GraphModule:
    g = fx.Graph()
    x = g.placeholder("x")
    c = g.call_method("chunk", (x, k, chunk_dim))
    parts = [g.call_function(operator.getitem, (c, i)) for i in order]
    g.output(g.call_function(torch.cat, (parts, cat_dim)))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize("k", [2, 3])
def test_cat_whole_chunks_merges_only_complete_ordered_pieces(k):
    x = torch.arange(6 * 6 * 2 * 2, dtype=torch.float32).view(6, 6, 2, 2)
    for order in itertools.permutations(range(k)):
        for chunk_dim, cat_dim in ((1, 1), (0, 1), (1, 0)):
            gm = _chunk_cat_graph(k, order, chunk_dim, cat_dim)
            ref = gm(x)
            out = run_passes(gm, [CatWholeChunks()])
            cat = next(n for n in out.graph.nodes if n.target is torch.cat)
            merged = order == tuple(range(k)) and chunk_dim == cat_dim
            assert len(cat.args[0]) == (1 if merged else k), (order, chunk_dim, cat_dim)
            assert torch.equal(out(x), ref)


def test_cat_whole_chunks_leaves_a_partial_cover():
    g = fx.Graph()
    x = g.placeholder("x")
    c = g.call_method("chunk", (x, 3, 1))
    parts = [g.call_function(operator.getitem, (c, i)) for i in (0, 1)]  # piece 2 missing
    g.output(g.call_function(torch.cat, (parts, 1)))
    out = run_passes(fx.GraphModule(torch.nn.Module(), g), [CatWholeChunks()])
    assert out(torch.ones(1, 6, 1, 1)).shape == (1, 4, 1, 1)

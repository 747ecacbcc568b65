"""FloatConvChannelsLast: Segment's float Proto upsample (ConvTranspose2d) runs channels-last between the uint8
maps around it, with the same outputs."""

import copy
import sys

import pytest
import torch
from torch.utils._pytree import tree_leaves

import fxqat
from fxqat.modules.int8 import CL, Dequantize
from fxqat.passes.base import run_passes
from fxqat.passes.float_conv_layout import FloatConvChannelsLast

from ..conftest_helpers import liven, signs_like_images


@pytest.fixture(scope="module")
def seg_int8():
    """yolov8n-seg converted by every convert pass but this one."""
    from fxqat.models import load_model
    from fxqat.passes import pipeline

    torch.manual_seed(0)
    gm = fxqat.prepare_qat(liven(load_model("yolov8n-seg.yaml", nc=3)))
    fxqat.calibrate(gm, [signs_like_images(2, 256, seed=s) for s in range(2)], progress=False)
    passes = [p for p in pipeline.convert_passes() if not isinstance(p, FloatConvChannelsLast)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys.modules["fxqat.convert"], "convert_passes", lambda: passes)
        return fxqat.convert(gm.eval())


def _upsample(gm):
    (n,) = [n for n in gm.graph.nodes if n.op == "call_module"
            and type(gm.get_submodule(n.target)) is torch.nn.ConvTranspose2d]
    return n


def test_proto_upsample_runs_channels_last_with_the_same_outputs(seg_int8):
    before = _upsample(seg_int8)
    assert not seg_int8.get_submodule(before.args[0].target).keep_layout  # NCHW before the pass
    x = signs_like_images(2, 256, seed=7)
    gm = copy.deepcopy(seg_int8)
    with torch.no_grad():
        ref = gm(x)
        gm = run_passes(gm, [FloatConvChannelsLast()])
        out = gm(x)
    n = _upsample(gm)
    dq, conv = gm.get_submodule(n.args[0].target), gm.get_submodule(n.target)
    assert isinstance(dq, Dequantize) and dq.keep_layout and "channels-last" in repr(dq)
    assert conv.weight.is_contiguous(memory_format=CL)
    with torch.no_grad():
        mid = conv(dq(torch.zeros(1, conv.in_channels, 8, 8, dtype=torch.uint8).contiguous(memory_format=CL)))
    assert mid.is_contiguous(memory_format=CL)  # what the next quantize reads: no NCHW copy on either side
    # the transposed convolution's sums in another memory order: float32 rounding at most, here none at all
    a, b = tree_leaves(ref), tree_leaves(out)
    assert len(a) == len(b) == 2 and all(torch.equal(u, v) for u, v in zip(a, b))
    # the pass leaves a Dequantize read by anything else (or already channels-last) alone: a second run changes nothing
    assert not FloatConvChannelsLast().run(gm)


def test_convert_runs_the_pass(seg_int8):
    from fxqat.passes import pipeline

    assert any(isinstance(p, FloatConvChannelsLast) for p in pipeline.convert_passes())

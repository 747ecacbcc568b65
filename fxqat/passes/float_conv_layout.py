"""A convolution the INT8 model keeps float (Segment's Proto upsample, a ConvTranspose2d: its ``segment.upsample``
role) runs channels-last between the uint8 maps around it.

    Dequantize ─► ConvTranspose2d (NCHW) ─► Quantize     ─►     Dequantize(keep_layout) ─► ConvTranspose2d (NHWC)

Before, the dequantized map was copied to NCHW, oneDNN ran the transposed convolution on NCHW, and the next
quantize copied its codes back to channels-last. With the map and the weight channels-last, oneDNN reads and
writes NHWC and the quantize copies nothing. yolov8n-seg at 640, batch 1, 2 threads, AVX-512 VNNI EPYC: the same
outputs, bit for bit; the whole INT8 model 42.9 → 29.4 ms and 30.9 → 28.6 ms in two interleaved A/B runs
(benchmarks/README.md, deployment suite on a CPU with VNNI).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..modules.int8 import CL, Dequantize
from .base import FxqatPass

FLOAT_CONVS = (nn.Conv2d, nn.ConvTranspose2d)  # exactly these types: fxqat's INT8 and frozen convs are others


class FloatConvChannelsLast(FxqatPass):
    """``Dequantize → float Conv2d / ConvTranspose2d`` (the Dequantize read by that conv only): the dequantized map
    stays channels-last and the conv's weight is made channels-last."""

    name = "float_conv_channels_last"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in list(gm.graph.nodes):
            conv = gm.get_submodule(n.target) if n.op == "call_module" else None
            if type(conv) not in FLOAT_CONVS or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
                continue
            d = n.args[0]
            dq = gm.get_submodule(d.target) if d.op == "call_module" else None
            if not isinstance(dq, Dequantize) or len(d.users) != 1 or dq.keep_layout:
                continue
            gm.add_submodule(d.target, Dequantize(dq.scale, dq.zero_point, keep_layout=True))
            conv.to(memory_format=CL)
            changed = True
        return changed

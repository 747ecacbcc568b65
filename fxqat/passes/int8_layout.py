"""Layout passes on the converted INT8 graph (``fxqat.convert`` runs them last). Each decides which tensors are
copied, and where: the uint8 passes change no bit; BinsLastHead's float decode differs by float32 rounding only.
Measured on yolov8n 640, batch 1, 2 threads (README, INT8 conversion).

    BinsLastHead     Detect's float maps reach DetectDecode per level as channels-last views, not NCHW copies
    CatWholeChunks   cat(chunk(y)[0], chunk(y)[1], m…) ─► cat(y, m…): one dense read instead of two strided ones
    DenseSplitHalves a C2f split half feeding convs and residual adds is made dense once, not once per consumer
    QuantizeIntoConv a Quantize read only by one INT8 conv (the image) is done by that conv, which doubles the
                     codes for split weights on NCHW (two block copies) instead of 3-byte runs per pixel
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..modules.int8 import CL, Int8Add, Int8ConvBnAct, Quantize
from ..modules.decode import DetectDecode
from .base import FxqatPass


def _hw_by_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H·W, C): a view of a channels-last map."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """A strided channel slice of a channels-last map, copied to a dense channels-last tensor."""
    return x.contiguous(memory_format=CL)


def _module(gm: fx.GraphModule, n: fx.Node):
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _chunk_of(n: fx.Node) -> tuple[fx.Node, int, int, int] | None:
    """``chunk(y, k, dim)[i]`` → (y, k, dim, i); else None."""
    if not (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int)):
        return None
    c = n.args[0]
    if not (isinstance(c, fx.Node) and ((c.op == "call_method" and c.target == "chunk") or
                                        (c.op == "call_function" and c.target is torch.chunk))):
        return None
    args = dict(zip(("input", "chunks", "dim"), c.args), **c.kwargs)
    k, dim = args.get("chunks"), args.get("dim", 0)
    return (args["input"], k, dim, n.args[1]) if isinstance(k, int) and isinstance(dim, int) else None


def _cat_dim(n: fx.Node) -> int | None:
    if not (n.op == "call_function" and n.target is torch.cat and isinstance(n.args[0], (list, tuple))):
        return None
    return n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)


class BinsLastHead(FxqatPass):
    """Feed DetectDecode the head's channels-last float maps, per level, as (B, H·W, C) views instead of copying
    each to NCHW for ``view(B, C, -1)`` + ``cat(-1)``: decoding then runs anchor-major, DFL's softmax over the
    contiguous last axis (see ``DetectDecode._decode_bins_last``). Applied only where the graph has exactly that
    shape."""

    name = "bins_last_head"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        decodes = [n for n in gm.graph.nodes if isinstance(_module(gm, n), DetectDecode)]
        for dec in [n for n in decodes if _module(gm, n).supports_bins_last]:  # Detect's; not Segment/Pose/OBB
            found = [self._convs_of(gm, c) for c in dec.args[:2]]
            if any(f is None for f in found):
                continue
            levels = []
            for views in found:
                flats = []
                for v in views:
                    conv = v.args[0]
                    gm.add_submodule(conv.target, _module(gm, conv).with_options(keep_layout=True))
                    with gm.graph.inserting_before(v):
                        flats.append(gm.graph.call_function(_hw_by_channels, (v.args[0],)))
                    flats[-1].meta.update({k: x for k, x in v.args[0].meta.items() if k == "fxqat"})
                levels.append(flats)
            dec.args = (*levels, *dec.args[2:])  # the concats and views are now dead code
            gm.add_submodule(dec.target, _module(gm, dec).with_options(bins_last=True))
            changed = True
        return changed

    @staticmethod
    def _convs_of(gm, cat: fx.Node):
        """The ``view(B, C, -1)`` nodes of float-output convs this ``cat(-1)`` joins, or None."""
        if not (_cat_dim(cat) == -1 and len(cat.users) == 1):
            return None
        views = cat.args[0]
        ok = all(v.op == "call_method" and v.target == "view" and len(v.args) == 4 and v.args[3] == -1 and
                 len(v.users) == 1 and len(v.args[0].users) == 1 and
                 isinstance(_module(gm, v.args[0]), Int8ConvBnAct) and _module(gm, v.args[0]).float_out
                 for v in views)
        return views if ok else None


class CatWholeChunks(FxqatPass):
    """``cat([chunk(y, k, d)[0], …, chunk(y, k, d)[k-1], rest…], d)`` → ``cat([y, rest…], d)`` — the same tensor.
    In C2f the two split halves are strided channel slices of cv1's output; the concat now reads cv1's output
    whole."""

    name = "cat_whole_chunks"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in list(gm.graph.nodes):
            dim = _cat_dim(n)
            if dim is None:
                continue
            parts, out, i = list(n.args[0]), [], 0
            while i < len(parts):
                c = _chunk_of(parts[i]) if isinstance(parts[i], fx.Node) else None
                if c is not None and c[2] == dim and c[3] == 0 and \
                        [_chunk_of(p) if isinstance(p, fx.Node) else None for p in parts[i:i + c[1]]] == \
                        [(c[0], c[1], dim, j) for j in range(c[1])]:
                    out.append(c[0])
                    i += c[1]
                else:
                    out.append(parts[i])
                    i += 1
            if len(out) < len(parts):
                n.args = (out,) + tuple(n.args[1:])
                changed = True
        return changed


class DenseSplitHalves(FxqatPass):
    """A C2f split half (``chunk(y, 2, 1)[1]``, a strided channel slice) feeds the first Bottleneck's cv1 and its
    residual add, and each made its own dense copy. One shared ``_dense`` copy now feeds them all."""

    name = "dense_split_halves"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in list(gm.graph.nodes):
            c = _chunk_of(n)
            if c is None or c[2] != 1:
                continue
            dense_users = [u for u in n.users if isinstance(_module(gm, u), (Int8ConvBnAct, Int8Add))]
            if not dense_users:
                continue
            with gm.graph.inserting_after(n):
                d = gm.graph.call_function(_dense, (n,))
            d.meta.update({k: v for k, v in n.meta.items() if k == "fxqat"})
            for u in dense_users:
                u.replace_input_with(n, d)
            changed = True
        return changed



class QuantizeIntoConv(FxqatPass):
    """``Quantize(x) → Int8ConvBnAct`` (the quantized value read by that conv only, on the conv's input grid) ─►
    ``Int8ConvBnAct(quantize_input=True)(x)``: the same codes, quantized inside the conv. Where the conv runs split
    weights (decided at its first call), it doubles them on NCHW before the channels-last copy: for yolo11n's 640²
    image 3.3 ms instead of 12.3 (``fxqat.modules.int8._quantize_dup``). Not one bit changes."""

    name = "quantize_into_conv"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in list(gm.graph.nodes):
            q = _module(gm, n)
            if not isinstance(q, Quantize) or len(n.users) != 1:
                continue
            (user,) = n.users
            conv = _module(gm, user)
            if not (isinstance(conv, Int8ConvBnAct) and user.args[:1] == (n,) and len(user.args) == 1 and
                    not getattr(conv, "quantize_input", False) and (conv.x_scale, conv.x_zp) == (q.scale, q.zero_point)):
                continue
            gm.add_submodule(user.target, conv.with_options(quantize_input=True))
            user.replace_input_with(n, n.args[0])  # the Quantize node is now dead code
            changed = True
        return changed

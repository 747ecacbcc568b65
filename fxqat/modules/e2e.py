"""``EndToEndDecode``: the float tail of an end-to-end (NMS-free) Ultralytics head — YOLO26's ``Detect`` with
``one2one_cv2`` / ``one2one_cv3`` and YOLOv10's ``v10Detect`` — as one leaf of the traced graph.

Such a head has two branch sets on the same feature maps: one-to-many (``cv2`` / ``cv3``, what the training loss's
o2m term and NMS-based inference use) and one-to-one (``one2one_cv2`` / ``one2one_cv3``: inference by top-k, no NMS).
Both are traced into the graph and both feed this decode, which returns exactly what Ultralytics' ``Detect.forward``
returns (same ops, same order, so bit for bit):

    mode       one2one=False (Ultralytics' default)        one2one=True (``model.end2end = True``, ``nms=False``)
    training   {"one2many": raw, "one2one": raw}           the same
    eval       ((B, 4 + nc, A) xywh + sigmoid, raw dict)   ((B, max_det, 6) xyxy, score, class, raw dict)
    export     (B, 4 + nc, A)                              (B, max_det, 6)

The top-k selection (``Detect.postprocess``) runs here, in float, outside any quantized region. The one-to-one
branch reads the feature maps through ``detach`` (traced into the graph, an op kind that keeps its input's grid), so
in training its loss never reaches the backbone, as in Ultralytics. ``reg_max == 1`` (YOLO26) has no DFL: the box
branch's 4 channels are the distances themselves.
"""

from __future__ import annotations

import torch
from torch import nn

from .decode import DetectDecode


def has_one2one(head: nn.Module) -> bool:
    """An end-to-end head: it carries the one-to-one branch set (YOLO26 Detect, v10Detect)."""
    return getattr(head, "one2one_cv2", None) is not None


class EndToEndDecode(DetectDecode):
    """Decode of a head with both branch sets; ``one2one`` selects the inference path (see the module doc)."""

    supports_bins_last = False
    OPTIONS = ("export", "fast_dfl", "bins_last", "one2one")
    # positional inputs each branch set reads (keyed by one2one), and those training alone reads: what
    # fxqat.passes.prune_head_branch cuts from a deployed graph
    BRANCH_ARGS = {False: (0, 1), True: (3, 4)}
    TRAIN_ONLY_ARGS: tuple[int, ...] = ()

    def __init__(self, detect: nn.Module, *, one2one: bool | None = None, **options):
        """``one2one``: eval returns the one-to-one top-k detections (default: the head's ``end2end`` flag)."""
        super().__init__(detect, **options)
        self.one2one = bool(getattr(detect, "end2end", False)) if one2one is None else bool(one2one)
        self.max_det = int(detect.max_det)
        self.agnostic_nms = bool(getattr(detect, "agnostic_nms", False))
        self.format, self.dynamic = getattr(detect, "format", None), bool(getattr(detect, "dynamic", False))
        self.xyxy = bool(getattr(detect, "xyxy", False))

    def with_options(self, **options) -> EndToEndDecode:
        one2one = options.pop("one2one", None)
        new = super().with_options(**options)
        if one2one is not None:
            new.one2one = bool(one2one)
        return new

    def _dfl(self, boxes):
        if self.reg_max == 1:  # no DFL (YOLO26): Ultralytics' nn.Identity, whatever ``fast_dfl`` says
            return self.dfl(boxes)
        return super()._dfl(boxes)

    def decode(self, boxes, scores, feats, angle=None):
        self.xywh = not self.one2one and not self.xyxy  # Detect.decode_bboxes: xyxy when end2end
        return super().decode(boxes, scores, feats, angle)

    # Ultralytics' own top-k (Detect.postprocess and its helpers), run with this module as ``self``: bit-exact
    def postprocess(self, preds):
        from ultralytics.nn.modules import Detect

        return Detect.postprocess(self, preds)

    def get_topk_index(self, scores, max_det):
        from ultralytics.nn.modules import Detect

        return Detect.get_topk_index(self, scores, max_det)

    def _gather(self, x, index):
        from ultralytics.nn.modules import Detect

        return Detect._gather(self, x, index)

    @staticmethod
    def _grouped_topk(x, k, groups=8):
        from ultralytics.nn.modules import Detect

        return Detect._grouped_topk(x, k, groups)

    def infer(self, boxes, scores, feats, one2one_boxes, one2one_scores):
        """The eval prediction: top-k of the decoded one-to-one branch, or the decoded one-to-many branch."""
        if self.one2one:
            return self.postprocess(self.decode(one2one_boxes, one2one_scores, feats).permute(0, 2, 1))
        return self.decode(boxes, scores, feats)

    def forward(self, boxes, scores, feats, one2one_boxes, one2one_scores):
        if self.export and not self.training:  # deployed: the unselected branch may be pruned (None), see pass
            return self.infer(boxes, scores, feats, one2one_boxes, one2one_scores)
        o2o_feats = [f.detach() for f in feats] if self.training else feats
        raw = {"one2many": {"boxes": boxes, "scores": scores, "feats": feats},
               "one2one": {"boxes": one2one_boxes, "scores": one2one_scores, "feats": o2o_feats}}
        if self.training:
            return raw
        return self.infer(boxes, scores, feats, one2one_boxes, one2one_scores), raw


def e2e_detect_forward(self, x):
    """Traceable forward of an end-to-end head (``self``): both branch sets traced, the one-to-one one on detached
    feature maps, then :class:`EndToEndDecode` (``self.decode``, a leaf)."""
    bs = x[0].shape[0]
    xd = [xi.detach() for xi in x]
    out = []
    for box_head, cls_head, feats in ((self.cv2, self.cv3, x), (self.one2one_cv2, self.one2one_cv3, xd)):
        out.append(torch.cat([box_head[i](feats[i]).view(bs, 4 * self.reg_max, -1) for i in range(self.nl)], dim=-1))
        out.append(torch.cat([cls_head[i](feats[i]).view(bs, self.nc, -1) for i in range(self.nl)], dim=-1))
    return self.decode(out[0], out[1], list(x), out[2], out[3])



def psa_forward(self, x):
    """YOLOv10's ``PSA`` (attention + FFN on half the channels), without tuple unpacking of a Proxy."""
    t = self.cv1(x).split((self.c, self.c), dim=1)
    a, b = t[0], t[1]
    b = b + self.attn(b)
    b = b + self.ffn(b)
    return self.cv2(torch.cat((a, b), 1))


def e2e_forwards() -> dict:
    """Traceable forwards of the YOLOv10 / YOLO26 types fxqat's tracer needs beyond YOLOv8 / YOLO11's
    (see :func:`fxqat.tracing.traceable_forwards`); ``C2fCIB`` is a C2f and takes C2f's forward there."""
    from ultralytics.nn.modules import PSA, v10Detect

    return {PSA: psa_forward, v10Detect: e2e_detect_forward}


def e2e_heads() -> tuple[type, ...]:
    """End-to-end head types fxqat traces (exact types): YOLO26's Detect (with ``one2one_*``) and v10Detect."""
    from ultralytics.nn.modules import Detect, v10Detect

    return (Detect, v10Detect)


def set_end2end(gm, one2one: bool = True):
    """Select the eval / export output of a traced (or prepared) end-to-end model in place, like Ultralytics'
    ``model.end2end = value``: the one-to-one top-k detections (True) or the one-to-many predictions for NMS (False).
    Returns ``gm``; records the choice in ``gm.meta["end2end"]``."""
    from ..errors import FxqatError
    from ..graph.registry import op_kind

    targets = [n.target for n in gm.graph.nodes
               if op_kind(gm, n) == "decode" and isinstance(gm.get_submodule(n.target), EndToEndDecode)]
    if not targets:
        raise FxqatError("set_end2end: this graph has no end-to-end (one-to-one) head; only YOLO26 / YOLOv10 "
                         "detection models (yolo26n.yaml, yolov10n.yaml, ...) have one")
    for t in targets:
        gm.add_submodule(t, gm.get_submodule(t).with_options(one2one=one2one))
    gm.meta["end2end"] = bool(one2one)
    return gm

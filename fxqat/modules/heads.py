"""The float tails of Ultralytics' task heads (Segment, Pose, OBB) as one leaf module each.

Each head's convs (``cv2`` box, ``cv3`` class, ``cv4`` mask coefficients / keypoints / angle, and Segment's
``Proto``) are traced into the graph; everything after the last 1×1 convs — DFL, anchors, box decode, class sigmoid,
the keypoint decode, the angle sigmoid — runs in one of these modules, which return exactly what the Ultralytics head
returns in training, eval and export mode (bit for bit: same ops, same order):

    head      training            eval                          export
    Segment   raw + proto         ((y, proto), raw)             (y, proto)     y = (B, 4 + nc + nm, A)
    Pose      raw                 (y, raw)                      y              y = (B, 4 + nc + nk, A)
    OBB       raw (angle decoded) (y, raw)                      y              y = (B, 4 + nc + 1, A)

``bins_last`` (the INT8 layout of Detect's maps) is Detect-only: ``with_options(bins_last=True)`` is refused here,
and ``BinsLastHead`` skips these heads.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .decode import DetectDecode


class SegmentDecode(DetectDecode):
    """Segment's tail: Detect's decode + the mask coefficients; the prototypes (``Proto``'s output) pass through."""

    supports_bins_last = False

    def __init__(self, segment: nn.Module, **options):
        super().__init__(segment, **options)
        self.nm = segment.nm

    def forward(self, boxes, scores, feats, mask_coefficient, proto):
        raw = {"boxes": boxes, "scores": scores, "feats": feats, "mask_coefficient": mask_coefficient, "proto": proto}
        if self.training:
            return raw
        y = torch.cat([self.decode(boxes, scores, feats), mask_coefficient], dim=1)
        return (y, proto) if self.export else ((y, proto), raw)


def decode_keypoints(kpts: torch.Tensor, anchors, strides, kpt_shape, export: bool, yolo26: bool = False):
    """Ultralytics' keypoint decode, op for op: ``Pose.kpts_decode`` (xy · 2 + anchor − 0.5) · stride, or
    ``Pose26.kpts_decode`` (``yolo26``: (xy + anchor) · stride); sigmoid on visibility. The export form reshapes,
    the other strides in place."""
    ndim, bs = kpt_shape[1], kpts.shape[0]
    if export:
        y = kpts.view(bs, *kpt_shape, -1)
        a = (y[:, :, :2] + anchors) * strides if yolo26 else (y[:, :, :2] * 2.0 + (anchors - 0.5)) * strides
        if ndim == 3:
            a = torch.cat((a, y[:, :, 2:3].sigmoid()), 2)
        return a.view(bs, kpt_shape[0] * ndim, -1)
    y = kpts.clone()
    if ndim == 3:
        y[:, 2::ndim] = y[:, 2::ndim].sigmoid()
    for i in (0, 1):
        y[:, i::ndim] = (y[:, i::ndim] + anchors[i]) * strides if yolo26 else \
            (y[:, i::ndim] * 2.0 + (anchors[i] - 0.5)) * strides
    return y


class PoseDecode(DetectDecode):
    """Pose's tail: Detect's decode + keypoints ``(xy · 2 + anchor − 0.5) · stride``, sigmoid on visibility."""

    supports_bins_last = False

    def __init__(self, pose: nn.Module, **options):
        super().__init__(pose, **options)
        self.kpt_shape = tuple(pose.kpt_shape)
        self.nk = pose.nk

    def kpts_decode(self, kpts: torch.Tensor, feats) -> torch.Tensor:
        """``Pose.kpts_decode`` (both of its forms: the export form reshapes, the other strides in place)."""
        return decode_keypoints(kpts, *self.anchors(feats, kpts), self.kpt_shape, self.export)

    def forward(self, boxes, scores, feats, kpts):
        raw = {"boxes": boxes, "scores": scores, "feats": feats, "kpts": kpts}
        if self.training:
            return raw
        y = torch.cat([self.decode(boxes, scores, feats), self.kpts_decode(kpts, feats)], dim=1)
        return y if self.export else (y, raw)


class OBBDecode(DetectDecode):
    """OBB's tail: angle = (sigmoid(logit) − 0.25)·π in [−π/4, 3π/4], rotated-box decode (dist2rbox)."""

    supports_bins_last = False

    def __init__(self, obb: nn.Module, **options):
        super().__init__(obb, **options)
        self.ne = obb.ne

    def forward(self, boxes, scores, feats, angle_logits):
        angle = (angle_logits.sigmoid() - 0.25) * math.pi
        raw = {"boxes": boxes, "scores": scores, "feats": feats, "angle": angle}
        if self.training:
            return raw
        y = torch.cat([self.decode(boxes, scores, feats, angle), angle], dim=1)
        return y if self.export else (y, raw)


class ClassifyDecode(nn.Module):
    """Classify's tail: the logits in training, ``(softmax, logits)`` in eval, the softmax in export mode — decided
    at run time like Ultralytics' ``Classify`` (its conv, pool and Linear are traced; the softmax stays float)."""

    supports_bins_last = False

    def __init__(self, classify: nn.Module, *, export: bool | None = None):
        super().__init__()
        self.nc = classify.linear.out_features
        self.export = bool(getattr(classify, "export", False)) if export is None else bool(export)

    def with_options(self, export: bool | None = None, fast_dfl: bool = False, bins_last: bool = False):
        """A copy with another ``export`` flag (what the INT8 and export passes install). ``fast_dfl`` is accepted
        because those passes ask every decode for it; Classify has no DFL. ``bins_last`` is refused (Detect only)."""
        if bins_last:
            raise ValueError("ClassifyDecode: bins_last is not implemented for this head (Detect only)")
        new = copy.deepcopy(self)
        if export is not None:
            new.export = bool(export)
        return new

    def forward(self, logits):
        if self.training:
            return logits
        y = logits.softmax(1)
        return y if self.export else (y, logits)


def head_decodes() -> dict[type, type]:
    """Ultralytics head type (exact) → its decode leaf."""
    from ultralytics.nn.modules import OBB, Classify, Detect, Pose, Segment

    return {Detect: DetectDecode, Segment: SegmentDecode, Pose: PoseDecode, OBB: OBBDecode, Classify: ClassifyDecode}

"""YOLO26's end-to-end task heads — ``Segment26``, ``Pose26``, ``OBB26`` — traced with both branch sets, and their
float tail :class:`EndToEndTaskDecode` (one leaf of the traced graph).

Each is YOLO26's end-to-end ``Detect`` (see :mod:`fxqat.modules.e2e`) plus the task's branch, once per branch set:

    head       task branch per level (traced, quantized)                      decode (float, in the leaf)
    Segment26  cv4.i: Conv, Conv, 1×1 → mask coefficients                     the coefficients pass through
               Proto26: P4, P5 → 1×1 → nearest 2×/4× → + P3 → 3×3 → Proto     prototypes pass through
    Pose26     cv4.i: Conv, Conv → cv4_kpts.i 1×1 → keypoints                 (xy + anchor)·stride, sigmoid(vis)
    OBB26      cv4.i: Conv, Conv, 1×1 → raw angle logits                      dist2rbox with the raw angle

What only the training loss reads runs inside the leaf, in float, and only in training mode, as Ultralytics
computes it only then: Segment26's semantic-segmentation branch (``proto.semseg`` on the fused P3 feature) and
Pose26's keypoint sigmas (``cv4_sigma``, 1×1 on the keypoint features) with the RLE loss's flow model
(``flow_model``, a parameter of the model the optimizer trains). Deployment (``export``) drops them, as Ultralytics'
``fuse`` does, and :class:`fxqat.passes.prune_head_branch.PruneUnusedHeadBranch` cuts their inputs from the INT8
graph.

The leaf returns exactly what the Ultralytics head returns (same ops, same order: bit for bit):

    training   {"one2many": raw, "one2one": raw}   raw = boxes, scores, feats, the task output (+ proto, kpts_sigma)
    eval       (y, raw)  — Segment26: ((y, proto), raw)      y: the selected branch, top-k rows when one2one
    export     y         — Segment26: (y, proto)
"""

from __future__ import annotations

import torch
from torch import nn

from .e2e import EndToEndDecode
from .heads import decode_keypoints

TASK_KEY = {"segment": "mask_coefficient", "pose": "kpts", "obb": "angle"}  # the task output in the raw dict


class EndToEndTaskDecode(EndToEndDecode):
    """The float tail of Segment26 / Pose26 / OBB26 (see the module doc). Inputs, in order: each branch set's boxes
    and scores (as :class:`EndToEndDecode`), then each set's task output, Segment26's prototypes, and what training
    alone reads (``aux``: Segment26's fused P3 feature, Pose26's per-level keypoint features; ``one2one_aux``:
    Pose26's one-to-one features)."""

    # positional inputs per branch set (read by PruneUnusedHeadBranch) and the training-only ones
    BRANCH_ARGS = {False: (0, 1, 5), True: (3, 4, 6)}  # one2one → the inputs that branch set reads
    TRAIN_ONLY_ARGS = (8, 9)

    def __init__(self, head: nn.Module, **options):
        from ..tracing import head_task  # Segment26 / Pose26 / OBB26 are Segment / Pose / OBB subclasses

        super().__init__(head, **options)
        self.task = head_task(head)
        self.key = TASK_KEY[self.task]
        if self.task == "segment":
            self.semseg = head.proto.semseg
        elif self.task == "pose":
            self.kpt_shape, self.nk, self.nk_sigma = tuple(head.kpt_shape), head.nk, head.nk_sigma
            self.cv4_sigma, self.one2one_cv4_sigma = head.cv4_sigma, head.one2one_cv4_sigma
            self.flow_model = head.flow_model

    def with_options(self, **options) -> EndToEndTaskDecode:
        """As :meth:`EndToEndDecode.with_options`; a deployed copy (``export=True``) drops the training-only modules,
        as Ultralytics' ``fuse`` does."""
        new = super().with_options(**options)
        if new.export:
            for name in ("semseg", "cv4_sigma", "one2one_cv4_sigma", "flow_model"):
                if hasattr(new, name):
                    setattr(new, name, None)
        return new

    def kpts_decode(self, kpts: torch.Tensor, feats) -> torch.Tensor:
        """``Pose26.kpts_decode``: (xy + anchor)·stride, sigmoid on visibility (both of its forms)."""
        return decode_keypoints(kpts, *self.anchors(feats, kpts), self.kpt_shape, self.export, yolo26=True)

    def infer(self, boxes, scores, feats, one2one_boxes, one2one_scores, extra=None, one2one_extra=None):
        """The eval prediction of the selected branch set: decoded boxes, class probabilities and the task's
        channels (B, 4 + nc + extra, A), then top-k rows (B, max_det, 6 + extra) on the one-to-one path."""
        b, s, e = (one2one_boxes, one2one_scores, one2one_extra) if self.one2one else (boxes, scores, extra)
        y = self.predictions(b, s, feats, e)
        return self.postprocess(y.permute(0, 2, 1)) if self.one2one else y

    def predictions(self, boxes, scores, feats, extra) -> torch.Tensor:
        """One branch set's decoded predictions (B, 4 + nc + extra, A), before any top-k (``Pose._inference``,
        ``OBB._inference``, ``Segment._inference`` with YOLO26's keypoint and angle forms)."""
        y = self.decode(boxes, scores, feats, extra if self.task == "obb" else None)
        return torch.cat([y, self.kpts_decode(extra, feats) if self.task == "pose" else extra], dim=1)

    def _sigma(self, heads, features, bs: int) -> torch.Tensor:
        return torch.cat([heads[i](features[i]).view(bs, self.nk_sigma, -1) for i in range(self.nl)], 2)

    def forward(self, boxes, scores, feats, one2one_boxes, one2one_scores, extra=None, one2one_extra=None,
                proto=None, aux=None, one2one_aux=None):
        if self.export and not self.training:  # deployed: the unselected branch and aux inputs may be None
            y = self.infer(boxes, scores, feats, one2one_boxes, one2one_scores, extra, one2one_extra)
            return (y, proto) if self.task == "segment" else y
        training = self.training
        o2o_feats = [f.detach() for f in feats] if training else feats
        o2m = {"boxes": boxes, "scores": scores, "feats": feats, self.key: extra}
        o2o = {"boxes": one2one_boxes, "scores": one2one_scores, "feats": o2o_feats, self.key: one2one_extra}
        if self.task == "pose" and training:
            if self.cv4_sigma is None:
                raise RuntimeError("EndToEndTaskDecode: a deployed (export) copy has no keypoint-sigma heads and "
                                   "cannot train; train the QAT graph, not the converted model")
            bs = boxes.shape[0]
            o2m["kpts_sigma"] = self._sigma(self.cv4_sigma, aux, bs)
            o2o["kpts_sigma"] = self._sigma(self.one2one_cv4_sigma, one2one_aux, bs)
        if self.task == "segment":
            p = (proto, self.semseg(aux)) if training else proto  # Proto26: semantic logits in training only
            o2m["proto"] = p
            o2o["proto"] = tuple(t.detach() for t in p) if isinstance(p, tuple) else p.detach()
        raw = {"one2many": o2m, "one2one": o2o}
        if training:
            return raw
        y = self.infer(boxes, scores, feats, one2one_boxes, one2one_scores, extra, one2one_extra)
        return ((y, proto), raw) if self.task == "segment" else (y, raw)


# ------------------------------------------------------------------------------------------- traceable forwards


def _levels(heads, feats, bs: int, channels: int):
    return torch.cat([heads[i](feats[i]).view(bs, channels, -1) for i in range(len(feats))], 2)


def _proto26(proto: nn.Module, x):
    """``Proto26.forward`` without its training-only semantic branch: (prototypes, the fused P3 feature).
    The P4 / P5 upsamples are ``nn.Upsample`` modules (:func:`prepare_e2e_task_head`) that call the same
    ``F.interpolate(scale_factor=2**k, mode="nearest")`` as Ultralytics: bit-identical, and a registered resize."""
    feat = x[0]
    for i, f in enumerate(proto.feat_refine):
        feat = feat + proto.fxqat_up[i](f(x[i + 1]))
    return proto.cv3(proto.cv2(proto.upsample(proto.cv1(proto.feat_fuse(feat))))), feat


def e2e_task_forward(self, x):
    """Traceable forward of Segment26 / Pose26 / OBB26 (``self``): both branch sets, the one-to-one one on detached
    feature maps, then :class:`EndToEndTaskDecode` (``self.decode``, a leaf)."""
    bs = x[0].shape[0]
    xd = [xi.detach() for xi in x]
    task = self.decode.task
    out, extra, aux = [], [], []
    for pre, feats in (("", x), ("one2one_", xd)):
        out.append(_levels(getattr(self, pre + "cv2"), feats, bs, 4 * self.reg_max))
        out.append(_levels(getattr(self, pre + "cv3"), feats, bs, self.nc))
        cv4 = getattr(self, pre + "cv4")
        if task == "pose":
            features = [cv4[i](feats[i]) for i in range(self.nl)]
            extra.append(_levels(getattr(self, pre + "cv4_kpts"), features, bs, self.nk))
            aux.append(features)
        else:
            extra.append(_levels(cv4, feats, bs, self.nm if task == "segment" else self.ne))
    proto = None
    if task == "segment":
        proto, fused = _proto26(self.proto, x)
        aux = [fused, None]
    return self.decode(out[0], out[1], list(x), out[2], out[3], extra[0], extra[1], proto, *aux)


def e2e_task_heads() -> tuple[type, ...]:
    """YOLO26 task head types fxqat traces (exact types); each gets an :class:`EndToEndTaskDecode`."""
    from ultralytics.nn.modules.head import OBB26, Pose26, Segment26

    return (Segment26, Pose26, OBB26)


def prepare_e2e_task_head(head: nn.Module) -> None:
    """Ready a (copied) YOLO26 task head for tracing: its decode leaf and, for Proto26, one ``nn.Upsample`` per
    refined level (P4 ×2, P5 ×4)."""
    if not hasattr(head, "decode"):
        head.decode = EndToEndTaskDecode(head)
    proto = getattr(head, "proto", None)
    if proto is not None and hasattr(proto, "feat_refine") and not hasattr(proto, "fxqat_up"):
        proto.fxqat_up = nn.ModuleList(nn.Upsample(scale_factor=2 ** (i + 1), mode="nearest")
                                       for i in range(len(proto.feat_refine)))


def e2e_task_forwards() -> dict:
    return {cls: e2e_task_forward for cls in e2e_task_heads()}

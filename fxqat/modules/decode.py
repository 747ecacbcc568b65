"""``DetectDecode``: the float tail of an Ultralytics ``Detect`` head as one module (a leaf of the traced graph).

DFL (softmax over ``reg_max`` bins + the fixed 0..15 projection), anchors rebuilt from feature-map shapes, dist2bbox
and the class sigmoid. Its options are constructor arguments; passes install a configured copy
(:meth:`DetectDecode.with_options`) instead of setting flags on a shared instance.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class DetectDecode(nn.Module):
    """The float tail of Ultralytics ``Detect``: DFL, anchors from feature-map shapes, dist2bbox, class sigmoid.

    In training mode it returns the raw dict ``v8DetectionLoss`` consumes; in eval mode ``(y, raw)`` (or ``y`` when
    ``export``), exactly like ``Detect``. Anchors are rebuilt whenever the feature-map shape changes, so one traced
    graph serves every input size.
    """

    supports_bins_last = True  # BinsLastHead may feed it per-level channels-last maps (see _decode_bins_last)

    def __init__(self, detect: nn.Module, *, export: bool | None = None, fast_dfl: bool = False,
                 bins_last: bool = False):
        """``export``: eval returns only the decoded tensor (default: the head's own ``export`` flag);
        ``fast_dfl``: DFL as a softmax over the bins' own axis + a 1x16 matmul (the deployed forms use it);
        ``bins_last``: the inputs are per-level lists of (B, H·W, C) channels-last maps (the INT8 head's float
        outputs, uncopied), decoded anchor-major with one transpose at the end."""
        super().__init__()
        self.dfl = detect.dfl
        self.nc, self.reg_max, self.nl = detect.nc, detect.reg_max, detect.nl
        self.register_buffer("stride", detect.stride.detach().clone().float(), persistent=True)
        self.xywh = not getattr(detect, "xyxy", False)
        self.export = bool(getattr(detect, "export", False)) if export is None else bool(export)
        self.fast_dfl = bool(fast_dfl)
        self.bins_last = bool(bins_last)
        self._shape = None
        self._anchors = self._strides = self._anchors_by_row = None

    def with_options(self, **options) -> DetectDecode:
        """A copy of this decode with other constructor options (``export``, ``fast_dfl``, ``bins_last``): what
        the export and INT8 passes install in place of the training graph's decode."""
        bad = set(options) - {"export", "fast_dfl", "bins_last"}
        if bad:
            raise TypeError(f"unknown DetectDecode option(s) {sorted(bad)}; valid: export, fast_dfl, bins_last")
        if options.get("bins_last") and not self.supports_bins_last:
            raise ValueError(f"{type(self).__name__}: bins_last is not implemented for this head (Detect only)")
        new = copy.deepcopy(self)
        for k, v in options.items():
            setattr(new, k, bool(v))
        return new

    def anchors(self, feats, like: torch.Tensor):
        """Anchor points (2, A) and strides (1, A) for these feature-map sizes (only their shapes are read), cached
        per shape."""
        from ultralytics.utils.tal import make_anchors

        shape = feats[0].shape
        if self._shape != shape or self._anchors.device != like.device or self._anchors.dtype != like.dtype:
            dummies = [torch.empty((1, 1, *f.shape[2:]), dtype=like.dtype, device=like.device) for f in feats]
            a, s = make_anchors(dummies, self.stride, 0.5)  # (A, 2), (A, 1)
            self._anchors_by_row = a, s
            self._anchors, self._strides = a.transpose(0, 1), s.transpose(0, 1)
            self._shape = shape
        return self._anchors, self._strides

    def _dfl(self, boxes: torch.Tensor) -> torch.Tensor:
        if not self.fast_dfl:
            return self.dfl(boxes)  # Ultralytics' own DFL: bit-exact with eager
        c1 = self.reg_max
        b, _, a = boxes.shape
        # no transpose: the softmax runs over the bins' own axis (measured in benchmarks/README.md)
        return (self._proj(boxes).view(1, 1, 1, c1) @ boxes.view(b, 4, c1, a).softmax(2)).view(b, 4, a)

    def _proj(self, like: torch.Tensor) -> torch.Tensor:
        return self.dfl.conv.weight.reshape(self.reg_max).to(like.dtype)

    def _decode_bins_last(self, boxes: list, scores: list, feats) -> torch.Tensor:
        """Per-level (B, H·W, 4·reg_max) and (B, H·W, nc) maps → (B, 4 + nc, A). Every step reads contiguous rows:
        DFL's softmax per level (no 2 MB concat of the raw maps), dist2bbox on (B, A, 4), one transpose at the end;
        the same values as the channel-major decode of the same maps."""
        from ultralytics.utils.tal import dist2bbox

        self.anchors(feats, boxes[0])
        anchors, strides = self._anchors_by_row
        proj = self._proj(boxes[0])
        dist = torch.cat([b.view(b.shape[0], -1, 4, self.reg_max).softmax(-1) @ proj for b in boxes], 1)
        dbox = dist2bbox(dist, anchors.unsqueeze(0), xywh=self.xywh, dim=-1) * strides
        return torch.cat((dbox, torch.cat(scores, 1).sigmoid()), -1).transpose(1, 2).contiguous()

    def decode_boxes(self, boxes: torch.Tensor, feats, angle: torch.Tensor | None = None) -> torch.Tensor:
        """DFL + dist2bbox (dist2rbox with ``angle``) in pixels, like ``Detect._get_decode_boxes``."""
        from ultralytics.utils.tal import dist2bbox, dist2rbox

        anchors, strides = self.anchors(feats, boxes)
        if angle is not None:
            return dist2rbox(self._dfl(boxes), angle, anchors.unsqueeze(0), dim=1) * strides
        return dist2bbox(self._dfl(boxes), anchors.unsqueeze(0), xywh=self.xywh, dim=1) * strides

    def decode(self, boxes, scores, feats, angle: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 4 + nc, A): decoded boxes and class probabilities, like ``Detect._inference``."""
        if self.bins_last:
            return self._decode_bins_last(boxes, scores, feats)
        return torch.cat((self.decode_boxes(boxes, feats, angle), scores.sigmoid()), 1)

    def forward(self, boxes, scores, feats):
        raw = {"boxes": boxes, "scores": scores, "feats": feats}
        if self.training:
            return raw
        y = self.decode(boxes, scores, feats)
        return y if self.export else (y, raw)

"""Pass (convert stage): an end-to-end head deployed on one path does not compute the other branch set.

Ultralytics' ``Detect.fuse`` deletes the unused branch set before inference (``one2one_*`` on the one-to-many path,
``cv2`` / ``cv3`` on the one-to-one path). The INT8 graph does the same: the deployed ``EndToEndDecode``
(export mode) reads only the selected branch, so the other branch's inputs become ``None`` and its convs, views
and concats, now unused, are removed. ONNX export needs no pass: the exporter drops unused nodes itself.

    P_i ─► cv2/cv3 (one-to-many) ─► ✗                  (one2one=True)
    P_i ─► detach ─► one2one_cv2/cv3 ─► decode ─► top-k

YOLO26's task heads (``EndToEndTaskDecode``) also drop their training-only inputs: Segment26's fused P3 feature
(for the semantic branch) and Pose26's keypoint features (for the sigma heads).
"""

from __future__ import annotations

import torch.fx as fx

from ..graph.registry import op_kind
from ..modules.e2e import EndToEndDecode
from .base import FxqatPass


class PruneUnusedHeadBranch(FxqatPass):
    name = "prune_unused_head_branch"

    def run(self, gm: fx.GraphModule) -> bool:
        changed = False
        for n in list(gm.graph.nodes):
            m = gm.get_submodule(n.target) if n.op == "call_module" else None
            if not (op_kind(gm, n) == "decode" and isinstance(m, EndToEndDecode) and m.export):
                continue
            args = list(n.args)
            unused = [i for i in m.BRANCH_ARGS[not m.one2one] + m.TRAIN_ONLY_ARGS if i < len(args)]
            if all(args[i] is None for i in unused):
                continue
            for i in unused:
                args[i] = None
            n.args = tuple(args)
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
        return changed

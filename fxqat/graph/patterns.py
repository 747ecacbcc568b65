"""Pattern declarations (data) and the matcher.

A pattern names the roles of the nodes inside one kind of Ultralytics block, by op kind and module path relative
to the block, plus the edges that must connect them. The matcher finds every block instance through the tracer's
block meta (never through node names), checks the edges with networkx, and writes each node's role into
``node.meta["fxqat"].role``. Roles are what qconfig rules and the critical-layer analysis refer to
(``c2f.concat``, ``sppf.pool``, ``detect.box_last``, ...). Op kinds come from ``graph/registry.py``; which kinds
keep their input's grid is registry data too (read by ``passes/annotate.py``). Patterns name the pieces and the QAT
replacement each block becomes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from .meta import info
from .registry import op_kind


@dataclass(frozen=True)
class Role:
    name: str  # e.g. "c2f.cv1"
    op: str  # op kind: conv | cat | add | pool | resize | split | decode
    path: str = ""  # glob of the module path relative to the block ("" = the block itself, "cv1", "cv2.*.2")
    optional: bool = False


@dataclass(frozen=True)
class Pattern:
    name: str
    blocks: tuple[str, ...]  # Ultralytics block types it lives in
    roles: tuple[Role, ...]
    edges: tuple[tuple[str, str], ...] = ()  # (role a, role b): some a-node reaches some b-node
    replacement: str = ""  # the QAT replacement this block is (seed names)


# C2f / C3k2 — QATCSPLayer
#   x ─► cv1 ─► chunk ─┬─[0]───────────────────────────────┐
#                      └─[1]─► m.0 ─► … ─► m.(n-1) ─► (each) ─┤
#                                                           cat ─► cv2 ─►
C2F = Pattern("c2f", ("C2f", "C3k2"), (
    Role("c2f.cv1", "conv", "cv1"), Role("c2f.split", "split"), Role("c2f.concat", "cat"),
    Role("c2f.cv2", "conv", "cv2"),
), (("c2f.cv1", "c2f.split"), ("c2f.split", "c2f.concat"), ("c2f.concat", "c2f.cv2")), "QATCSPLayer")

# Bottleneck — QATBottleneckCSP
#   x ─► cv1 ─► cv2 ─► (+ x when shortcut) ─►
BOTTLENECK = Pattern("bottleneck", ("Bottleneck",), (
    Role("bottleneck.cv1", "conv", "cv1"), Role("bottleneck.cv2", "conv", "cv2"),
    Role("bottleneck.add", "add", optional=True),
), (("bottleneck.cv1", "bottleneck.cv2"), ("bottleneck.cv2", "bottleneck.add")), "QATBottleneckCSP")

# SPPF — QATSPPF
#   x ─► cv1 ─► pool ─► pool ─► pool
#         │      │       │       │
#         └──────┴───────┴───────┴─► cat ─► cv2 ─►
SPPF = Pattern("sppf", ("SPPF",), (
    Role("sppf.cv1", "conv", "cv1"), Role("sppf.pool", "pool", "m*"), Role("sppf.concat", "cat"),
    Role("sppf.cv2", "conv", "cv2"),
), (("sppf.cv1", "sppf.pool"), ("sppf.pool", "sppf.concat"), ("sppf.concat", "sppf.cv2")), "QATSPPF")

# Detect — QATDetectionHead (per level i: box branch cv2.i, class branch cv3.i; DFL + decode stay float)
#   P_i ─► cv2.i.0 ─► cv2.i.1 ─► cv2.i.2 (box_last, 1×1) ─► view ─► cat ─┐
#   P_i ─► cv3.i.0 ─► cv3.i.1 ─► cv3.i.2 (cls_last, 1×1) ─► view ─► cat ─┴─► decode: DFL, anchors, dist2bbox, sigmoid
# Segment, Pose and OBB are Detect plus a branch: their box / class branches and decode take Detect's roles.
DETECT_HEADS = ("Detect", "Segment", "Pose", "OBB", "v10Detect", "Segment26", "Pose26", "OBB26")
DETECT = Pattern("detect", DETECT_HEADS, (
    Role("detect.box", "conv", "cv2.*.[01]*"), Role("detect.box_last", "conv", "cv2.*.2"),
    Role("detect.cls", "conv", "cv3.*.[01]*"), Role("detect.cls_last", "conv", "cv3.*.2"),
    Role("detect.concat", "cat"), Role("detect.decode", "decode", "decode"),
), (("detect.box", "detect.box_last"), ("detect.cls", "detect.cls_last"), ("detect.box_last", "detect.decode"),
    ("detect.cls_last", "detect.decode")), "QATDetectionHead")

# Segment — mask coefficients per level (cv4.i, last 1×1 float out) + Proto on P3; both reach the decode (detect.decode)
#   P_i ─► cv4.i.0 ─► cv4.i.1 ─► cv4.i.2 (mask_last) ─► view ─► cat ─────────────────────────────┐
#   P3  ─► proto.cv1 ─► proto.upsample (ConvTranspose2d ×2, float) ─► proto.cv2 ─► proto.cv3 ─────┴─► decode
# Segment26 (YOLO26): the same, Proto26 first joining P4 / P5 into P3 (1×1 refine, nearest 2× / 4×, add, 3×3 fuse)
#   P4, P5 ─► proto.feat_refine.j ─► ×2^(j+1) ─► + P3 ─► proto.feat_fuse ─► proto.cv1 ─► … (as above)
SEGMENT = Pattern("segment", ("Segment", "Segment26"), (
    Role("segment.mask", "conv", "cv4.*.[01]*"), Role("segment.mask_last", "conv", "cv4.*.2"),
    Role("segment.refine", "conv", "proto.feat_refine.*", optional=True),
    Role("segment.fuse", "conv", "proto.feat_fuse*", optional=True),
    Role("segment.proto", "conv", "proto.cv[12]*"), Role("segment.upsample", "other", "proto.upsample"),
    Role("segment.proto_last", "conv", "proto.cv3*"),
), (("segment.mask", "segment.mask_last"), ("segment.refine", "segment.fuse"), ("segment.fuse", "segment.proto"),
    ("segment.proto", "segment.upsample"), ("segment.upsample", "segment.proto_last")), "QATSegmentHead")

# Pose — keypoints per level (cv4.i; last 1×1 float out); PoseDecode: (xy·2 + anchor − 0.5)·stride, sigmoid(vis)
POSE = Pattern("pose", ("Pose",), (
    Role("pose.kpt", "conv", "cv4.*.[01]*"), Role("pose.kpt_last", "conv", "cv4.*.2"),
), (("pose.kpt", "pose.kpt_last"),), "QATPoseHead")

# Pose26 (YOLO26): cv4.i is two Convs; the keypoints' 1×1 is cv4_kpts.i (its sigma 1×1, cv4_sigma.i, is
# training-only and runs inside the decode leaf); EndToEndTaskDecode: (xy + anchor)·stride, sigmoid(vis)
POSE26 = Pattern("pose26", ("Pose26",), (
    Role("pose.kpt", "conv", "cv4.*"), Role("pose.kpt_last", "conv", "cv4_kpts.*"),
), (("pose.kpt", "pose.kpt_last"),), "QATPoseHead")

# OBB — angle logits per level (cv4.i; last 1×1 float out); OBBDecode: (sigmoid − 0.25)·π, dist2rbox
OBB = Pattern("obb", ("OBB", "OBB26"), (  # OBB26: the angle logits reach the decode raw (no sigmoid)
    Role("obb.angle", "conv", "cv4.*.[01]*"), Role("obb.angle_last", "conv", "cv4.*.2"),
), (("obb.angle", "obb.angle_last"),), "QATOBBHead")

# Classify — conv ─► global average pool ─► dropout ─► Linear (as a 1×1 conv: LinearAsConv) ─► flatten ─► softmax
#   the Linear keeps INT8 per-channel weights and a float output (logits); the softmax (ClassifyDecode) is float
CLASSIFY = Pattern("classify", ("Classify",), (
    Role("classify.conv", "conv", "conv"), Role("classify.linear", "conv", "linear"),
    Role("classify.decode", "decode", "decode"),
), (("classify.conv", "classify.linear"), ("classify.linear", "classify.decode")), "QATClassifyHead")

# End-to-end heads (YOLO26 Detect, YOLOv10 v10Detect): the one-to-one branch set, on detached feature maps, into
# the same decode (EndToEndDecode: top-k on the one-to-one branch when end2end). YOLO26: reg_max 1, no DFL;
# class branch DWConv 3×3 + Conv 1×1 twice (v10: grouped Conv 3×3 + Conv 1×1).
#   P_i ─► detach ─► one2one_cv2.i.0 ─► one2one_cv2.i.1 ─► one2one_cv2.i.2 (box_last) ─► view ─► cat ─┐
#   P_i ─► detach ─► one2one_cv3.i.0 ─► one2one_cv3.i.1 ─► one2one_cv3.i.2 (cls_last) ─► view ─► cat ─┴─► decode
E2E = Pattern("e2e", ("Detect", "v10Detect", "Segment26", "Pose26", "OBB26"), (
    Role("e2e.detach", "detach"), Role("e2e.box", "conv", "one2one_cv2.*.[01]*"),
    Role("e2e.box_last", "conv", "one2one_cv2.*.2"), Role("e2e.cls", "conv", "one2one_cv3.*.[01]*"),
    Role("e2e.cls_last", "conv", "one2one_cv3.*.2"),
), (("e2e.detach", "e2e.box"), ("e2e.detach", "e2e.cls"), ("e2e.box", "e2e.box_last"), ("e2e.cls", "e2e.cls_last")),
    "QATEndToEndHead")  # the decode keeps Detect's role, detect.decode

# The YOLO26 task heads' one-to-one task branch (one2one_cv4[, one2one_cv4_kpts]) on the same detached maps; the last
# 1×1 keeps INT8 weights and a float output, as the one-to-many branch's
E2E_SEGMENT = Pattern("e2e_segment", ("Segment26",), (
    Role("e2e.mask", "conv", "one2one_cv4.*.[01]*"), Role("e2e.mask_last", "conv", "one2one_cv4.*.2"),
), (("e2e.mask", "e2e.mask_last"),), "QATEndToEndHead")
E2E_POSE = Pattern("e2e_pose", ("Pose26",), (
    Role("e2e.kpt", "conv", "one2one_cv4.*"), Role("e2e.kpt_last", "conv", "one2one_cv4_kpts.*"),
), (("e2e.kpt", "e2e.kpt_last"),), "QATEndToEndHead")
E2E_OBB = Pattern("e2e_obb", ("OBB26",), (
    Role("e2e.angle", "conv", "one2one_cv4.*.[01]*"), Role("e2e.angle_last", "conv", "one2one_cv4.*.2"),
), (("e2e.angle", "e2e.angle_last"),), "QATEndToEndHead")

# Attention (C2PSA / PSA / C3k2-with-attention PSABlocks): qkv conv, q·k and attn·v matmuls, softmax, positional
# conv on v, output projection. The matmuls and the softmax are float by default (kinds matmul / softmax).
#   x ─► qkv ─► view/split ─► q·k (matmul) ─► softmax ─► v·attn (matmul) ─► view ─► + pe(v) ─► proj ─►
ATTENTION = Pattern("attention", ("Attention",), (
    Role("attention.qkv", "conv", "qkv"), Role("attention.matmul", "matmul"), Role("attention.softmax", "softmax"),
    Role("attention.pe", "conv", "pe"), Role("attention.add", "add"), Role("attention.proj", "conv", "proj"),
), (("attention.qkv", "attention.matmul"), ("attention.matmul", "attention.softmax"),
    ("attention.softmax", "attention.add"), ("attention.pe", "attention.add"), ("attention.add", "attention.proj")),
    "QATAttention")

# Neck joins and resizes: Concat(…) and nn.Upsample layers.
CONCAT = Pattern("concat", ("Concat",), (Role("concat", "cat"),))
UPSAMPLE = Pattern("upsample", ("Upsample",), (Role("upsample", "resize"),))

PATTERNS: tuple[Pattern, ...] = (C2F, BOTTLENECK, SPPF, DETECT, SEGMENT, POSE, POSE26, OBB, CLASSIFY, E2E, E2E_SEGMENT,
                                 E2E_POSE, E2E_OBB, ATTENTION, CONCAT, UPSAMPLE)
ROLES: tuple[str, ...] = ("first_conv", "conv") + tuple(r.name for p in PATTERNS for r in p.roles)


@dataclass
class Match:
    pattern: str
    path: str  # block instance path, e.g. "model.2"
    nodes: dict[str, list[str]] = field(default_factory=dict)  # role → node names
    replacement: str = ""


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name)
        for p in n.all_input_nodes:
            g.add_edge(p.name, n.name)
    return g


def _rel(path: str, base: str) -> str | None:
    if path == base:
        return ""
    return path[len(base) + 1:] if path.startswith(base + ".") else None


def match_patterns(gm: fx.GraphModule, patterns: tuple[Pattern, ...] = PATTERNS) -> list[Match]:
    """Assign roles to nodes and return the matches. Nodes in no pattern keep ``role=None`` (convs get "conv")."""
    g = to_networkx(gm)
    kinds = {n: op_kind(gm, n) for n in gm.graph.nodes}
    matches: list[Match] = []
    for pat in patterns:
        instances: dict[str, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            for block in pat.blocks:
                path = info(n).within(block)
                if path is not None:
                    instances.setdefault(path, []).append(n)
                    break
        for path, nodes in instances.items():
            found: dict[str, list[fx.Node]] = {}
            for role in pat.roles:
                hits = []
                for n in nodes:
                    rel = _rel(info(n).module_path, path)
                    if kinds[n] == role.op and rel is not None and fnmatch.fnmatchcase(rel, role.path or ""):
                        if role.op in ("cat", "add", "split") and info(n).block_path != path:
                            continue  # belongs to a nested block
                        hits.append(n)
                if hits:
                    found[role.name] = hits
            if any(r.name not in found for r in pat.roles if not r.optional):
                continue
            ok = all(any(nx.has_path(g, a.name, b.name) for a in found[ra] for b in found[rb])
                     for ra, rb in pat.edges if ra in found and rb in found)
            if not ok:
                continue
            for role, hits in found.items():
                for n in hits:
                    info(n).role = role
            matches.append(Match(pat.name, path, {r: [n.name for n in h] for r, h in found.items()}, pat.replacement))
    for n in gm.graph.nodes:
        if kinds[n] == "conv" and info(n).role is None:
            info(n).role = "conv"
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for u in x.users:
        if kinds[u] == "conv":
            info(u).role = "first_conv"
    return matches

"""YOLO-aware symbolic tracing: an Ultralytics detection model becomes one clean ``torch.fx`` graph.

Why plain ``torch.fx.symbolic_trace`` fails on Ultralytics models, and what fxqat does instead:

* ``DetectionModel.forward(x, *args, **kwargs)`` iterates a Proxy → we trace a small root module that replays
  ``_predict_once`` (the layer loop with its ``m.f`` / ``save`` wiring, all plain Python ints);
* ``C2f`` does ``list(self.cv1(x).chunk(2, 1))``, ``C2PSA``/``Attention`` unpack tuples and shapes → the tracer
  substitutes the *traceable forwards* declared in :func:`traceable_forwards` (same ops, explicit indexing), per
  instance and only while tracing — Ultralytics classes are never patched, other models in the process are untouched;
* ``Detect`` compares ``self.shape != shape`` and rebuilds anchors → the head's convs are traced, and the float tail
  (DFL softmax + 0..15 conv, anchors from feature-map shapes, dist2bbox, class sigmoid) becomes one leaf module,
  :class:`DetectDecode`, that decides train/eval output at run time like Detect does;
* every Ultralytics ``Conv`` shares ONE ``nn.SiLU`` (``Conv.default_act``) → parameter-free modules called from several
  places are split into one module per call site, so a per-node setting can never leak to another node.

Every node carries :class:`fxqat.graph.meta.NodeInfo` under ``node.meta["fxqat"]``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from .errors import TraceError
from .graph.meta import META_KEY, NodeInfo
from .graph.registry import module_kind
from .models import load_model
from .modules.decode import DetectDecode
from .modules.e2e import EndToEndDecode, e2e_detect_forward, e2e_forwards, e2e_heads, has_one2one
from .modules.e2e_tasks import e2e_task_forwards, e2e_task_heads, prepare_e2e_task_head
from .modules.heads import head_decodes

# --------------------------------------------------------------------------------------------- traceable forwards
# Same arithmetic as Ultralytics' forwards (so traced == eager bit for bit), written without iterating Proxies.


def _c2f_forward(self, x):
    t = self.cv1(x).chunk(2, 1)
    y = [t[0], t[1]]
    for m in self.m:
        y.append(m(y[-1]))
    return self.cv2(torch.cat(y, 1))


def _c2psa_forward(self, x):
    t = self.cv1(x).split((self.c, self.c), dim=1)
    a, b = t[0], t[1]
    b = self.m(b)
    return self.cv2(torch.cat((a, b), 1))


def _attention_forward(self, x):
    s = x.shape
    B, C, H, W = s[0], s[1], s[2], s[3]
    N = H * W
    qkv = self.qkv(x)
    t = qkv.view(B, self.num_heads, self.key_dim * 2 + self.head_dim, N).split(
        [self.key_dim, self.key_dim, self.head_dim], dim=2)
    q, k, v = t[0], t[1], t[2]
    attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
    x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
    return self.proj(x)


def _detect_head(self, x):
    bs = x[0].shape[0]
    boxes = torch.cat([self.cv2[i](x[i]).view(bs, 4 * self.reg_max, -1) for i in range(self.nl)], dim=-1)
    scores = torch.cat([self.cv3[i](x[i]).view(bs, self.nc, -1) for i in range(self.nl)], dim=-1)
    return bs, boxes, scores


def _branch(self, x, bs: int, channels: int):
    """A task head's extra branch ``cv4`` (mask coefficients, keypoints, angle logits), levels joined on anchors."""
    return torch.cat([self.cv4[i](x[i]).view(bs, channels, -1) for i in range(self.nl)], 2)


def _detect_forward(self, x):
    if has_one2one(self):  # YOLO26: both branch sets, EndToEndDecode
        return e2e_detect_forward(self, x)
    _, boxes, scores = _detect_head(self, x)
    return self.decode(boxes, scores, list(x))  # leaf: DetectDecode


def _segment_forward(self, x):
    bs, boxes, scores = _detect_head(self, x)
    mc = _branch(self, x, bs, self.nm)
    return self.decode(boxes, scores, list(x), mc, self.proto(x[0]))  # leaf: SegmentDecode; Proto traced


def _pose_forward(self, x):
    bs, boxes, scores = _detect_head(self, x)
    return self.decode(boxes, scores, list(x), _branch(self, x, bs, self.nk))  # leaf: PoseDecode


def _obb_forward(self, x):
    bs, boxes, scores = _detect_head(self, x)
    return self.decode(boxes, scores, list(x), _branch(self, x, bs, self.ne))  # leaf: OBBDecode (angle sigmoid)


def _classify_forward(self, x):
    if isinstance(x, list):
        x = torch.cat(x, 1)
    return self.decode(self.linear(self.drop(self.pool(self.conv(x)).flatten(1))))  # leaf: ClassifyDecode (softmax)


def traceable_forwards() -> dict[type, Callable | None]:
    """Ultralytics class → traceable forward (None: refused with a clear error). Exact types: a subclass (e.g.
    ``Segment`` of ``Detect``) is traced through its own forward unless listed itself."""
    from ultralytics.nn.modules import OBB, C2PSA, C2f, C2fAttn, C2fCIB, C3k2, Classify, Detect, Pose, Segment
    from ultralytics.nn.modules.block import Attention

    return {C2f: _c2f_forward, C3k2: _c2f_forward, C2fAttn: None, C2PSA: _c2psa_forward,
            Attention: _attention_forward, Detect: _detect_forward, Segment: _segment_forward, Pose: _pose_forward,
            OBB: _obb_forward, Classify: _classify_forward, C2fCIB: _c2f_forward, **e2e_forwards(),
            **e2e_task_forwards()}


class YoloRoot(nn.Module):
    """Replays ``BaseModel._predict_once`` over ``model.model`` so the module paths stay ``model.<i>....``."""

    def __init__(self, det_model: nn.Module):
        super().__init__()
        self.model = det_model.model
        self.save = sorted(det_model.save)

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def _is_ultralytics(m: nn.Module) -> bool:
    return type(m).__module__.startswith("ultralytics.")


def _is_layer_path(path: str) -> bool:
    parts = path.split(".")
    return len(parts) == 2 and parts[0] == "model" and parts[1].isdigit()


class YoloTracer(fx.Tracer):
    """``torch.fx.Tracer`` that knows Ultralytics blocks. ``leaf_modules``: types, type names or path globs."""

    def __init__(self, leaf_modules: Iterable = ()):
        super().__init__()
        self.leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
        self.leaf_patterns = tuple(str(x) for x in leaf_modules if not isinstance(x, type))
        self.yolo_scope: list[tuple[str, str]] = []  # Ultralytics blocks being traced, outermost first
        self.path_stack: list[str] = [""]
        self.forwards = traceable_forwards()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_kind(m) == "decode":  # DetectDecode, DFL
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, p) or type(m).__name__ == p for p in self.leaf_patterns):
            return True
        return super().is_leaf_module(m, qualname)

    def _site_path(self, m: nn.Module, default: str) -> str:
        """Path of ``m`` as seen from the module calling it (distinct per call site for shared modules)."""
        parent_path = self.path_stack[-1]
        try:
            parent = self.root.get_submodule(parent_path) if parent_path else self.root
        except AttributeError:
            return default
        for name, child in parent.named_children():
            if child is m:
                return f"{parent_path}.{name}" if parent_path else name
        return default

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        site = self._site_path(m, path)
        tname = type(m).__name__
        if self.is_leaf_module(m, site):
            pushed = _is_ultralytics(m) or isinstance(m, DetectDecode) or _is_layer_path(site)
            if pushed:
                self.yolo_scope.append((site, "DFL" if isinstance(m, DetectDecode) else tname))
            try:
                proxy = self.create_proxy("call_module", path, args, kwargs)
            finally:
                if pushed:
                    self.yolo_scope.pop()
            proxy.node.meta[META_KEY].extra["site"] = site  # read by the SplitSharedModules pass
            return proxy
        if type(m) in self.forwards:
            fn = self.forwards[type(m)]
            if fn is None:
                raise TraceError(f"{site} ({tname}): not traceable by fxqat; declare it a leaf: "
                                 f"fxqat.trace(model, leaf_modules=['{site}']) or leaf_modules=['{tname}']")
            forward = fn.__get__(m)
        pushed = _is_ultralytics(m) or _is_layer_path(site)
        if pushed:
            self.yolo_scope.append((site, tname))
        self.path_stack.append(site)
        try:
            return forward(*args, **kwargs)
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(
                f"{site} ({tname}): cannot be traced ({type(e).__name__}: {e}); declare it a leaf so it runs as one "
                f"opaque node: fxqat.trace(model, leaf_modules=['{site}']) or leaf_modules=['{tname}']") from e
        finally:
            self.path_stack.pop()
            if pushed:
                self.yolo_scope.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        scope = tuple(self.yolo_scope)
        layer, layer_type = None, ""
        if scope and scope[0][0].startswith("model."):
            layer, layer_type = int(scope[0][0].split(".")[1]), scope[0][1]
        path = target if kind == "call_module" else (self.path_stack[-1] if len(self.path_stack) > 1 else "")
        node.meta[META_KEY] = NodeInfo(layer=layer, layer_type=layer_type, module_path=path, scope=scope)
        return node


def _install_decode(model: nn.Module) -> None:
    head = model.model[-1]
    if type(head) in e2e_task_heads():  # YOLO26 Segment26 / Pose26 / OBB26
        prepare_e2e_task_head(head)
        return
    cls = EndToEndDecode if has_one2one(head) and type(head) in e2e_heads() else head_decodes().get(type(head))
    if cls is not None and not hasattr(head, "decode"):
        head.decode = cls(head)


def head_task(head) -> str:
    """The task of an Ultralytics head, by type: segment | pose | obb | classify | detect."""
    from ultralytics.nn.modules import OBB, Classify, Pose, Segment

    return next((t for cls, t in ((Segment, "segment"), (Pose, "pose"), (OBB, "obb"), (Classify, "classify"))
                 if isinstance(head, cls)), "detect")


def task_of(model) -> str:
    """The task of a loaded model: an fxqat graph (``meta["task"]``), an Ultralytics model or ``YOLO`` object."""
    if isinstance(model, fx.GraphModule):
        return getattr(model, "meta", {}).get("task", "detect")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "model", inner)
    head = layers[-1] if isinstance(layers, nn.Sequential) else None
    return head_task(head)


def trace(model, mode: str = "eval", leaf_modules: Iterable = (), *, nc: int | None = None,
          trust: bool | None = None) -> fx.GraphModule:
    """Trace an Ultralytics detection model into a ``torch.fx.GraphModule``.

    Args:
        model: a ``DetectionModel``, a ``YOLO`` object, a model YAML name (``yolov8n.yaml``) or a ``.pt`` path.
            The model is copied: tracing never changes the user's model or Ultralytics' classes.
        mode: ``"train"`` or ``"eval"``: the mode the returned graph starts in. Like Ultralytics' Detect, the graph
            returns the raw head dict in training mode and ``(decoded, raw)`` in eval mode; ``.train()``/``.eval()``
            switch it.
        leaf_modules: module types, type names or module-path globs kept as single opaque nodes.
        nc: number of classes when building from a YAML name.
        trust: a ``.pt`` file is loaded weights-only with an allow-list of Ultralytics / torch classes; ``True``
            (or ``FXQAT_TRUST_PICKLE=1``) unpickles anything in it — only for files you trust.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode={mode!r}: valid choices are 'train' and 'eval'")
    det = copy.deepcopy(load_model(model, nc=nc, trust=trust)).float()
    _install_decode(det)
    root = YoloRoot(det)
    tracer = YoloTracer(leaf_modules)
    root.train(mode == "train")
    graph = tracer.trace(root)
    gm = fx.GraphModule(root, graph, class_name="YoloGraph")
    for node in gm.graph.nodes:
        node.meta.setdefault(META_KEY, NodeInfo())
    from .passes.pipeline import run_passes, trace_passes

    gm = run_passes(gm, trace_passes(), "trace")
    gm.train(mode == "train")
    head = det.model[-1]
    nc = head.nc if hasattr(head, "nc") else head.linear.out_features  # Classify: its Linear's outputs
    gm.meta = {
        "names": dict(getattr(det, "names", {}) or {i: str(i) for i in range(nc)}),
        "nc": nc,
        "reg_max": getattr(head, "reg_max", None),  # None: a Classify head (no box distribution)
        "stride": det.stride.detach().clone(),
        "yaml": copy.deepcopy(getattr(det, "yaml", {})),
        "leaf_modules": list(leaf_modules),
        "task": head_task(head),
        "head": type(head).__name__,  # e.g. Pose26: YOLO26's task heads train with their own losses (fxqat.tasks)
    }
    if has_one2one(head):
        gm.meta["end2end"] = bool(head.end2end)  # which branch eval returns; fxqat.modules.e2e.set_end2end switches
    if hasattr(head, "kpt_shape"):
        gm.meta["kpt_shape"] = list(head.kpt_shape)
    return gm

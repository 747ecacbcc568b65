"""YOLO-aware symbolic tracing: an Ultralytics detection model becomes one clean ``torch.fx`` graph.

Why plain ``torch.fx.symbolic_trace`` fails on Ultralytics models, and what fxqat does instead:

* ``DetectionModel.forward(x, *args, **kwargs)`` iterates a Proxy → we trace a small root module that replays
  ``_predict_once`` (the layer loop with its ``m.f`` / ``save`` wiring, all plain Python ints);
* ``C2f`` does ``list(self.cv1(x).chunk(2, 1))``, ``C2PSA``/``Attention`` unpack tuples and shapes → the tracer
  substitutes the *traceable forwards* declared in :data:`TRACEABLE_FORWARDS` (same ops, explicit indexing), per
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
from .models import load_model

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


def _detect_forward(self, x):
    bs = x[0].shape[0]
    boxes = torch.cat([self.cv2[i](x[i]).view(bs, 4 * self.reg_max, -1) for i in range(self.nl)], dim=-1)
    scores = torch.cat([self.cv3[i](x[i]).view(bs, self.nc, -1) for i in range(self.nl)], dim=-1)
    return self.decode(boxes, scores, list(x))  # leaf: DetectDecode


#: Ultralytics class name → traceable forward. Classes not listed are traced through their own forward.
TRACEABLE_FORWARDS: dict[str, Callable] = {
    "C2f": _c2f_forward,
    "C3k2": _c2f_forward,
    "C2fAttn": None,  # takes a guide tensor: not supported, reported with a clear error
    "C2PSA": _c2psa_forward,
    "Attention": _attention_forward,
    "Detect": _detect_forward,
}


class DetectDecode(nn.Module):
    """The float tail of Ultralytics ``Detect``: DFL, anchors from feature-map shapes, dist2bbox, class sigmoid.

    In training mode it returns the raw dict ``v8DetectionLoss`` consumes; in eval mode ``(y, raw)`` (or ``y`` when
    ``export``), exactly like ``Detect``. Anchors are rebuilt whenever the feature-map shape changes, so one traced
    graph serves every input size.
    """

    # convert() may set this and feed per-level lists of (B, H·W, C) maps: the head's channels-last float outputs,
    # uncopied; decoding then runs anchor-major and transposes once at the end
    bins_last = False

    def __init__(self, detect: nn.Module):
        super().__init__()
        self.dfl = detect.dfl
        self.nc, self.reg_max, self.nl = detect.nc, detect.reg_max, detect.nl
        self.register_buffer("stride", detect.stride.detach().clone().float(), persistent=True)
        self.xywh = not getattr(detect, "xyxy", False)
        self.export = bool(getattr(detect, "export", False))
        self.fast_dfl = False  # convert()/export turn this on: softmax over the bins' own axis + a 1x16 matmul
        self._shape = None
        self._anchors = self._strides = self._anchors_by_row = None

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
        # no transpose: torch 0.5 ms -> 0.44, ONNX Runtime 7.1 ms (Ultralytics' transpose + softmax(1)) -> 0.9 ms
        return (self._proj(boxes).view(1, 1, 1, c1) @ boxes.view(b, 4, c1, a).softmax(2)).view(b, 4, a)

    def _proj(self, like: torch.Tensor) -> torch.Tensor:
        return self.dfl.conv.weight.reshape(self.reg_max).to(like.dtype)

    def _decode_bins_last(self, boxes: list, scores: list, feats) -> torch.Tensor:
        """Per-level (B, H·W, 4·reg_max) and (B, H·W, nc) maps → (B, 4 + nc, A). Every step reads contiguous rows:
        DFL's softmax per level (no 2 MB concat of the raw maps), dist2bbox on (B, A, 4), one transpose at the end.
        2.1 → 0.7 ms at 640 against the channel-major decode of the same maps; the same values."""
        from ultralytics.utils.tal import dist2bbox

        self.anchors(feats, boxes[0])
        anchors, strides = self._anchors_by_row
        proj = self._proj(boxes[0])
        dist = torch.cat([b.view(b.shape[0], -1, 4, self.reg_max).softmax(-1) @ proj for b in boxes], 1)
        dbox = dist2bbox(dist, anchors.unsqueeze(0), xywh=self.xywh, dim=-1) * strides
        return torch.cat((dbox, torch.cat(scores, 1).sigmoid()), -1).transpose(1, 2).contiguous()

    def forward(self, boxes, scores, feats):
        raw = {"boxes": boxes, "scores": scores, "feats": feats}
        if self.training:
            return raw
        if self.bins_last:
            y = self._decode_bins_last(boxes, scores, feats)
        else:
            from ultralytics.utils.tal import dist2bbox

            anchors, strides = self.anchors(feats, boxes)
            dbox = dist2bbox(self._dfl(boxes), anchors.unsqueeze(0), xywh=self.xywh, dim=1) * strides
            y = torch.cat((dbox, scores.sigmoid()), 1)
        return y if self.export else (y, raw)


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
        self.call_site: dict[fx.Node, tuple[str, nn.Module]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, DetectDecode) or type(m).__name__ == "DFL":
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
            self.call_site[proxy.node] = (site, m)
            return proxy
        if tname in TRACEABLE_FORWARDS:
            fn = TRACEABLE_FORWARDS[tname]
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


def _split_shared_modules(gm: fx.GraphModule, call_site: dict) -> None:
    """Give each call of a parameter-free module (the shared SiLU, SPPF's MaxPool) its own module instance."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node not in call_site:
            continue
        site, module = call_site[node]
        has_state = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if has_state and site == node.target:
            used.add(site)
            continue
        if has_state:  # shared module with parameters: keep it shared (tied weights), record the call site only
            node.meta[META_KEY].module_path = site
            continue
        new, k = site, 0
        while new in used:
            k += 1
            new = f"{site}_{k}"
        used.add(new)
        if new != node.target:
            gm.add_submodule(new, copy.deepcopy(module))
            node.target = new
            node._rename(new.replace(".", "_"))
        node.meta[META_KEY].module_path = new
    gm.delete_all_unused_submodules()


def _install_decode(model: nn.Module) -> None:
    head = model.model[-1]
    if type(head).__name__ == "Detect" and not hasattr(head, "decode"):
        head.decode = DetectDecode(head)


def trace(model, mode: str = "eval", leaf_modules: Iterable = (), *, nc: int | None = None) -> fx.GraphModule:
    """Trace an Ultralytics detection model into a ``torch.fx.GraphModule``.

    Args:
        model: a ``DetectionModel``, a ``YOLO`` object, a model YAML name (``yolov8n.yaml``) or a ``.pt`` path.
            The model is copied: tracing never changes the user's model or Ultralytics' classes.
        mode: ``"train"`` or ``"eval"``: the mode the returned graph starts in. Like Ultralytics' Detect, the graph
            returns the raw head dict in training mode and ``(decoded, raw)`` in eval mode; ``.train()``/``.eval()``
            switch it.
        leaf_modules: module types, type names or module-path globs kept as single opaque nodes.
        nc: number of classes when building from a YAML name.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode={mode!r}: valid choices are 'train' and 'eval'")
    det = copy.deepcopy(load_model(model, nc=nc)).float()
    _install_decode(det)
    root = YoloRoot(det)
    tracer = YoloTracer(leaf_modules)
    root.train(mode == "train")
    graph = tracer.trace(root)
    gm = fx.GraphModule(root, graph, class_name="YoloGraph")
    _split_shared_modules(gm, tracer.call_site)
    for node in gm.graph.nodes:
        node.meta.setdefault(META_KEY, NodeInfo())
    gm.graph.lint()
    gm.recompile()
    gm.train(mode == "train")
    head = det.model[-1]
    gm.meta = {
        "names": dict(getattr(det, "names", {}) or {i: str(i) for i in range(head.nc)}),
        "nc": head.nc,
        "reg_max": head.reg_max,
        "stride": det.stride.detach().clone(),
        "yaml": copy.deepcopy(getattr(det, "yaml", {})),
    }
    return gm

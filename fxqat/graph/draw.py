"""``fxqat.draw``: the traced graph as a picture (.svg, .png, .dot) or the interactive explorer page (.html).

yolov8n has hundreds of nodes, so by default each Ultralytics layer is one box showing its in/out shapes;
``expand=`` opens chosen layers (indices or module paths) or ``"all"``. Nodes are colored by op kind, by assigned
precision (``color_by="precision"``) or by a sensitivity report (``color_by="sensitivity"``).
"""

from __future__ import annotations

import html
from pathlib import Path

from torch import fx, nn

from ..errors import FxqatError
from .meta import info
from .registry import op_kind
from .summary import _fmt_shape, _target_name, example_input, precision_label, propagate_shapes

OP_COLORS = {  # op kind → fill color
    "conv": "#8fb8de", "bn": "#c6dbef", "act": "#b5e3b5", "concat": "#f6c28b", "add": "#f4a3a3",
    "pool": "#d4b9e8", "resize": "#e8d98f", "split": "#f2e6c9", "decode": "#d9d9d9", "quant": "#ffe066",
    "mean": "#c7e9c0", "identity": "#f7f7f7", "io": "#ffffff", "other": "#eeeeee", "layer": "#dde7f3",
}
PRECISION_COLORS = {"float": "#d9d9d9", "int8": "#6baed6", "int4": "#fd8d3c", "int16": "#74c476",
                    "other bits": "#9e9ac8", "mixed": "#c994c7"}


_ACTS = (nn.SiLU, nn.ReLU, nn.Sigmoid, nn.Hardswish, nn.LeakyReLU)


def draw_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    """The node's colour class: its registered op kind (``graph/registry.py``), with BatchNorm and activations of
    unfused (traced) graphs told apart."""
    kind = op_kind(gm, node)
    if kind == "cat":
        return "concat"
    if kind == "other" and node.op == "call_module":
        m = gm.get_submodule(node.target)
        return "bn" if isinstance(m, nn.BatchNorm2d) else "act" if isinstance(m, _ACTS) else "other"
    return kind


def _bits_class(bits: int) -> str:
    return f"int{bits}" if f"int{bits}" in PRECISION_COLORS else "other bits"


def node_precision(node: fx.Node, gm: fx.GraphModule) -> str:
    """The precision class of one node: its weights' bits (convs), else its output's; a shared op (concat, pool,
    resize, split) has its sharing class's grid — and is float when it lies on no quantizer grid (Detect's concats)."""
    q = info(node).qspec
    if q is None:
        return "float"
    if hasattr(q, "bits"):  # a quantizer node: its QuantSpec
        return _bits_class(q.bits)
    if q.shared:  # on its inputs' grid: the class spec the annotation recorded
        return _bits_class(q.output.bits) if q.output is not None else "float"
    spec = q.weight or q.output
    return _bits_class(spec.bits) if spec is not None else "float"


def _sens_color(v: float, vmax: float) -> str:
    import matplotlib

    rgba = matplotlib.colormaps["YlOrRd"](0.1 + 0.85 * (v / vmax if vmax > 0 else 0.0))
    return matplotlib.colors.to_hex(rgba)


def _open_layers(expand, gm: fx.GraphModule) -> set:
    layers = {info(n).layer for n in gm.graph.nodes if info(n).layer is not None}
    if expand is None or expand is False:
        return set()
    if expand is True or expand == "all":
        return layers
    out = set()
    for e in ([expand] if isinstance(expand, (int, str)) else expand):
        if isinstance(e, int) or (isinstance(e, str) and e.isdigit()):
            out.add(int(e))
        else:
            hits = {info(n).layer for n in gm.graph.nodes if info(n).module_path.startswith(str(e))}
            if not hits - {None}:
                raise FxqatError(f"expand={e!r}: matches no layer; give layer indices, module paths or 'all'")
            out |= hits - {None}
    return out


def to_dot(gm: fx.GraphModule, expand=None, color_by: str = "op", sensitivity: dict | None = None,
           imgsz=320, title: str = ""):
    """Build a ``graphviz.Digraph`` of ``gm`` (see module doc)."""
    import graphviz

    if color_by not in ("op", "precision", "sensitivity"):
        raise FxqatError(f"color_by={color_by!r}: valid choices are 'op', 'precision', 'sensitivity'")
    if color_by == "sensitivity" and not sensitivity:
        raise FxqatError("color_by='sensitivity' needs sensitivity= (a report from fxqat.analyze or a dict)")
    sens = _sensitivity_scores(sensitivity) if sensitivity else {}
    smax = max(sens.values(), default=0.0)
    if "tensor_meta" not in next(iter(gm.graph.nodes)).meta:
        propagate_shapes(gm, example_input(imgsz))
    opened = _open_layers(expand, gm)
    dot = graphviz.Digraph("fxqat", graph_attr={"rankdir": "TB", "fontname": "Helvetica", "label": title,
                                                 "labelloc": "t", "fontsize": "16"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica",
                                      "fontsize": "10"})

    def group(n: fx.Node) -> str:
        i = info(n)
        return n.name if i.layer is None or i.layer in opened else f"layer{i.layer}"

    members: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        members.setdefault(group(n), []).append(n)

    def fill(nodes: list[fx.Node]) -> str:
        if color_by == "precision":
            classes = {node_precision(n, gm) for n in nodes if n.op == "call_module" or precision_label(n)} or {"float"}
            return PRECISION_COLORS["mixed" if len(classes) > 1 else classes.pop()]
        if color_by == "sensitivity":
            v = max((sens.get(n.name, sens.get(info(n).module_path, 0.0)) for n in nodes), default=0.0)
            return _sens_color(v, smax)
        return OP_COLORS["layer"] if len(nodes) > 1 else OP_COLORS[draw_kind(nodes[0], gm)]

    clusters: dict[int, object] = {}
    for gid, nodes in members.items():
        first = nodes[0]
        i = info(first)
        if gid.startswith("layer"):
            ins = [_fmt_shape(p.meta.get("tensor_meta")) for n in nodes for p in n.all_input_nodes
                   if group(p) != gid]
            outs = [_fmt_shape(n.meta.get("tensor_meta")) for n in nodes
                    if any(group(u) != gid for u in n.users)]
            label = f"{i.layer}: {i.layer_type}\n{' '.join(dict.fromkeys(ins)) or '-'}\n→ {' '.join(dict.fromkeys(outs))}"
            tip = f"model.{i.layer} ({i.layer_type}), {len(nodes)} nodes"
            dot.node(gid, label, fillcolor=fill(nodes), tooltip=tip)
            continue
        n = first
        label = f"{n.name}\n{_target_name(n) if n.op != 'call_module' else type(gm.get_submodule(n.target)).__name__}"
        shape = _fmt_shape(n.meta.get("tensor_meta"))
        prec = precision_label(n)
        label += (f"\n{shape}" if shape else "") + (f"\n[{prec}]" if prec else "")
        tip = f"{i.module_path or n.name} · {n.op} · {i.block or '-'}"
        attrs = {"fillcolor": fill([n]), "tooltip": tip}
        if n.op in ("placeholder", "output"):
            attrs["shape"] = "ellipse"
        if i.layer is None:
            dot.node(n.name, label, **attrs)
        else:
            if i.layer not in clusters:
                clusters[i.layer] = graphviz.Digraph(f"cluster_{i.layer}", graph_attr={
                    "label": f"{i.layer}: {i.layer_type}", "style": "rounded", "color": "#7f7f7f"})
            clusters[i.layer].node(n.name, label, **attrs)
    for sub in clusters.values():
        dot.subgraph(sub)
    seen = set()
    for n in gm.graph.nodes:
        for p in n.all_input_nodes:
            e = (group(p), group(n))
            if e[0] != e[1] and e not in seen:
                seen.add(e)
                dot.edge(*e)
    _legend(dot, color_by, smax)
    return dot


def _legend(dot, color_by: str, smax: float) -> None:
    items = {"op": {k: v for k, v in OP_COLORS.items() if k not in ("io", "other")},
             "precision": PRECISION_COLORS,
             "sensitivity": {f"{smax * f:.3g}": _sens_color(smax * f, smax) for f in (0.0, 0.5, 1.0)}}[color_by]
    rows = "".join(f'<TR><TD BGCOLOR="{c}">  </TD><TD ALIGN="LEFT">{html.escape(k)}</TD></TR>' for k, c in items.items())
    dot.node("legend", f'<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0"><TR><TD COLSPAN="2"><B>{color_by}</B>'
                       f'</TD></TR>{rows}</TABLE>>', shape="plaintext", style="")


def _sensitivity_scores(report) -> dict[str, float]:
    if isinstance(report, (str, Path)):
        import json

        report = json.loads(Path(report).read_text())
    if isinstance(report, dict) and "layers" in report:
        return {r["name"]: float(r["score"]) for r in report["layers"]}
    if hasattr(report, "scores"):
        return dict(report.scores())
    return {str(k): float(v) for k, v in dict(report).items()}


def draw(gm: fx.GraphModule, path, expand=None, color_by: str = "op", sensitivity=None, imgsz=320,
         title: str | None = None) -> Path:
    """Write a drawing of ``gm`` to ``path`` (.svg, .png, .dot) and return the path. A ``.html`` path gets the
    interactive explorer page of ``gm`` as it is (see :mod:`fxqat.explorer`; ``fxqat.explore`` adds histograms from
    calibration images): ``expand`` opens those layers, ``color_by`` and ``sensitivity`` set its colouring."""
    import graphviz

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png", "dot", "gv", "html"):
        raise FxqatError(f"{path}: unsupported drawing format '.{fmt}'; valid choices: .svg, .png, .dot, .html")
    if fmt == "html":  # the interactive explorer page (fxqat/explorer), without running the model
        from ..explorer import write_page

        if color_by == "sensitivity" and not sensitivity:
            raise FxqatError("color_by='sensitivity' needs sensitivity= (a report from fxqat.analyze or a dict)")
        opened = _open_layers(expand, gm)
        return write_page(gm, path, color_by=color_by, sensitivity=sensitivity, expand=[f"model.{i}" for i in opened],
                          title=title if title is not None else path.stem, imgsz=imgsz)
    dot = to_dot(gm, expand=expand, color_by=color_by, sensitivity=sensitivity, imgsz=imgsz,
                 title=title if title is not None else path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("dot", "gv"):
        path.write_text(dot.source)
        return path
    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise FxqatError(f"{path}: rendering needs Graphviz's 'dot' program (Debian: apt-get install -y graphviz); "
                         "or write a .dot file instead") from None
    path.write_bytes(data)
    return path

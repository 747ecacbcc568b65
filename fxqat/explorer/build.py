"""``fxqat.explore``: load or prepare the QAT graph, calibrate it on a few images, collect the page's data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import FxqatError
from ..quant.fake_quant import fake_quants
from .records import node_records
from .rules import ACTION_HELP, ACTIONS, yaml_parts
from .stats import BINS, node_stats

DEFAULT_IMAGES = 8


def signs_images(n: int, imgsz: int, seed: int = 0) -> torch.Tensor:
    """``n`` images from fxqat's own traffic-sign generator (its validation split), (n, 3, imgsz, imgsz) in [0, 1]."""
    import numpy as np

    from ..data.signs import SignsConfig, make_image

    cfg = SignsConfig(imgsz=imgsz)
    arr = np.stack([make_image(i, seed, "val", cfg)[0] for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def load_images_for(data, n: int, imgsz: int) -> tuple[torch.Tensor, str]:
    """(images, where they came from) for ``data``: None (fxqat's generator), a tensor, a folder or a data YAML."""
    if data is None:
        return signs_images(n, imgsz), (f"{n} images from fxqat's built-in traffic-sign generator (fxqat/data/"
                                        "signs.py): no data= given")
    if isinstance(data, torch.Tensor):
        x = data[:n].float()
        return (x / 255.0 if data.dtype == torch.uint8 else x), f"{len(x)} images given as a tensor"
    from ..data.images import image_files, load_images

    files = image_files(data, "val")[:n]
    x = load_images(files, imgsz)
    if not len(x):
        raise FxqatError(f"data={data}: none of its first {len(files)} images could be read")
    return x, f"{len(x)} images from {data}"


def load_analysis(analysis) -> dict | None:
    """``{"summary", "layers"}`` from a ``fxqat analyze`` folder, its sensitivity.json, a report or a dict."""
    if analysis is None:
        return None
    if hasattr(analysis, "to_json"):
        return analysis.to_json()
    if isinstance(analysis, dict):  # a report's JSON, or {node name: score}
        if "layers" in analysis:
            return analysis
        return {"summary": None, "layers": [{"name": str(k), "score": float(v)} for k, v in analysis.items()]}
    p = Path(analysis)
    if p.is_dir():
        p = p / "sensitivity.json"
    if not p.is_file():
        raise FxqatError(f"analysis={analysis}: no such file; give the folder `fxqat analyze` wrote (with "
                         "sensitivity.json) or the sensitivity.json itself")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise FxqatError(f"analysis={p}: not a readable sensitivity.json ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
        raise FxqatError(f"analysis={p}: not a sensitivity report (expected keys 'summary' and 'layers')")
    return d


def analysis_by_node(report: dict, names: set[str]) -> dict[str, dict]:
    """Per conv node: its row of the report plus ``rank`` (1 = most sensitive). Refuses a report of another model."""
    rows = [r for r in report["layers"] if isinstance(r, dict) and "name" in r and "score" in r]
    hits = [r for r in rows if r["name"] in names]
    if rows and not hits:
        raise FxqatError(f"analysis: none of its {len(rows)} layers ({', '.join(r['name'] for r in rows[:3])}, ...) "
                         "is a node of this model; run `fxqat analyze` on the same model")
    ranked = sorted(rows, key=lambda r: -float(r["score"]))
    out = {}
    for k, r in enumerate(ranked, 1):
        if r["name"] in names:
            out[r["name"]] = {key: r.get(key) for key in ("score", "gain", "alone_nsr", "weight_sqnr", "act_sqnr")}
            out[r["name"]]["rank"] = k
    return out


def _needs_calibration(gm: nn.Module) -> bool:
    return any(fq.spec.fixed is None and not bool(fq.initialized) for fq in fake_quants(gm)
               if not fq.always_observe)


def prepare_for(model, qconfig=None, trust: bool | None = None):
    """(QAT GraphModule, qconfig YAML text or None, a label for the page, whether its ranges come from a checkpoint)."""
    from ..passes.pipeline import prepare_qat

    text = qconfig if isinstance(qconfig, str) and "\n" in qconfig else None
    if isinstance(model, fx.GraphModule) and fake_quants(model):
        if qconfig is not None:
            raise FxqatError("qconfig= applies when fxqat prepares the model; this graph is already prepared (its "
                             "qconfig is in gm.meta['qconfig'])")
        return model, text, "a prepared GraphModule", False
    if isinstance(model, (str, Path)):
        from ..checkpoint import is_checkpoint, load_checkpoint

        if is_checkpoint(model):
            if qconfig is not None:
                raise FxqatError(f"qconfig={qconfig}: {model} is an fxqat QAT checkpoint with its own qconfig; "
                                 "give the FP32 model to explore another qconfig")
            gm, ckpt = load_checkpoint(model, with_extra=True)
            return gm, ckpt.get("qconfig"), str(model), True
        from ..models import load_model

        return prepare_qat(load_model(model, trust=trust), qconfig), text, str(model), False
    label = type(model).__name__
    if isinstance(model, fx.GraphModule):
        import copy

        model = copy.deepcopy(model)
    return prepare_qat(model, qconfig, trust=trust), text, label, False


def collect(gm: fx.GraphModule, images: torch.Tensor | None = None, images_note: str = "", analysis=None,
            qconfig_text: str | None = None, title: str = "", progress: bool = True, source_label: str | None = None,
            color_by: str = "precision", expand=(), imgsz=320) -> dict:
    """The page's data for ``gm``: node and block records, statistics from ``images``, analysis results."""
    from ..graph.summary import example_input, propagate_shapes

    qc = gm.meta.get("qconfig")
    if images is None and "tensor_meta" not in next(iter(gm.graph.nodes)).meta:
        propagate_shapes(gm, example_input(imgsz))
    stats = node_stats(gm, images, progress=progress) if images is not None else {}  # shapes come with them
    nodes, groups = node_records(gm, qc, qconfig_text)
    for r in nodes:
        st = stats.get(r["name"], {})
        if "shape" in st:
            r["shape"] = st.pop("shape")
        if st:
            r["stats"] = st
    rep = load_analysis(analysis)
    if rep is not None:
        by = analysis_by_node(rep, {r["name"] for r in nodes})
        for r in nodes:
            if r["name"] in by:
                r["analysis"] = by[r["name"]]
    data = {"title": title, "nodes": nodes, "groups": groups, "bins": BINS, "images_note": images_note,
            "analysis_summary": (rep or {}).get("summary"), "has_stats": bool(stats),
            "actions": ACTION_HELP, "action_lines": ACTIONS, "color_by": color_by, "expand": list(expand),
            "qconfig": None, "yaml": None, "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if qc is not None:
        parts = yaml_parts(qc)
        from ..qconfig.io import dump_qconfig

        data["qconfig"] = {"source": source_label or qc.source, "text": qconfig_text or dump_qconfig(qc)}
        if source_label:
            parts["source"] = source_label
        data["yaml"] = parts
    if source_label and qc is not None:  # "<string>:12" → "<label>:12" (the checkpoint's embedded qconfig)
        for r in nodes:
            rule = r.get("rule")
            if rule and rule.get("where"):
                rule["where"] = rule["where"].replace(qc.source, source_label)
                for m in rule["matched"]:
                    m["where"] = m["where"].replace(qc.source, source_label)
    return data

"""The QAT pipeline, top to bottom. ``prepare_qat`` is all of fxqat's graph preparation in one place.

    trace ─► FuseConvBnAct ─► MatchPatterns ─► AnnotateQConfig ─► InsertQuantizers ─► QAT GraphModule

Seed names: ``prepare_yolov8_for_qat`` = :func:`prepare_qat`; ``fuse_yolov8_model_modules`` = FuseConvBnAct;
``convert_yolov8_modules_to_qat`` = MatchPatterns (+ the roles' rules); ``insert_fake_quantize_nodes`` =
InsertQuantizers; ``apply_special_quantization`` = AnnotateQConfig with a qconfig from ``fxqat.analyze``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..qconfig import as_qconfig
from ..tracing import trace
from .annotate import AnnotateQConfig
from .fuse_conv_bn_act import FuseConvBnAct
from .insert_quantizers import InsertQuantizers
from .match import MatchPatterns


def qat_passes(qconfig) -> list:
    """The ordered pass list (each a torch.fx PassBase with requires → call → ensures)."""
    return [FuseConvBnAct(), MatchPatterns(), AnnotateQConfig(qconfig), InsertQuantizers(qconfig)]


def run_passes(gm: fx.GraphModule, passes) -> fx.GraphModule:
    for p in passes:
        p.requires(gm)
        gm = p(gm).graph_module
        p.ensures(gm)
    return gm


def prepare_qat(model, qconfig=None, example_inputs=None, *, nc: int | None = None,
                leaf_modules=()) -> fx.GraphModule:
    """A trainable QAT ``GraphModule`` for an Ultralytics detection model.

    Args:
        model: anything :func:`fxqat.trace` accepts, or a GraphModule fxqat traced.
        qconfig: None (defaults: INT8 per-channel symmetric weights, UINT8 per-tensor activations, Detect's last
            convs with float output), a YAML path, a dict, a ``fxqat.qconfig.QConfig`` or a torch.ao QConfigMapping.
        example_inputs: optional ``(tensor,)``; when given, one forward pass initializes every quantizer
            (like a one-batch calibration), so the model is ready for training or evaluation at once.
    """
    qc = as_qconfig(qconfig)
    gm = model if isinstance(model, fx.GraphModule) and "names" in getattr(model, "meta", {}) else \
        trace(model, "train", leaf_modules=leaf_modules, nc=nc)
    gm = run_passes(gm, qat_passes(qc))
    gm.meta["qconfig"] = qc
    gm.train()
    if example_inputs is not None:
        from ..calibrate import calibrate

        x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        calibrate(gm, [x], batches=1, progress=False)
    return gm


@torch.no_grad()
def freeze_bn(model: torch.nn.Module, frozen: bool = True) -> None:
    """Stop BatchNorm statistics updates in every fused Conv+BN of a QAT model."""
    for m in model.modules():
        if hasattr(m, "freeze_bn"):
            m.freeze_bn(frozen)

"""fxqat's pipeline in one place: four ordered lists of small named passes, each pass in its own small file.

    trace    YoloTracer ─► SplitSharedModules
    prepare  LinearAsConv ─► FuseConvBnAct ─► MatchPatterns ─► AnnotateQConfig ─► InsertQuantizers = the QAT GraphModule
    convert  LowerInt8 ─► PruneUnusedHeadBranch ─► BinsLastHead ─► CatWholeChunks ─► DenseSplitHalves ─►
             QuantizeIntoConv ─► FloatConvChannelsLast                                   = the INT8 GraphModule
    export   FoldConvsForExport ─► DecodeForExport ─► RequantizeSharedOps (not for OpenVINO) ─► (torch.onnx) ─►
             FoldWeightQuantizers ─► ScalarQParams (─► Uint8Weights) ─► ultralytics metadata = the QDQ ONNX file

``AnnotateQConfig`` decides every node's quantization (``node.meta["fxqat"].qspec``: weight spec, output spec, the
grid it shares); every later pass reads that record. Each pass is a torch.fx ``PassBase``: requires → call →
ensures run once; a failing pass is named; only a pass that changed the graph recompiles it.

Seed names: ``prepare_yolov8_for_qat`` = :func:`prepare_qat`; ``fuse_yolov8_model_modules`` = FuseConvBnAct;
``convert_yolov8_modules_to_qat`` = MatchPatterns (+ the roles' rules); ``insert_fake_quantize_nodes`` =
InsertQuantizers; ``apply_special_quantization`` = AnnotateQConfig with a qconfig from ``fxqat.analyze``;
``convert_yolov8_to_quantized`` = the convert list.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..qconfig import as_qconfig
from .annotate import AnnotateQConfig
from .base import FxqatPass, run_passes
from .fuse_conv_bn_act import FuseConvBnAct
from .insert_quantizers import InsertQuantizers
from .linear_as_conv import LinearAsConv
from .match import MatchPatterns
from .split_shared_modules import SplitSharedModules


def trace_passes() -> list[FxqatPass]:
    return [SplitSharedModules()]


def prepare_passes(qconfig) -> list[FxqatPass]:
    return [LinearAsConv(), FuseConvBnAct(), MatchPatterns(), AnnotateQConfig(qconfig), InsertQuantizers()]


def convert_passes() -> list[FxqatPass]:
    from .float_conv_layout import FloatConvChannelsLast
    from .int8_layout import BinsLastHead, CatWholeChunks, DenseSplitHalves, QuantizeIntoConv
    from .lower_int8 import LowerInt8
    from .prune_head_branch import PruneUnusedHeadBranch

    return [LowerInt8(), PruneUnusedHeadBranch(), BinsLastHead(), CatWholeChunks(), DenseSplitHalves(),
            QuantizeIntoConv(), FloatConvChannelsLast()]


def export_passes(requantize_shared: bool = True) -> list[FxqatPass]:
    """``requantize_shared=False`` leaves out RequantizeSharedOps (the OpenVINO form: see ``fxqat.export_onnx``)."""
    from .export_qdq import DecodeForExport, FixLearnedScales, FoldConvsForExport, RequantizeSharedOps

    # FixLearnedScales after FoldConvsForExport: folding reads each weight's grid through FakeQuant.observe, which
    # keeps a learned scale but would re-observe a fixed one
    passes = [FoldConvsForExport(), FixLearnedScales(), DecodeForExport()]
    return passes + ([RequantizeSharedOps()] if requantize_shared else [])


def onnx_passes(weights: str = "int8") -> list:
    """Rewrites of the exported ``onnx.ModelProto``, in order (functions ``model -> None``)."""
    from ..export import fold_weight_quantizers, scalar_qparams, uint8_weights

    return [fold_weight_quantizers, scalar_qparams] + ([uint8_weights] if weights == "uint8" else [])


def prepare_qat(model, qconfig=None, example_inputs=None, *, nc: int | None = None,
                leaf_modules=(), trust: bool | None = None) -> fx.GraphModule:
    """A trainable QAT ``GraphModule`` for an Ultralytics detection model.

    Args:
        model: anything :func:`fxqat.trace` accepts, or a GraphModule fxqat traced.
        qconfig: None (defaults: INT8 per-channel symmetric weights, UINT8 per-tensor activations, Detect's last
            convs with float output), a YAML path or preset name, a dict, a ``fxqat.qconfig.QConfig`` or a torch.ao
            QConfigMapping.
        example_inputs: optional ``(tensor,)``; when given, one forward pass initializes every quantizer
            (like a one-batch calibration), so the model is ready for training or evaluation at once.
        nc, leaf_modules, trust: as for :func:`fxqat.trace`; ``nc`` and ``leaf_modules`` are recorded in
            ``gm.meta["prepare_args"]`` (and so in checkpoints, which rebuild the graph with them).
    """
    from ..tracing import trace

    qc = as_qconfig(qconfig)
    traced = isinstance(model, fx.GraphModule) and "names" in getattr(model, "meta", {})
    gm = model if traced else trace(model, "train", leaf_modules=leaf_modules, nc=nc, trust=trust)
    gm = run_passes(gm, prepare_passes(qc), "prepare")
    gm.meta["qconfig"] = qc
    gm.meta["prepare_args"] = {"leaf_modules": list(leaf_modules) or list(gm.meta.get("leaf_modules", [])),
                               "nc": nc if nc is not None else gm.meta["nc"]}
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

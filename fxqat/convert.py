"""``fxqat.convert``: QAT GraphModule → INT8 PyTorch GraphModule on oneDNN's quantized CPU kernels.

The convert pass list (``fxqat/passes/pipeline.py``): ``LowerInt8`` emits an INT8 module per annotated node (one
rule per op kind: fused Conv+BN+SiLU → ``onednn::qconv2d_pointwise`` with the swish post-op, uint8 in and out;
Concat / Upsample / chunk on uint8; max pool on the codes; residual adds requantized; DFL / decode float), then the
layout passes (``passes/int8_layout.py``) decide which tensors are copied and where.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from .errors import ConvertError
from .modules.int8_chain import Int8GraphModule
from .passes.base import run_passes
from .passes.pipeline import convert_passes
from .quant.fake_quant import FakeQuant

BACKENDS = ("onednn", "x86")


def check_initialized(model: torch.nn.Module, action: str) -> None:
    """Refuse to deploy a QAT model whose activation quantizers never saw data (their scale would be 1.0)."""
    weights = {id(m.weight_fq) for m in model.modules() if getattr(m, "weight_fq", None) is not None}
    missing = [name for name, m in model.named_modules()
               if isinstance(m, FakeQuant) and id(m) not in weights and not bool(m.initialized)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConvertError(f"cannot {action}: {len(missing)} quantizer(s) were never initialized ({shown}); "
                           "calibrate first: fxqat.calibrate(model, 'data.yaml') or "
                           "fxqat.prepare_qat(model, example_inputs=(images,)), or train with fxqat qat")


def convert(qat_model: fx.GraphModule, backend: str = "onednn") -> fx.GraphModule:
    """INT8 model computing what the QAT model computes in eval mode: the decoded predictions
    (B, 4 + nc, anchors), as Ultralytics returns them in export mode.

    ``backend``: "onednn" (default) or "x86" — both run oneDNN's fused INT8 convolutions here; "x86" also sets
    ``torch.backends.quantized.engine`` to x86 for any remaining torch.ao quantized op.
    """
    if backend not in BACKENDS:
        raise ConvertError(f"backend={backend!r}: valid choices are {', '.join(BACKENDS)}")
    check_initialized(qat_model, "convert to INT8")
    if backend in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = backend
    src = copy.deepcopy(qat_model).cpu().eval()
    out = run_passes(src, convert_passes(), "convert")
    out = Int8GraphModule(out, out.graph, class_name=type(out).__name__)  # runs stretches as native chains
    keep = ("names", "nc", "stride", "yaml", "task", "kpt_shape", "end2end")
    out.meta = {k: v for k, v in getattr(qat_model, "meta", {}).items() if k in keep}
    out.eval()
    return out

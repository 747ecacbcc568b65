"""The ``fxqat`` command. Subcommands take Ultralytics-style ``key=value`` arguments, or ``--key value``.

    fxqat trace yolov8n.yaml imgsz=320 draw=graph.svg
    fxqat trace yolov8n.yaml --mode train --expand all --draw graph.html
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ.setdefault("YOLO_OFFLINE", "1")


@dataclass
class Arg:
    type: Callable = str
    default: object = None
    help: str = ""
    check: Callable | None = None  # value -> error text, or None when valid


@dataclass
class Command:
    func: Callable
    help: str
    positionals: tuple[str, ...] = ()
    args: dict[str, Arg] = field(default_factory=dict)
    given_only: bool = False  # arguments not on the command line reach func as None (func applies the defaults)
    positionals_optional_with: str | None = None  # an argument that makes the positionals optional


class UsageError(Exception):
    pass


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{v!r} is not a boolean (true/false)")


def parse_args(argv: list[str], cmd: Command, name: str) -> dict:
    """``key=value`` and ``--key value`` / ``--flag`` tokens → validated dict (unknown keys list the valid ones)."""
    raw: dict[str, object] = {}
    pos: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            key = tok[2:].replace("-", "_")
            if "=" in key:
                key, val = key.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and cmd.args.get(key, Arg()).type is not _bool:
                val, i = argv[i + 1], i + 1
            else:
                val = True
            raw[key] = val
        elif "=" in tok and not tok.startswith("="):
            key, val = tok.split("=", 1)
            raw[key.replace("-", "_")] = val
        else:
            pos.append(tok)
        i += 1
    valid = list(cmd.positionals) + list(cmd.args)
    for key in raw:
        if key not in valid:
            raise UsageError(f"fxqat {name}: unknown argument '{key}'; valid: {', '.join(valid)}")
    out: dict[str, object] = {}
    if len(pos) > len(cmd.positionals):
        raise UsageError(f"fxqat {name}: unexpected argument '{pos[len(cmd.positionals)]}'")
    for key, val in zip(cmd.positionals, pos):
        out[key] = val
    for key in cmd.positionals:
        if key in raw:
            out[key] = raw[key]
    for key, spec in cmd.args.items():
        val = raw.get(key, None if cmd.given_only else spec.default)
        if val is True and key in raw and spec.type is str:
            raise UsageError(f"fxqat {name}: --{key} needs a value ({key}=VALUE)")
        if isinstance(val, (str, bool)) and key in raw and spec.type is not str:
            try:
                val = spec.type(val)
            except (TypeError, ValueError) as e:
                raise UsageError(f"fxqat {name}: {key}={raw.get(key)!r} is not valid ({e})") from None
        if key in raw and spec.check is not None and (problem := spec.check(val)):
            raise UsageError(f"fxqat {name}: {key}={raw.get(key)}: {problem}")
        out[key] = val
    for key in cmd.positionals:
        if key not in out and cmd.positionals_optional_with and out.get(cmd.positionals_optional_with):
            out[key] = None
        if key not in out:
            usage_line = f"fxqat {name} {' '.join(p.upper() for p in cmd.positionals)} [key=value ...]"
            raise UsageError(f"fxqat {name}: missing {key.upper()}; usage: {usage_line}")
    if name in NEEDS_DATA and not out.get("data") and not any(out.get(k) for k in NEEDS_DATA[name]):
        raise UsageError(f"fxqat {name}: missing data=DATA.yaml (an Ultralytics data YAML; make one with: "
                         "fxqat data signs OUT)")
    return out


def _imgsz(v):
    if isinstance(v, (int, tuple)):
        return v
    parts = [int(p) for p in str(v).replace("x", ",").split(",") if p]
    if len(parts) not in (1, 2):
        raise ValueError("give N or H,W")
    return parts[0] if len(parts) == 1 else tuple(parts)


STRIDE = 32  # the largest stride of every supported YOLO detector: input sizes must be multiples of it


def _stride_multiple(v):
    sizes = v if isinstance(v, tuple) else (v,)
    if any(s < STRIDE or s % STRIDE for s in sizes):
        return f"must be a positive multiple of {STRIDE} (the model's largest stride), e.g. 320 or 640"
    return None


def _at_least(n: int):
    return lambda v: None if v >= n else f"must be at least {n}"


def _one_of(*choices):
    return lambda v: None if v in choices else f"valid choices: {', '.join(choices)}"


def _shipped(v):
    from .zoo import SHIPPED

    return None if v in SHIPPED else f"valid choices (shipped models): {', '.join(SHIPPED)}"


def _budget(v):
    from .analysis.budget import parse_budget
    from .errors import FxqatError

    try:
        parse_budget(v)
    except FxqatError as e:
        return str(e).split(": ", 1)[-1]  # the CLI names the argument itself
    return None


def _export_format(v):
    if v == "torchscript":
        from .deploy import TORCHSCRIPT_UNSUPPORTED

        return TORCHSCRIPT_UNSUPPORTED.removeprefix("format=torchscript ")
    return _one_of("onnx", "openvino")(v)


REPORTS = ("false", "qdq", "true", "openvino", "onnxruntime")


def _report(v) -> str:
    """export's report=: false | qdq (the Q/DQ structure) | true (+ a placement diagnosis on the format's runtime) |
    openvino | onnxruntime (+ the diagnosis on that runtime)."""
    s = str(v).lower()
    if s in ("1", "true", "yes", "on"):
        return "true"
    if s in ("0", "false", "no", "off"):
        return "false"
    if s in REPORTS:
        return s
    raise ValueError(f"valid choices: {', '.join(REPORTS)}")


def _fraction(v):
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _positive_float(v):
    return None if v > 0 and v != float("inf") else "must be a positive finite number"


def _dampen(v, name="dampen"):
    from .errors import FxqatError
    from .quant.oscillation import check_dampen, check_freeze

    try:
        (check_dampen if name == "dampen" else check_freeze)(v)
    except FxqatError as e:
        return str(e).split(": ", 1)[-1]  # the CLI names the argument itself
    return None


# ------------------------------------------------------------------------------------------------------ commands
def _lazy(name: str) -> Callable:
    def run(**kw):
        from . import commands

        return getattr(commands, name)(**kw)

    return run


_TRUST = Arg(_bool, None, "unpickle a .pt that needs classes beyond fxqat's allow-list: only files you trust "
                          "(default: FXQAT_TRUST_PICKLE)")
_TRAIN_COMMON = {
    "data": Arg(str, None, "Ultralytics data YAML (make one: fxqat data signs OUT)"),
    "epochs": Arg(int, 3, "epochs", _at_least(1)),
    "imgsz": Arg(int, 320, "training image size", _stride_multiple),
    "batch": Arg(int, 16, "batch size", _at_least(1)),
    "project": Arg(str, "runs/fxqat", "run folder root"),
    "workers": Arg(int, 2, "dataloader workers", _at_least(0)),
    "trust": _TRUST,
}

COMMANDS: dict[str, Command] = {
    "demo": Command(_lazy("cmd_demo"), "the main job: data → FP32 → PTQ → QAT → INT8 → ONNX → one comparison table",
                    (), {"quick": Arg(_bool, False, "a tiny run to check the set-up (about a minute on 2 cores)"),
                         "project": Arg(str, "runs/demo", "report folder"),
                         "seed": Arg(int, 0, "data seed"),
                         "task": Arg(str, None, "the shipped model's task: detect | segment | pose | obb | classify "
                                     "(default: detect, or the task of model=)",
                                     _one_of("detect", "segment", "pose", "obb", "classify")),
                         "model": Arg(str, None, "another shipped model (default: the task's yolov8n), e.g. "
                                      "fxqat-signs-yolo26n", _shipped)}),
    "data": Command(_lazy("cmd_data"), "generate the synthetic traffic-sign dataset (YOLO format)", ("kind", "out"), {
        "train": Arg(int, 800, "training images", _at_least(1)), "val": Arg(int, 200, "validation images", _at_least(1)),
        "imgsz": Arg(int, 320, "image size (a multiple of 32, at least 64)", _at_least(64)),
        "seed": Arg(int, 0, "seed (deterministic)"),
        "min_size": Arg(float, 0.05, "smallest sign, as a fraction of the image side"),
        "max_size": Arg(float, 0.45, "largest sign, as a fraction of the image side"),
        "task": Arg(str, "detect", "labels for: detect | segment | pose | obb | classify (crops in class folders)",
                    _one_of("detect", "segment", "pose", "obb", "classify"))}),
    "trace": Command(_lazy("cmd_trace"), "trace a YOLO model into an FX graph and print its summary", ("model",), {
        "mode": Arg(str, "eval", "train | eval", _one_of("train", "eval")),
        "imgsz": Arg(_imgsz, 320, "input size for shapes, N or H,W", _stride_multiple),
        "draw": Arg(str, None, "write a drawing: .svg .png .dot .html"),
        "expand": Arg(str, None, "layers to open in the drawing: 'all' or comma-separated indices/paths"),
        "leaf": Arg(str, None, "comma-separated module types or path globs to keep as leaves"),
        "nc": Arg(int, None, "number of classes when building from YAML", _at_least(1)),
        "out": Arg(str, None, "also write the summary table to this file"),
        "trust": _TRUST,
    }),
    "train": Command(_lazy("cmd_train"), "train an FP32 model with Ultralytics (the QAT starting point)", ("model",),
                     {**_TRAIN_COMMON, "epochs": Arg(int, 30, "epochs", _at_least(1)),
                      "name": Arg(str, "fp32", "run name"),
                      "mosaic": Arg(float, None, "mosaic augmentation probability, 0 to 1 (default: Ultralytics' 1.0; "
                                    "0 trains on whole images at their own scale)", _fraction),
                      "pretrained": Arg(str, None, "start from this model's weights wherever layer names and shapes "
                                        "match: a shipped name or .pt (e.g. fxqat-signs-yolov8n for "
                                        "yolov8n-seg.yaml)")}),
    "qat": Command(_lazy("cmd_qat"), "quantization-aware fine-tuning through the Ultralytics trainer", ("model",), {
        **_TRAIN_COMMON, "name": Arg(str, "qat", "run name"),
        "qconfig": Arg(str, None, "qconfig YAML path or preset name (default, head_float, mixed_w4, onnxruntime, "
                       "openvino_avx2, tensorrt, w4a8)"),
        "freeze_bn": Arg(int, None, "epoch from which BN statistics are frozen (default: half)", _at_least(0)),
        "freeze_observers": Arg(int, None, "epoch from which quantizer ranges are frozen (default: last)",
                                _at_least(0)),
        "lr0": Arg(float, None, "initial learning rate (default 1e-4)", _positive_float),
        "resume": Arg(str, None, "an fxqat last.pt to resume from (restores every training argument)"),
        "device": Arg(str, None, "cpu | 0 | 0,1,... (several GPUs: DDP, one process each; default: GPU 0 or cpu)"),
        "nproc": Arg(int, None, "with device=cpu: DDP on this many CPU processes (gloo)", _at_least(1)),
        "ptq_epoch0": Arg(_bool, None, "validate the PTQ start as epoch 0; it stays best.pt unless QAT beats it "
                          "(default true)"),
        "dampen": Arg(float, None, "oscillation dampening weight for low-bit weights (Nagel et al. 2022), 0 (off, "
                      "default) to 10, e.g. 0.001", _dampen),
        "freeze_osc": Arg(float, None, "iterative weight freezing: freeze a weight's integer code once its oscillation "
                          "frequency exceeds this, between 0 and 1 (default: off), e.g. 0.02",
                          lambda v: _dampen(v, "freeze_osc")),
    }, given_only=True, positionals_optional_with="resume"),
    "eval": Command(_lazy("cmd_eval"), "mAP of a model in all its forms (fake-quant, INT8 torch, QDQ ONNX)", ("model",), {
        "data": Arg(str, None, "Ultralytics data YAML"),
        "imgsz": Arg(int, None, "image size (default: a QAT checkpoint's own run's, else 320)", _stride_multiple),
        "batch": Arg(int, None, "batch size (default: a QAT checkpoint's own run's, else 16)", _at_least(1)),
        "fp32": Arg(str, None, "FP32 .pt to include as a baseline row"),
        "onnx": Arg(_bool, True, "also export and evaluate the QDQ ONNX model"),
        "interval": Arg(int, 0, "resamples of a paired bootstrap over the validation images: each form's main-metric "
                        "difference to the fp32= row with its 95 % interval (0: off, e.g. 1000; detect, segment, "
                        "pose, OBB)", _at_least(0)),
        "out": Arg(str, None, "write results as JSON"), "trust": _TRUST}),
    "export": Command(_lazy("cmd_export"), "export an fxqat QAT checkpoint for Ultralytics: QDQ ONNX or an INT8 "
                      "OpenVINO folder", ("model",), {
        "format": Arg(str, "onnx", "onnx | openvino", _export_format),
        "imgsz": Arg(int, 640, "input size", _stride_multiple),
        "dynamic": Arg(_bool, False, "dynamic batch and image size"),
        "report": Arg(_report, "qdq", "qdq: the Q/DQ structure report; true: also run the model on the format's "
                      "runtime and list float layers, unfolded Q/DQ and their time share (openvino | onnxruntime: on "
                      "that runtime); false: none"),
        "weights": Arg(str, "int8", "int8 (TensorRT's form) | uint8 (+128, zero point 128: exact in ONNX Runtime on "
                       "CPUs without VNNI)", _one_of("int8", "uint8")),
        "out": Arg(str, None, "output .onnx file, or *_openvino_model folder"),
        "overflow_fix": Arg(str, "auto", "7-bit weight grid (scale x 2) against int16 saturation of int8 kernels on "
                            "CPUs without VNNI (NNCF's overflow fix): auto (format=openvino on a host without VNNI: "
                            "enable; else disable) | enable | first_layer | disable",
                            _one_of("auto", "enable", "first_layer", "disable"))}),
    "analyze": Command(_lazy("cmd_analyze"), "critical-layer analysis: per-layer sensitivity and a qconfig", ("model",), {
        "data": Arg(str, None, "data YAML or image folder (calibration images)"),
        "out": Arg(str, "runs/analyze", "report folder"), "imgsz": Arg(int, 320, "image size", _stride_multiple),
        "images": Arg(int, 32, "calibration images", _at_least(1)),
        "topk": Arg(int, 3, "layers to raise in the generated qconfig", _at_least(1)),
        "metric": Arg(str, "sqnr", "sqnr | map", _one_of("sqnr", "map")),
        "qconfig": Arg(str, None, "base qconfig YAML"), "trust": _TRUST,
        "budget": Arg(str, None, "size:2.5MB | size:800KB | size:BYTES | latency:30ms | latency:85%: 4/8/16-bit weights "
                      "per layer within that model size, or batch-1 latency at imgsz on this machine's INT8 kernels "
                      "(a percentage: of the all-8-bit model's) (writes "
                      "budget_qconfig.yaml, budget.json, frontier.png)", _budget)}),
    "bench": Command(_lazy("cmd_bench"), "latency of a model's forms measured in one run", ("model",), {
        "imgsz": Arg(int, 640, "input size", _stride_multiple), "threads": Arg(int, 2, "torch / ORT threads", _at_least(1)),
        "rounds": Arg(int, 3, "interleaved rounds", _at_least(1)), "trust": _TRUST}),
    "explore": Command(_lazy("cmd_explore"), "interactive quantization explorer: one self-contained HTML page",
                       ("model",), {
        "data": Arg(str, None, "data YAML or image folder (default: images from fxqat's sign generator)"),
        "out": Arg(str, "explore.html", "the page to write"),
        "imgsz": Arg(int, 320, "image size", _stride_multiple),
        "images": Arg(int, 8, "calibration / histogram images", _at_least(1)),
        "analysis": Arg(str, None, "a `fxqat analyze` folder or its sensitivity.json (SQNR, sensitivity rank)"),
        "qconfig": Arg(str, None, "qconfig YAML path or preset name (not with a QAT checkpoint)"),
        "color_by": Arg(str, "precision", "initial colouring", _one_of("precision", "sensitivity", "sqnr", "op")),
        "trust": _TRUST}),
}
# commands that need data=, unless one of the listed arguments supplies it
NEEDS_DATA = {"train": (), "qat": ("resume",), "eval": (), "analyze": ()}


def usage() -> str:
    lines = ["usage: fxqat COMMAND [ARGS] [key=value ...]   (or --key value)", "", "commands:"]
    for name, c in COMMANDS.items():
        pos = " ".join(p.upper() for p in c.positionals)
        lines.append(f"  {name} {pos}".rstrip() + f"  — {c.help}")
        for key, a in c.args.items():
            lines.append(f"      {key + '=' + str(a.default):<26} {a.help}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(usage())
        except BrokenPipeError:  # e.g. piped into head
            pass
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fxqat: unknown command '{name}'; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from .errors import FxqatError

    cmd = COMMANDS[name]
    if any(t in ("-h", "--help") for t in rest):
        print(usage())
        return 0
    try:
        kwargs = parse_args(rest, cmd, name)
        cmd.func(**kwargs)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except FxqatError as e:
        print(f"fxqat {name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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


@dataclass
class Command:
    func: Callable
    help: str
    positionals: tuple[str, ...] = ()
    args: dict[str, Arg] = field(default_factory=dict)


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
        val = raw.get(key, spec.default)
        if isinstance(val, (str, bool)) and key in raw and spec.type is not str:
            try:
                val = spec.type(val)
            except (TypeError, ValueError) as e:
                raise UsageError(f"fxqat {name}: {key}={raw.get(key)!r} is not valid ({e})") from None
        out[key] = val
    for key in cmd.positionals:
        if key not in out:
            usage_line = f"fxqat {name} {' '.join(p.upper() for p in cmd.positionals)} [key=value ...]"
            raise UsageError(f"fxqat {name}: missing {key.upper()}; usage: {usage_line}")
    return out


def _imgsz(v):
    if isinstance(v, (int, tuple)):
        return v
    parts = [int(p) for p in str(v).replace("x", ",").split(",") if p]
    return parts[0] if len(parts) == 1 else tuple(parts)


# ------------------------------------------------------------------------------------------------------ commands
def _lazy(name: str) -> Callable:
    def run(**kw):
        from . import commands

        return getattr(commands, name)(**kw)

    return run


_TRAIN_COMMON = {
    "data": Arg(str, None, "Ultralytics data YAML (make one: fxqat data signs OUT)"),
    "epochs": Arg(int, 3, "epochs"),
    "imgsz": Arg(int, 320, "training image size"),
    "batch": Arg(int, 16, "batch size"),
    "project": Arg(str, "runs/fxqat", "run folder root"),
    "workers": Arg(int, 2, "dataloader workers"),
}

COMMANDS: dict[str, Command] = {
    "demo": Command(_lazy("cmd_demo"), "the main job: data → FP32 → PTQ → QAT → INT8 → ONNX → one comparison table",
                    (), {"quick": Arg(_bool, False, "small and fast (about 3 minutes)"),
                         "project": Arg(str, "runs/demo", "report folder"),
                         "seed": Arg(int, 0, "data seed")}),
    "data": Command(_lazy("cmd_data"), "generate the synthetic traffic-sign dataset (YOLO format)", ("kind", "out"), {
        "train": Arg(int, 800, "training images"), "val": Arg(int, 200, "validation images"),
        "imgsz": Arg(int, 320, "image size"), "seed": Arg(int, 0, "seed (deterministic)")}),
    "trace": Command(_lazy("cmd_trace"), "trace a YOLO model into an FX graph and print its summary", ("model",), {
        "mode": Arg(str, "eval", "train | eval"),
        "imgsz": Arg(_imgsz, 320, "input size for shapes, N or H,W"),
        "draw": Arg(str, None, "write a drawing: .svg .png .dot .html"),
        "expand": Arg(str, None, "layers to open in the drawing: 'all' or comma-separated indices/paths"),
        "leaf": Arg(str, None, "comma-separated module types or path globs to keep as leaves"),
        "nc": Arg(int, None, "number of classes when building from YAML"),
        "out": Arg(str, None, "also write the summary table to this file"),
    }),
    "train": Command(_lazy("cmd_train"), "train an FP32 model with Ultralytics (the QAT starting point)", ("model",),
                     {**_TRAIN_COMMON, "epochs": Arg(int, 30, "epochs"), "name": Arg(str, "fp32", "run name")}),
    "qat": Command(_lazy("cmd_qat"), "quantization-aware fine-tuning through the Ultralytics trainer", ("model",), {
        **_TRAIN_COMMON, "name": Arg(str, "qat", "run name"),
        "qconfig": Arg(str, None, "qconfig YAML (see qconfigs/)"),
        "freeze_bn": Arg(int, None, "epoch from which BN statistics are frozen (default: half)"),
        "freeze_observers": Arg(int, None, "epoch from which quantizer ranges are frozen (default: last)"),
        "lr0": Arg(float, None, "initial learning rate (default 1e-4)"),
        "resume": Arg(str, None, "an fxqat last.pt to resume from"),
    }),
    "eval": Command(_lazy("cmd_eval"), "mAP of a model in all its forms (fake-quant, INT8 torch, QDQ ONNX)", ("model",), {
        "data": Arg(str, None, "Ultralytics data YAML"), "imgsz": Arg(int, 320, "image size"),
        "batch": Arg(int, 16, "batch size"), "fp32": Arg(str, None, "FP32 .pt to include as a baseline row"),
        "onnx": Arg(_bool, True, "also export and evaluate the QDQ ONNX model"),
        "out": Arg(str, None, "write results as JSON")}),
    "export": Command(_lazy("cmd_export"), "export an fxqat QAT checkpoint to QDQ ONNX", ("model",), {
        "format": Arg(str, "onnx", "onnx | openvino"), "imgsz": Arg(int, 640, "input size"),
        "dynamic": Arg(_bool, False, "dynamic batch"), "report": Arg(_bool, True, "print the Q/DQ structure report"),
        "out": Arg(str, None, "output path")}),
    "analyze": Command(_lazy("cmd_analyze"), "critical-layer analysis: per-layer sensitivity and a qconfig", ("model",), {
        "data": Arg(str, None, "data YAML or image folder (calibration images)"),
        "out": Arg(str, "runs/analyze", "report folder"), "imgsz": Arg(int, 320, "image size"),
        "images": Arg(int, 32, "calibration images"), "topk": Arg(int, 3, "layers to raise in the generated qconfig"),
        "metric": Arg(str, "sqnr", "sqnr | map"), "qconfig": Arg(str, None, "base qconfig YAML")}),
    "bench": Command(_lazy("cmd_bench"), "latency of a model's forms measured in one run", ("model",), {
        "imgsz": Arg(int, 640, "input size"), "threads": Arg(int, 2, "torch / ORT threads"),
        "rounds": Arg(int, 3, "interleaved rounds")}),
}


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

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
            raise UsageError(f"fxqat {name}: missing {key.upper()}; usage: fxqat {name} {' '.join(p.upper() for p in cmd.positionals)} [key=value ...]")
    return out


def _imgsz(v):
    if isinstance(v, (int, tuple)):
        return v
    parts = [int(p) for p in str(v).replace("x", ",").split(",") if p]
    return parts[0] if len(parts) == 1 else tuple(parts)


# ------------------------------------------------------------------------------------------------------ commands
def cmd_trace(model, mode, imgsz, draw, expand, leaf, nc, out):
    import time

    import fxqat

    t = time.perf_counter()
    gm = fxqat.trace(model, mode=mode, leaf_modules=[s for s in (leaf or "").split(",") if s], nc=nc)
    dt = time.perf_counter() - t
    table = fxqat.summary(gm, imgsz=imgsz)
    print(table)
    print(f"traced {model} ({mode}) in {dt:.2f} s")
    if out:
        from pathlib import Path

        Path(out).write_text(table.to_text() + "\n")
        print(f"summary written to {out}")
    if draw:
        exp = None if expand is None else (expand if expand == "all" else [e for e in expand.split(",") if e])
        print(f"graph drawn to {fxqat.draw(gm, draw, expand=exp, imgsz=imgsz)}")


COMMANDS: dict[str, Command] = {
    "trace": Command(cmd_trace, "trace a YOLO model into an FX graph and print its summary", ("model",), {
        "mode": Arg(str, "eval", "train | eval"),
        "imgsz": Arg(_imgsz, 320, "input size for shapes, N or H,W"),
        "draw": Arg(str, None, "write a drawing: .svg .png .dot .html"),
        "expand": Arg(str, None, "layers to open in the drawing: 'all' or comma-separated indices/paths"),
        "leaf": Arg(str, None, "comma-separated module types or path globs to keep as leaves"),
        "nc": Arg(int, None, "number of classes when building from YAML"),
        "out": Arg(str, None, "also write the summary table to this file"),
    }),
}


def usage() -> str:
    lines = ["usage: fxqat COMMAND [ARGS] [key=value ...]", "", "commands:"]
    for name, c in COMMANDS.items():
        lines.append(f"  {name:<9} {c.help}")
        for key, a in c.args.items():
            lines.append(f"      {key}={a.default!s:<10} {a.help}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
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

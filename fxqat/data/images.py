"""Image batches for calibration, analysis and training checks: from a folder of images or an Ultralytics data YAML.

One reader for all of fxqat. A data YAML is read the way Ultralytics' trainer reads it (``check_det_dataset`` and
``get_img_files``), so calibration sees the images training sees:

* ``path:`` the dataset root; absent → the YAML's folder; relative → the current folder if it exists there,
  else Ultralytics' ``datasets_dir``;
* ``train:`` / ``val:``: a folder (searched recursively), a ``.txt`` list of images (``./x`` is relative to the
  list), or a list of those, each relative to the root;
* ``names:`` (list or {id: name}) or ``nc:``.

Unreadable or empty images are skipped with a warning naming them, as Ultralytics' loader does.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from ..errors import FxqatError

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".dng", ".mpo", ".heic", ".pfm", ".jp2")
LOG = logging.getLogger("fxqat")


class _Stderr(logging.Handler):
    """One line per warning on the current sys.stderr (as Ultralytics' loader reports skipped images)."""

    def emit(self, record):
        sys.stderr.write(f"fxqat: {record.getMessage()}\n")


if not LOG.handlers:
    LOG.addHandler(_Stderr(logging.WARNING))
    LOG.propagate = False


def read_data_yaml(path) -> dict:
    """The data YAML at ``path`` as a dict with ``names`` ({id: name}), ``nc`` and the resolved ``path`` root.

    Every problem is one :class:`FxqatError` naming the file (and the line, where YAML gives one).
    """
    p = Path(path)
    if not p.is_file():
        raise FxqatError(f"{p}: data YAML not found (make one with: fxqat data signs OUT)")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FxqatError(f"{p}:{where}: malformed YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FxqatError(f"{p}: cannot read data YAML ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise FxqatError(f"{p}: a data YAML is a mapping with path/train/val/names; got a {type(d).__name__}")
    names, nc = d.get("names"), d.get("nc")
    if names is None and nc is None:
        raise FxqatError(f"{p}: no 'names' (the class names, a list or {{id: name}}) and no 'nc'")
    if names is None:
        if not isinstance(nc, int) or nc < 1:
            raise FxqatError(f"{p}: nc={nc!r} must be a positive integer")
        names = [f"class_{i}" for i in range(nc)]
    if isinstance(names, list):
        names = dict(enumerate(names))
    elif isinstance(names, dict):
        try:
            names = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise FxqatError(f"{p}: names keys must be class ids 0..n-1") from None
    else:
        raise FxqatError(f"{p}: names must be a list or a mapping of id: name, not {type(names).__name__}")
    if sorted(names) != list(range(len(names))):
        raise FxqatError(f"{p}: names keys must be the class ids 0..{len(names) - 1}")
    if nc is not None and nc != len(names):
        raise FxqatError(f"{p}: names has {len(names)} entries but nc is {nc}")
    if not names:
        raise FxqatError(f"{p}: names is empty")
    out = dict(d, names={k: str(v) for k, v in sorted(names.items())}, nc=len(names), yaml_file=str(p))
    out["path"] = _root(d, p)
    return out


def _root(d: dict, yaml_path: Path) -> Path:
    root = Path(d.get("path") or yaml_path.parent)
    if not root.exists() and not root.is_absolute():
        from ultralytics.utils import DATASETS_DIR

        root = (DATASETS_DIR / root).resolve()
    return root


def split_entries(data: dict, split: str) -> list[Path]:
    """The resolved ``split`` entries of a read data YAML (folders, list files), as Ultralytics resolves them."""
    entry = data.get(split)
    if not entry:
        return []
    root = data["path"]
    out = []
    for e in entry if isinstance(entry, list) else [entry]:
        e = str(e)
        x = (root / e).resolve()
        if not x.exists() and e.startswith("../"):
            x = (root / e[3:]).resolve()
        out.append(x)
    return out


def _list_file(p: Path) -> list[Path]:
    try:
        lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FxqatError(f"{p}: cannot read image list ({type(e).__name__})") from None
    parent = str(p.parent) + os.sep
    return [Path(x.replace("./", parent, 1) if x.startswith("./") else x) for x in (s.strip() for s in lines) if x]


def _files_of(entries: list[Path], what: str) -> list[Path]:
    files: list[Path] = []
    for e in entries:
        if e.is_dir():
            files += [f for f in e.rglob("*") if f.is_file()]
        elif e.is_file():
            files += [e] if e.suffix.lower() in IMG_EXT else _list_file(e)
        else:
            raise FxqatError(f"{what}: {e} does not exist")
    files = sorted({f for f in files if f.suffix.lower() in IMG_EXT})
    if not files:
        raise FxqatError(f"{what}: no images ({', '.join(IMG_EXT[:5])}, ...) in {', '.join(map(str, entries))}")
    return files


def image_files(source, split: str = "val") -> list[Path]:
    """Image paths of a folder, or of a data YAML's ``split`` (``val`` by default, falling back to ``train``)."""
    p = Path(source)
    if p.suffix in (".yaml", ".yml"):
        d = read_data_yaml(p)
        entries = split_entries(d, split) or split_entries(d, "train")
        if not entries:
            raise FxqatError(f"{p}: has neither '{split}' nor 'train'")
        return _files_of(entries, str(p))
    if not p.exists():
        raise FxqatError(f"{p}: image folder not found")
    return _files_of([p], str(p))


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    out = np.full((size, size, 3), 114, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out


def read_image(f) -> np.ndarray | None:
    """RGB uint8 image, or None (with a warning naming the file) when it is empty or cannot be decoded."""
    try:
        im = cv2.imread(str(f)) if Path(f).stat().st_size else None
    except OSError as e:
        LOG.warning(f"skipping image {f}: {type(e).__name__}: {e}")
        return None
    if im is None:
        LOG.warning(f"skipping image {f}: empty or not a readable image")
        return None
    if im.ndim == 2:
        im = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(im[..., :3], cv2.COLOR_BGR2RGB)


def load_images(files, imgsz: int) -> torch.Tensor:
    """(N, 3, imgsz, imgsz) float tensor in [0, 1] of the readable ``files`` (others are skipped with a warning)."""
    arr = [letterbox(im, imgsz) for im in map(read_image, files) if im is not None]
    if not arr:
        return torch.empty(0, 3, imgsz, imgsz)
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float() / 255.0


def iter_image_batches(source, imgsz: int = 640, batch: int = 8, split: str = "val"):
    """Batches of up to ``batch`` images; unreadable images are skipped, so a batch may be smaller."""
    files = image_files(source, split)
    yielded = False
    for i in range(0, len(files), batch):
        x = load_images(files[i:i + batch], imgsz)
        if len(x):
            yielded = True
            yield x
    if not yielded:
        raise FxqatError(f"{source}: none of its {len(files)} images could be read")

"""Image batches for calibration and analysis: from a folder of images or an Ultralytics data YAML."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from ..errors import FxqatError

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(source, split: str = "val") -> list[Path]:
    """Image paths of a folder, or of a data YAML's ``split`` (``val`` by default, falling back to ``train``)."""
    p = Path(source)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise FxqatError(f"{p}: data YAML not found")
        d = yaml.safe_load(p.read_text())
        root = Path(d.get("path") or p.parent)
        if not root.is_absolute():
            root = (p.parent / root).resolve()
        entry = d.get(split) or d.get("train")
        if entry is None:
            raise FxqatError(f"{p}: has neither '{split}' nor 'train'")
        p = root / entry
    if not p.is_dir():
        raise FxqatError(f"{p}: image folder not found")
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXT)
    if not files:
        raise FxqatError(f"{p}: no images ({', '.join(IMG_EXT)})")
    return files


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    nh, nw = round(h * r), round(w * r)
    out = np.full((size, size, 3), 114, np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return out


def load_images(files, imgsz: int) -> torch.Tensor:
    arr = [letterbox(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), imgsz) for f in files]
    return torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float() / 255.0


def iter_image_batches(source, imgsz: int = 640, batch: int = 8, split: str = "val"):
    files = image_files(source, split)
    for i in range(0, len(files), batch):
        yield load_images(files[i:i + batch], imgsz)

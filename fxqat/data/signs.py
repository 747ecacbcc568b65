"""Deterministic synthetic traffic-sign detection data in Ultralytics YOLO format (fxqat's built-in default data).

Ten classes (the seed's use case), each drawn procedurally with OpenCV (Hershey vector fonts, nothing downloaded):
stop, yield, no_entry, speed_limit_30, speed_limit_60, keep_right, pedestrian_crossing, no_parking, warning,
priority_road.
Variety that makes quantization differences show: small signs, perspective and rotation, partial occlusion, blur,
noise, lighting, cluttered backgrounds, several signs per image.

    fxqat data signs OUT train=800 val=200 imgsz=320 seed=0
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm.auto import tqdm

CLASSES = ("stop", "yield", "no_entry", "speed_limit_30", "speed_limit_60", "keep_right", "pedestrian_crossing",
           "no_parking", "warning", "priority_road")

RED, WHITE, BLUE, BLACK, YELLOW = (200, 30, 35), (245, 245, 245), (25, 70, 180), (20, 20, 20), (250, 200, 20)


def _poly(n: int, r: float, c: float, rot: float = 0.0) -> np.ndarray:
    a = rot + np.arange(n) * 2 * np.pi / n
    return np.stack([c + r * np.cos(a), c + r * np.sin(a)], 1).astype(np.int32)


def _text(img, s: str, c: int, scale: float, color, thick: int) -> None:
    (w, h), _ = cv2.getTextSize(s, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.putText(img, s, (c - w // 2, c + h // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def render_sign(cls: int, S: int = 128) -> np.ndarray:
    """RGBA image (S×S) of sign ``cls``; alpha marks the sign's silhouette."""
    img = np.zeros((S, S, 3), np.uint8)
    mask = np.zeros((S, S), np.uint8)
    c, r = S // 2, S // 2 - 2
    name = CLASSES[cls]
    if name == "stop":
        p = _poly(8, r, c, np.pi / 8)
        cv2.fillPoly(mask, [p], 255)
        cv2.fillPoly(img, [p], WHITE)
        cv2.fillPoly(img, [_poly(8, r * 0.88, c, np.pi / 8)], RED)
        _text(img, "STOP", c, S / 110, WHITE, max(1, S // 40))
    elif name in ("yield", "warning"):
        up = name == "warning"
        p = _poly(3, r, c + (r * 0.2 if up else -r * 0.2), -np.pi / 2 if up else np.pi / 2)
        cv2.fillPoly(mask, [p], 255)
        cv2.fillPoly(img, [p], RED)
        cv2.fillPoly(img, [_poly(3, r * 0.68, c + (r * 0.2 if up else -r * 0.2), -np.pi / 2 if up else np.pi / 2)],
                     WHITE)
        if up:
            cv2.line(img, (c, int(c - r * 0.1)), (c, int(c + r * 0.35)), BLACK, max(2, S // 14))
            cv2.circle(img, (c, int(c + r * 0.55)), max(2, S // 28), BLACK, -1)
    elif name == "priority_road":
        p = _poly(4, r, c, 0)
        cv2.fillPoly(mask, [p], 255)
        cv2.fillPoly(img, [p], WHITE)
        cv2.fillPoly(img, [_poly(4, r * 0.7, c, 0)], YELLOW)
    elif name == "pedestrian_crossing":
        m = int(S * 0.06)
        cv2.rectangle(mask, (m, m), (S - m, S - m), 255, -1)
        cv2.rectangle(img, (m, m), (S - m, S - m), BLUE, -1)
        cv2.fillPoly(img, [_poly(3, r * 0.75, c + r * 0.12, -np.pi / 2)], WHITE)
        cv2.circle(img, (c, int(c - r * 0.12)), max(2, S // 20), BLACK, -1)
        cv2.line(img, (c, int(c - r * 0.05)), (c - S // 12, int(c + r * 0.45)), BLACK, max(1, S // 30))
        cv2.line(img, (c, int(c - r * 0.05)), (c + S // 12, int(c + r * 0.45)), BLACK, max(1, S // 30))
    else:  # round signs
        cv2.circle(mask, (c, c), r, 255, -1)
        if name == "no_entry":
            cv2.circle(img, (c, c), r, RED, -1)
            cv2.rectangle(img, (int(c - r * 0.7), int(c - r * 0.18)), (int(c + r * 0.7), int(c + r * 0.18)), WHITE, -1)
        elif name.startswith("speed_limit"):
            cv2.circle(img, (c, c), r, RED, -1)
            cv2.circle(img, (c, c), int(r * 0.78), WHITE, -1)
            _text(img, name.rsplit("_", 1)[1], c, S / 70, BLACK, max(2, S // 22))
        elif name == "keep_right":
            cv2.circle(img, (c, c), r, BLUE, -1)
            cv2.arrowedLine(img, (int(c - r * 0.45), int(c - r * 0.45)), (int(c + r * 0.4), int(c + r * 0.4)), WHITE,
                            max(2, S // 12), tipLength=0.45)
        elif name == "no_parking":
            cv2.circle(img, (c, c), r, RED, -1)
            cv2.circle(img, (c, c), int(r * 0.8), BLUE, -1)
            cv2.line(img, (int(c - r * 0.56), int(c - r * 0.56)), (int(c + r * 0.56), int(c + r * 0.56)), RED,
                     max(2, S // 10))
    return np.dstack([img, mask])


@dataclass(frozen=True)
class SignsConfig:
    imgsz: int = 320
    min_signs: int = 1
    max_signs: int = 5
    min_size: float = 0.05  # sign size as a fraction of the image side: small signs too
    max_size: float = 0.45
    occlusion: float = 0.3  # probability a sign is partly covered
    blur: float = 0.3
    noise: float = 0.5


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    top, bottom = rng.integers(40, 220, 3), rng.integers(30, 200, 3)
    t = np.linspace(0, 1, S)[:, None, None]
    img = (top * (1 - t) + bottom * t).repeat(S, 1).astype(np.float32)
    for _ in range(rng.integers(6, 18)):  # clutter: buildings, poles, foliage, cars
        color = rng.integers(0, 255, 3).tolist()
        kind = rng.integers(0, 4)
        x0, y0 = rng.integers(0, S, 2)
        w, h = rng.integers(S // 20, S // 2, 2)
        if kind == 0:
            cv2.rectangle(img, (int(x0), int(y0)), (int(x0 + w), int(y0 + h)), color, -1)
        elif kind == 1:
            cv2.ellipse(img, (int(x0), int(y0)), (int(w // 2), int(h // 3)), float(rng.uniform(0, 180)), 0, 360,
                        color, -1)
        elif kind == 2:
            cv2.line(img, (int(x0), 0), (int(x0 + rng.integers(-20, 20)), S), color, int(rng.integers(2, 8)))
        else:  # red/blue distractor shapes that are not signs
            cv2.circle(img, (int(x0), int(y0)), int(rng.integers(3, S // 12)), [200, 40, 40] if rng.random() < .5
                       else [40, 60, 190], int(rng.integers(2, 5)))
    tex = cv2.GaussianBlur(rng.normal(0, 18, (S, S, 1)).astype(np.float32), (0, 0), 2)[..., None]
    return np.clip(img + tex, 0, 255)


def _place(rng, canvas: np.ndarray, owner: np.ndarray, idx: int, sign: np.ndarray, size: int, cfg: SignsConfig):
    S = canvas.shape[0]
    src = np.float32([[0, 0], [127, 0], [127, 127], [0, 127]])
    j = 0.18 * size
    dst = np.float32([[0, 0], [size, 0], [size, size], [0, size]]) + rng.uniform(-j, j, (4, 2)).astype(np.float32)
    ang = np.deg2rad(rng.uniform(-15, 15))
    R = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]], np.float32)
    dst = (dst - size / 2) @ R.T
    x0, y0 = rng.uniform(-dst[:, 0].min(), S - dst[:, 0].max()), rng.uniform(-dst[:, 1].min(), S - dst[:, 1].max())
    dst += np.float32([x0, y0])
    H = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    warped = cv2.warpPerspective(sign, H, (S, S), flags=cv2.INTER_LINEAR)
    alpha = warped[..., 3:4].astype(np.float32) / 255
    ys, xs = np.nonzero(alpha[..., 0] > 0.5)
    if len(xs) < 4:
        return None
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    light = rng.uniform(0.55, 1.25)
    rgb = np.clip(warped[..., :3].astype(np.float32) * light + rng.uniform(-20, 20), 0, 255)
    canvas[:] = canvas * (1 - alpha) + rgb * alpha
    owner[alpha[..., 0] > 0.5] = idx
    if rng.random() < cfg.occlusion:  # a branch, a car roof, another pole
        bw, bh = box[2] - box[0], box[3] - box[1]
        ox = int(box[0] + rng.uniform(-0.3, 0.7) * bw)
        oy = int(box[1] + rng.uniform(-0.3, 0.7) * bh)
        p1 = (ox + int(bw * rng.uniform(0.2, 0.5)), oy + int(bh * rng.uniform(0.2, 0.5)))
        cv2.rectangle(canvas, (ox, oy), p1, rng.integers(0, 120, 3).tolist(), -1)
        cv2.rectangle(owner, (ox, oy), p1, OCCLUDER, -1)
    # the sign's full silhouette and the 4 corners of its (warped) square: TL, TR, BR, BL
    return box, len(xs), alpha[..., 0] > 0.5, dst.astype(np.float64)


@dataclass(frozen=True)
class Sign:
    """One labeled sign of a scene: what every task's labels are made from (pixel coordinates)."""

    idx: int  # the sign's value in ``owner``
    cls: int
    box: tuple  # x0, y0, x1, y1: the silhouette's box, occluded part included (the detect label)
    quad: np.ndarray  # (4, 2): the corners of the sign's square after warp and rotation, TL, TR, BR, BL
    silhouette: np.ndarray  # (S, S) bool: every pixel of the sign, occluded or not
    visible: np.ndarray  # (S, S) bool: the pixels where this sign is seen (not covered by another sign or occluder)
    owner: np.ndarray  # (S, S) int32: the scene's owner map (sign index, -1 background, OCCLUDER), shared by signs


OCCLUDER = -2  # owner-map value of an occluding object


def make_scene(index: int, seed: int, split: str, cfg: SignsConfig = SignsConfig()):
    """One image (H×W×3 uint8, RGB) and its labeled signs (:class:`Sign`); deterministic."""
    h = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
    S = cfg.imgsz
    canvas = _background(rng, S)
    owner = np.full((S, S), -1, np.int32)  # which sign is visible at each pixel
    placed = []
    for idx in range(rng.integers(cfg.min_signs, cfg.max_signs + 1)):
        cls = int(rng.integers(0, len(CLASSES)))
        size = int(S * np.exp(rng.uniform(np.log(cfg.min_size), np.log(cfg.max_size))))
        res = _place(rng, canvas, owner, idx, render_sign(cls), max(size, 6), cfg)
        if res is not None:
            placed.append((idx, cls, *res))
    signs = []
    for idx, cls, box, area, silhouette, quad in placed:
        if (owner == idx).sum() >= 0.4 * area:  # label signs that stay at least 40 % visible
            signs.append(Sign(idx, cls, tuple(int(v) for v in box), quad, silhouette, owner == idx, owner))
    if rng.random() < cfg.blur:
        k = int(rng.choice([3, 5]))
        canvas = cv2.GaussianBlur(canvas, (k, k), 0)
    if rng.random() < cfg.noise:
        canvas = canvas + rng.normal(0, rng.uniform(2, 10), canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8), signs


def make_image(index: int, seed: int, split: str, cfg: SignsConfig = SignsConfig()):
    """One image (H×W×3 uint8, RGB) and its labels [(cls, cx, cy, w, h)] normalized; deterministic."""
    img, signs = make_scene(index, seed, split, cfg)
    S = cfg.imgsz
    return img, [(s.cls, (s.box[0] + s.box[2]) / 2 / S, (s.box[1] + s.box[3]) / 2 / S, (s.box[2] - s.box[0]) / S,
                  (s.box[3] - s.box[1]) / S) for s in signs]


def generate(out, train: int = 800, val: int = 200, imgsz: int = 320, seed: int = 0, progress: bool = True,
             min_size: float = SignsConfig.min_size, max_size: float = SignsConfig.max_size,
             task: str = "detect") -> Path:
    """Write the dataset under ``out`` and return its data.yaml path (classify: the dataset folder).

    ``min_size``/``max_size``: the range of sign sizes as a fraction of the image side (log-uniform).
    ``task``: detect | segment | pose | obb | classify: the same scenes, labeled for that task
    (:mod:`fxqat.data.signs_tasks`); detect, segment, pose and obb write images/, labels/ and data.yaml, classify
    writes ImageNet-style folders OUT/train/<class>/*.png and OUT/val/<class>/*.png of sign crops."""
    from .signs_tasks import TASKS, crop, data_yaml_extra, label_lines

    out = Path(out).resolve()
    if task not in TASKS:
        raise ValueError(f"task={task!r}: valid choices are {', '.join(TASKS)}")
    if train < 1 or val < 1:
        raise ValueError(f"train={train}, val={val}: both must be at least 1")
    if imgsz < 64 or imgsz % 32:
        raise ValueError(f"imgsz={imgsz}: must be a multiple of 32, at least 64")
    if not 0.02 <= min_size <= max_size <= 0.9:
        raise ValueError(f"min_size={min_size}, max_size={max_size}: need 0.02 <= min_size <= max_size <= 0.9")
    cfg = SignsConfig(imgsz=imgsz, min_size=min_size, max_size=max_size)
    bar = tqdm(total=train + val, desc=f"signs → {out}", disable=not progress, unit="img")
    for split, n in (("train", train), ("val", val)):
        if task != "classify":
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, signs = make_scene(i, seed, split, cfg)
            if task == "classify":
                for k, sign in enumerate(signs):
                    folder = out / split / CLASSES[sign.cls]
                    folder.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(folder / f"{i:06d}_{k}.png"), cv2.cvtColor(crop(img, sign), cv2.COLOR_RGB2BGR))
            else:
                cv2.imwrite(str(out / "images" / split / f"{i:06d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                (out / "labels" / split / f"{i:06d}.txt").write_text(
                    "".join(line + "\n" for line in label_lines(task, signs, imgsz)))
            bar.update()
    bar.close()
    info = {"generator": "signs", "task": task, "train": train, "val": val, "imgsz": imgsz, "seed": seed,
            "min_size": min_size, "max_size": max_size}
    if task == "classify":
        missing = {split: [c for c in CLASSES if not (out / split / c).is_dir()] for split in ("train", "val")}
        missing = {k: v for k, v in missing.items() if v}
        if missing:
            raise ValueError(f"task=classify: no crop of {'; '.join(f'{k}: {v}' for k, v in missing.items())} in "
                             f"{out}; generate more images (train=, val=) so every class appears in both splits")
        (out / "fxqat.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
        return out
    data = {"path": str(out), "train": "images/train", "val": "images/val", "nc": len(CLASSES),
            "names": dict(enumerate(CLASSES)), **data_yaml_extra(task), "fxqat": info}
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path

"""The labels of every YOLO task from the same sign scenes (:func:`fxqat.data.signs.make_scene`).

    task      label file line (Ultralytics format, coordinates normalized to 0..1)
    detect    cls cx cy w h                                  the silhouette's box (occluded part included)
    segment   cls x1 y1 x2 y2 ...                            the sign's visible polygon (parts joined, as
                                                             Ultralytics joins COCO's multi-part masks)
    pose      cls cx cy w h x1 y1 v1 ... x4 y4 v4            the detect box + the 4 corners of the sign's warped
                                                             square (TL, TR, BR, BL); v: 2 seen, 1 covered by another
                                                             sign or an occluder, 0 outside the image (x = y = 0)
    obb       cls x1 y1 x2 y2 x3 y3 x4 y4                     the rotated box along the sign's own axes
                                                             that holds its whole silhouette
    classify  images only: OUT/<split>/<class>/<image>_<k>.png, square crops around each detect box

A horizontal flip swaps TL↔TR and BR↔BL: ``flip_idx: [1, 0, 3, 2]`` in the pose data YAML.
"""

from __future__ import annotations

import cv2
import numpy as np

TASKS = ("detect", "segment", "pose", "obb", "classify")
KPT_SHAPE = [4, 3]
FLIP_IDX = [1, 0, 3, 2]
KPT_NAMES = ["top_left", "top_right", "bottom_right", "bottom_left"]
CROP_MARGIN = 0.1  # classify crops: the detect box's longer side + this fraction on each side


def _fmt(values) -> str:
    return " ".join(f"{v:.6f}" for v in values)


def _detect(sign, S: int) -> list[float]:
    x0, y0, x1, y1 = sign.box
    return [(x0 + x1) / 2 / S, (y0 + y1) / 2 / S, (x1 - x0) / S, (y1 - y0) / S]


def visible_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The visible region's outline as one (N, 2) pixel polygon (several parts joined), or None if too small."""
    from ultralytics.data.converter import merge_multi_segment

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    parts = [c.reshape(-1, 2).astype(np.float64) for c in contours if len(c) >= 3]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(merge_multi_segment([p.reshape(-1).tolist() for p in parts]), 0)


def keypoints(sign, S: int) -> np.ndarray:
    """(4, 3) corners of the sign's square in pixels with visibility (module docstring)."""
    out = np.zeros((4, 3))
    for k, (x, y) in enumerate(sign.quad):
        xi, yi = int(np.floor(x)), int(np.floor(y))
        if not (0 <= x < S and 0 <= y < S):
            continue  # outside the image: 0 0 0
        covered = sign.owner[yi, xi] not in (-1, sign.idx)
        out[k] = (x, y, 1 if covered else 2)
    return out


def rotated_box(sign) -> np.ndarray:
    """(4, 2) corners in pixels of the sign's rotated box: the rectangle aligned with the sign's own axes (the mean
    direction of its warped square's top and bottom edges) that holds the whole silhouette (pixel areas)."""
    q = sign.quad
    d = (q[1] - q[0]) + (q[2] - q[3])
    theta = np.arctan2(d[1], d[0])
    c, s = np.cos(theta), np.sin(theta)
    ys, xs = np.nonzero(sign.silhouette)
    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    u, v = pts @ np.array([c, s]), pts @ np.array([-s, c])  # coordinates along the sign's axes
    corners = [(u.min(), v.min()), (u.max(), v.min()), (u.max(), v.max()), (u.min(), v.max())]
    return np.array([[a * c - b * s, a * s + b * c] for a, b in corners])


def label_lines(task: str, signs, S: int) -> list[str]:
    """The label file's lines for one scene (see the module docstring); signs without a valid label are skipped."""
    lines = []
    for s in signs:
        if task == "detect":
            lines.append(f"{s.cls} {_fmt(_detect(s, S))}")
        elif task == "segment":
            poly = visible_polygon(s.visible)
            if poly is not None:
                lines.append(f"{s.cls} {_fmt(np.clip(poly / S, 0, 1).reshape(-1))}")
        elif task == "pose":
            k = keypoints(s, S)
            k[:, :2] = np.clip(k[:, :2] / S, 0, 1)
            lines.append(f"{s.cls} {_fmt(_detect(s, S))} "
                         + " ".join(f"{x:.6f} {y:.6f} {int(v)}" for x, y, v in k))
        elif task == "obb":
            lines.append(f"{s.cls} {_fmt(np.clip(rotated_box(s) / S, 0, 1).reshape(-1))}")
        else:
            raise ValueError(f"task={task!r}: no label lines; valid: {', '.join(TASKS[:-1])}")
    return lines


def crop(img: np.ndarray, sign) -> np.ndarray:
    """A square crop around the sign's detect box (+ ``CROP_MARGIN``), clipped to the image."""
    S = img.shape[0]
    x0, y0, x1, y1 = sign.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * CROP_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a0, b0 = int(max(0, round(cx - side / 2))), int(max(0, round(cy - side / 2)))
    a1, b1 = int(min(S, round(cx + side / 2))), int(min(S, round(cy + side / 2)))
    return img[b0:b1, a0:a1]


def data_yaml_extra(task: str) -> dict:
    """What the task adds to the data YAML."""
    if task == "pose":
        return {"kpt_shape": list(KPT_SHAPE), "flip_idx": list(FLIP_IDX)}
    return {}

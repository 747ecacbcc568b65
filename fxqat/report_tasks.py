"""FP32-vs-INT8 prediction pictures of the task models (segment, pose, OBB, classify) for the demo's report, drawn
with OpenCV only (Hershey fonts: nothing downloaded). Detect's boxes are :func:`fxqat.report.prediction_grid`.

    segment   boxes + each instance's mask as a coloured overlay
    pose      boxes + the sign's 4 corner key points joined as a quad (TL → TR → BR → BL)
    obb       rotated boxes
    classify  each crop with its top-1 class and score (green: the crop's own class, red: another)

One row per model (FP32 above INT8), the same images in every row.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

GREEN, RED = (0, 255, 0), (0, 0, 255)  # BGR
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _colour(cls: int) -> tuple[int, int, int]:
    """A distinct BGR colour per class (HSV wheel)."""
    hsv = np.uint8([[[(cls * 47) % 180, 220, 255]]])
    return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def model_outputs(model, images: torch.Tensor, task: str):
    """(predictions, mask prototypes or None) of any model form in eval mode: an Ultralytics model's
    ``(y, raw head outputs)``, a graph's, a converted model's plain outputs; classify: the class probabilities."""
    with torch.no_grad():
        out = model(images)
    if isinstance(out, (tuple, list)) and isinstance(out[-1], dict):
        out = out[0]  # (predictions, raw head outputs)
    if task == "segment":
        return out[0], out[1]
    if isinstance(out, (tuple, list)):
        out = out[0]  # classify in eval: (probabilities, logits)
    return out, None


def decode(task: str, pred: torch.Tensor, proto, nc: int, imgsz: int, conf: float = 0.25) -> list[dict]:
    """Per image: ``boxes`` (N, 4) xyxy, ``cls``, ``score``, and ``masks`` (N, H, W) bool (segment), ``kpts``
    (N, K, 3) (pose), ``corners`` (N, 4, 2) (obb); classify: ``cls`` and ``score`` of the top-1 class. Pixels of the
    model's input."""
    if task == "classify":
        p = pred.float()
        if not torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-3):
            p = p.softmax(1)  # logits
        score, cls = p.max(1)
        return [{"cls": int(c), "score": float(s)} for c, s in zip(cls, score)]
    from ultralytics.utils import ops
    from ultralytics.utils.nms import non_max_suppression

    dets = non_max_suppression(pred, conf_thres=conf, iou_thres=0.7, nc=nc, rotated=task == "obb")
    out = []
    for i, d in enumerate(dets):
        r = {"boxes": d[:, :4].numpy(), "score": d[:, 4].numpy(), "cls": d[:, 5].long().numpy()}
        if task == "segment":
            masks = ops.process_mask(proto[i], d[:, 6:], d[:, :4], (imgsz, imgsz), upsample=True) if len(d) else \
                torch.zeros(0, imgsz, imgsz)
            r["masks"] = masks.numpy() > 0.5
        elif task == "pose":
            r["kpts"] = d[:, 6:].reshape(len(d), (d.shape[1] - 6) // 3, 3).numpy()  # x, y, visibility
        elif task == "obb":
            r["corners"] = ops.xywhr2xyxyxyxy(torch.cat([d[:, :4], d[:, -1:]], 1)).reshape(-1, 4, 2).numpy()
            r["boxes"] = np.concatenate([r["corners"].min(1), r["corners"].max(1)], 1) if len(d) else r["boxes"]
        out.append(r)
    return out


def _label(im, text: str, p0, colour) -> None:
    cv2.putText(im, text, (int(p0[0]), max(10, int(p0[1]) - 3)), FONT, 0.35, colour, 1, cv2.LINE_AA)


def draw_masks(im: np.ndarray, masks: np.ndarray, cls, alpha: float = 0.45) -> np.ndarray:
    """Blend each (H, W) bool mask (image size) into ``im`` (BGR) in its class colour."""
    for m, c in zip(masks, cls):
        colour = np.array(_colour(int(c)), np.float32)
        im[m] = (im[m].astype(np.float32) * (1 - alpha) + colour * alpha).astype(np.uint8)
    return im


def draw_keypoints(im: np.ndarray, kpts: np.ndarray, scale: float = 1.0, visible: float = 0.5) -> np.ndarray:
    """Each instance's key points (K, 3: x, y, confidence) as dots, consecutive visible ones joined, the last to the
    first (the sign's corner quad)."""
    for k in kpts:
        pts = [(int(x * scale), int(y * scale)) if v >= visible else None for x, y, v in k]
        for a, b in zip(pts, pts[1:] + pts[:1]):
            if a is not None and b is not None:
                cv2.line(im, a, b, (255, 128, 0), 1, cv2.LINE_AA)
        for p in pts:
            if p is not None:
                cv2.circle(im, p, 3, (0, 0, 255), -1, cv2.LINE_AA)
    return im


def draw_rotated(im: np.ndarray, corners: np.ndarray, cls, scores, names: dict, scale: float = 1.0) -> np.ndarray:
    """Rotated boxes ((N, 4, 2) corners) with class and score."""
    for c4, c, s in zip(corners, cls, scores):
        pts = np.round(c4 * scale).astype(np.int32)
        cv2.polylines(im, [pts], True, GREEN, 1, cv2.LINE_AA)
        _label(im, f"{names.get(int(c), int(c))} {s:.2f}", pts[np.argmin(pts[:, 1])], GREEN)
    return im


def draw_boxes(im: np.ndarray, boxes, cls, scores, names: dict, scale: float = 1.0) -> np.ndarray:
    for b, c, s in zip(boxes, cls, scores):
        p0, p1 = (int(b[0] * scale), int(b[1] * scale)), (int(b[2] * scale), int(b[3] * scale))
        cv2.rectangle(im, p0, p1, GREEN, 1)
        _label(im, f"{names.get(int(c), int(c))} {s:.2f}", p0, GREEN)
    return im


def draw_class(im: np.ndarray, name: str, score: float, correct: bool | None = None) -> np.ndarray:
    """The top-1 class and score on a band at the bottom of ``im`` (green: correct, red: wrong, white: unknown)."""
    h, w = im.shape[:2]
    cv2.rectangle(im, (0, h - 16), (w, h), (0, 0, 0), -1)
    colour = (255, 255, 255) if correct is None else GREEN if correct else RED
    cv2.putText(im, f"{name} {score:.2f}", (3, h - 4), FONT, 0.38, colour, 1, cv2.LINE_AA)
    return im


def draw_tile(task: str, img: torch.Tensor, r: dict, names: dict, scale: int, truth: int | None = None) -> np.ndarray:
    """One picture: ``img`` (3, H, W) in [0, 1], RGB, enlarged ``scale`` times, with its decoded predictions ``r``."""
    im = np.ascontiguousarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)[..., ::-1])
    if task == "segment" and len(r["masks"]):
        im = draw_masks(im, r["masks"], r["cls"])
    im = cv2.resize(im, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    if task == "segment":  # each mask's outline, in its class colour
        for m, c in zip(r["masks"], r["cls"]):
            big = cv2.resize(m.astype(np.uint8), None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(im, contours, -1, _colour(int(c)), 1, cv2.LINE_AA)
    if task == "classify":
        return draw_class(im, str(names.get(r["cls"], r["cls"])), r["score"], None if truth is None else
                          truth == r["cls"])
    if task == "obb":
        return draw_rotated(im, r["corners"], r["cls"], r["score"], names, scale)
    im = draw_boxes(im, r["boxes"], r["cls"], r["score"], names, scale)
    if task == "pose":
        im = draw_keypoints(im, r["kpts"], scale)
    return im


def task_prediction_grid(task: str, models: dict, images: torch.Tensor, names: dict, path: Path,
                         truth: list[int] | None = None, conf: float = 0.25) -> Path:
    """One row of pictures per model (same images), the task's predictions drawn: FP32 and INT8 side by side.
    ``truth``: the images' classes (classify), to colour the top-1 label right or wrong."""
    imgsz = images.shape[-1]
    scale = max(2, 192 // imgsz)
    rows = []
    for label, model in models.items():
        pred, proto = model_outputs(model, images, task)
        results = decode(task, pred, proto, len(names), imgsz, conf)
        tiles = [draw_tile(task, img, r, names, scale, truth[i] if truth else None)
                 for i, (img, r) in enumerate(zip(images, results))]
        strip = np.hstack(tiles)
        band = np.full((22, strip.shape[1], 3), 255, np.uint8)
        cv2.putText(band, label, (6, 16), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.vstack([band, strip]))
    cv2.imwrite(str(path), np.vstack(rows))
    return path

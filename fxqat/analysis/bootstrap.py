"""Paired bootstrap over validation images: how far a quantized model's mAP50-95 is from FP32's, with a confidence
interval.

Both models are evaluated on the same images (``fxqat.evaluate(..., images=list)`` keeps each image's matching
statistics; ``fxqat eval CKPT data=... fp32=... interval=1000`` and ``benchmarks.accuracy --bootstrap`` report it).
Each resample draws images with replacement and recomputes both mAPs from the same draw, so the interval is that of
the *difference*: what a target such as "within 0.3 pt of FP32" is checked against. On a small validation set one
changed top-k decision moves mAP50-95 by tenths of a point; the interval says whether a measured gap is the model or
the sample.

The mAP is Ultralytics' (``ap_per_class`` + ``compute_ap``: per class, 10 IoU thresholds, 101-point interpolation),
computed from predictions sorted once: a drawn image counts with its multiplicity as a weight in the cumulative
true / false positive counts (an image drawn twice: its detections count twice at their place in the ranking). With
every weight 1 it is the validator's figure (tested to 1e-9).
"""

from __future__ import annotations

import numpy as np

# the matching statistics of each task's main metric (Ultralytics' validator keys)
TP_KEY = {"detect": "tp", "obb": "tp", "segment": "tp_m", "pose": "tp_p"}
_AP_X = np.linspace(0, 1, 101)


def tp_key(task: str) -> str:
    """The matching-statistics key of ``task``'s main metric; a ValueError naming the tasks that have one (classify's
    validator keeps no per-image matches)."""
    if task not in TP_KEY:
        raise ValueError(f"per-image statistics exist for {', '.join(TP_KEY)} models, not {task}")
    return TP_KEY[task]
_TRAPZ = getattr(np, "trapezoid", None) or np.trapz


class Ranked:
    """All images' detections, ranked once by confidence as Ultralytics ranks them, with each one's image."""

    def __init__(self, images: list[dict], key: str = "tp"):
        if not images:
            raise ValueError("no validation images")
        self.images = len(images)
        pimg = np.concatenate([np.full(len(im["conf"]), k) for k, im in enumerate(images)])
        conf = np.concatenate([im["conf"] for im in images])
        order = np.argsort(-conf)  # Ultralytics' own call on the same concatenation: the same order of ties
        tp = np.concatenate([im[key] for im in images], 0)[order].astype(np.float64)
        pred_cls = np.concatenate([im["pred_cls"] for im in images])[order]
        self.pimg = pimg[order]
        self.tcls = np.concatenate([im["target_cls"] for im in images])
        self.timg = np.concatenate([np.full(len(im["target_cls"]), k) for k, im in enumerate(images)])
        self.classes = np.unique(self.tcls)
        self.per_class = {c: (tp[pred_cls == c], self.pimg[pred_cls == c]) for c in self.classes}

    def map50_95(self, weights: np.ndarray | None = None) -> float:
        """mAP50-95 with each image counted ``weights[image]`` times (None: once each, the validator's figure)."""
        w = np.ones(self.images) if weights is None else np.asarray(weights, dtype=np.float64)
        n_labels = np.bincount(self.tcls.astype(np.int64), weights=w[self.timg])
        aps = []
        for c in self.classes:
            n_l = n_labels[int(c)]
            if n_l == 0:  # no drawn image has this class: it is not in the mean (as for a validation set without it)
                continue
            tp, img = self.per_class[c]
            wp = w[img]
            keep = wp > 0
            tp, wp = tp[keep], wp[keep, None]
            if len(tp) == 0:
                aps.append(np.zeros(10))
                continue
            tpc, fpc = (wp * tp).cumsum(0), (wp * (1 - tp)).cumsum(0)
            recall, precision = tpc / (n_l + 1e-16), tpc / (tpc + fpc)
            aps.append([_ap(recall[:, j], precision[:, j]) for j in range(tp.shape[1])])
        return float(np.mean(aps)) if aps else 0.0


def _ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Ultralytics' ``compute_ap``: the precision envelope, interpolated at 101 recall points."""
    mrec = np.concatenate(([0.0], recall, [recall[-1]], [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0], [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    return float(_TRAPZ(np.interp(_AP_X, mrec, mpre), _AP_X))


def paired_deltas(base: list[dict], others: dict, key: str = "tp", n: int = 1000, seed: int = 0, level: float = 0.95,
                  progress: bool = False) -> dict:
    """For each of ``others``: its mAP50-95 − ``base``'s in points on the same images, the bootstrap's standard error
    and its ``level`` percentile interval (``n`` resamples of the images; every row sees the same draws)."""
    from tqdm.auto import tqdm

    m = len(base)
    if not base or any(len(v) != m for v in others.values()):
        raise ValueError(f"paired bootstrap needs the same images for every model ({m} vs "
                         f"{', '.join(str(len(v)) for v in others.values())})")
    a, ranked = Ranked(base, key), {name: Ranked(v, key) for name, v in others.items()}
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(n) for name in others}
    for k in tqdm(range(n), desc="bootstrap", unit="resample", disable=not progress):
        w = np.bincount(rng.integers(0, m, m), minlength=m).astype(np.float64)
        a_k = a.map50_95(w)
        for name, r in ranked.items():
            draws[name][k] = 100 * (r.map50_95(w) - a_k)
    out, a0 = {}, a.map50_95()
    for name, r in ranked.items():
        lo, hi = np.percentile(draws[name], [50 * (1 - level), 50 * (1 + level)])
        out[name] = {"delta_pt": 100 * (r.map50_95() - a0), "se_pt": float(draws[name].std(ddof=1)),
                     "lo_pt": float(lo), "hi_pt": float(hi), "images": m, "resamples": n, "level": level}
    return out


def paired_delta(base: list[dict], other: list[dict], key: str = "tp", n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """:func:`paired_deltas` for one model."""
    return paired_deltas(base, {"other": other}, key, n, seed, level)["other"]

"""A tiny deterministic detection batch for smoke tests, DDP checks and step-time benchmarks."""

from __future__ import annotations

import torch


def toy_batch(batch: int, imgsz: int, seed: int):
    """Random images with three centred boxes (10%, 30%, 60% of the side) each; deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    sizes = [0.1, 0.3, 0.6]
    tgt = {"batch_idx": torch.tensor([float(i) for i in range(batch) for _ in sizes]),
           "cls": torch.randint(0, 10, (batch * len(sizes), 1), generator=g).float(),
           "bboxes": torch.tensor([[0.5, 0.5, s, s] for _ in range(batch) for s in sizes])}
    return x, tgt

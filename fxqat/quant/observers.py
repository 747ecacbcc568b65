"""Clipping observers: ``percentile`` and ``mse`` (per-tensor), same contract as torch.ao's observers.

``forward(x)`` records statistics and returns ``x``; ``calculate_qparams()`` returns ``(scale, zero_point)`` as
1-element tensors. Their state lives in buffers of fixed shape, so ``state_dict`` (checkpoints, the EMA copy) holds it.

* :class:`PercentileObserver` clips at a percentile: of ``|x|`` for symmetric grids, of ``x`` at ``100 - p`` and ``p``
  for asymmetric ones. The running estimate is the mean of the per-batch percentiles.
* :class:`MSEObserver` accumulates a histogram over the observed [min, max] and grid-searches the clipping range
  minimizing the expected quantization MSE: clipping error ``(x - clip(x))**2`` outside the range plus the rounding
  noise ``step**2 / 12`` inside it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

EPS = 1e-8


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool):
    """torch.ao's rule: the range always contains 0; symmetric → zp at the grid's middle (0 for signed)."""
    lo, hi = torch.clamp(lo.float(), max=0.0), torch.clamp(hi.float(), min=0.0)
    if symmetric:
        m = torch.maximum(-lo, hi)
        scale = (m / ((qmax - qmin) / 2)).clamp_min(EPS)
        zp = torch.full_like(scale, 0 if qmin < 0 else (qmin + qmax + 1) // 2, dtype=torch.int32)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
        zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale.reshape(1), zp.reshape(1)


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile (0..1) of a flat tensor, by ``kthvalue`` (no size limit, unlike torch.quantile)."""
    k = min(max(int(round(q * (x.numel() - 1))) + 1, 1), x.numel())
    return x.kthvalue(k).values


class PercentileObserver(nn.Module):
    def __init__(self, qmin: int, qmax: int, symmetric: bool, percentile: float = 99.99):
        super().__init__()
        if not 90.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile={percentile!r}: must be from 90 to 100")
        self.qmin, self.qmax, self.symmetric, self.percentile = qmin, qmax, symmetric, float(percentile)
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, symmetric={self.symmetric}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach().float().reshape(-1)
        if v.numel() == 0:
            return x
        p = self.percentile / 100.0
        if self.symmetric:
            hi = _kth(v.abs(), p)
            lo = -hi
        else:
            lo, hi = _kth(v, 1.0 - p), _kth(v, p)
        n = self.batches.item()
        self.min_val.copy_((self.min_val * n + lo) / (n + 1))
        self.max_val.copy_((self.max_val * n + hi) / (n + 1))
        self.batches += 1
        return x

    def calculate_qparams(self):
        return qparams_from_range(self.min_val, self.max_val, self.qmin, self.qmax, self.symmetric)


class MSEObserver(nn.Module):
    def __init__(self, qmin: int, qmax: int, symmetric: bool, bins: int = 2048, candidates: int = 128):
        super().__init__()
        self.qmin, self.qmax, self.symmetric = qmin, qmax, symmetric
        self.bins, self.candidates = bins, candidates
        self.register_buffer("histogram", torch.zeros(bins))
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, symmetric={self.symmetric}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.detach().float().reshape(-1)
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            return x
        lo, hi = torch.minimum(v.min(), self.min_val), torch.maximum(v.max(), self.max_val)
        if self.symmetric:  # a histogram symmetric around 0, so candidate ranges [-a, a] are bin edges apart
            m = torch.maximum(-lo, hi)
            lo, hi = -m, m
        if hi <= lo:
            hi = lo + EPS
        if bool(self.histogram.sum() > 0) and (lo < self.min_val or hi > self.max_val):
            self.histogram.copy_(self._rebin(lo, hi))  # the range grew: move old counts (at bin centres)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)
        self.histogram += torch.histc(v, self.bins, min=lo.item(), max=hi.item())
        return x

    def _centers(self, lo=None, hi=None) -> torch.Tensor:
        lo = self.min_val if lo is None else lo
        hi = self.max_val if hi is None else hi
        w = (hi - lo) / self.bins
        return lo + w * (torch.arange(self.bins, device=self.histogram.device) + 0.5)

    def _rebin(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        idx = ((self._centers() - lo) / ((hi - lo) / self.bins)).floor().clamp(0, self.bins - 1).long()
        return torch.zeros_like(self.histogram).index_add_(0, idx, self.histogram)

    def expected_mse(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Expected squared error per element for clip ranges ``[lo, hi]`` (1-D tensors of candidates), from prefix
        sums of the histogram: O(1) per candidate after one O(bins) pass."""
        c, h = self._centers().double(), self.histogram.double()
        zero = torch.zeros(1, dtype=h.dtype, device=h.device)
        p0, p1, p2 = (torch.cat([zero, torch.cumsum(t, 0)]) for t in (h, h * c, h * c * c))
        lo, hi = torch.clamp(lo.double(), max=0.0), torch.clamp(hi.double(), min=0.0)
        i = torch.searchsorted(c, lo)  # bins below lo
        j = torch.searchsorted(c, hi, right=True)  # bins up to hi
        below = p2[i] - 2 * lo * p1[i] + lo * lo * p0[i]
        n_above, s1_above, s2_above = p0[-1] - p0[j], p1[-1] - p1[j], p2[-1] - p2[j]
        above = s2_above - 2 * hi * s1_above + hi * hi * n_above
        inside = p0[-1] - p0[i] - n_above
        step = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(EPS)
        return ((below + above + inside * step * step / 12) / p0[-1].clamp_min(1.0)).float()

    @torch.no_grad()
    def calculate_qparams(self):
        if not bool(self.histogram.sum() > 0):
            return qparams_from_range(torch.tensor(0.0), torch.tensor(1.0), self.qmin, self.qmax, self.symmetric)
        frac = torch.linspace(1.0 / self.candidates, 1.0, self.candidates, device=self.histogram.device)
        lo0, hi0 = torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0)
        if self.symmetric:
            m = torch.maximum(-lo0, hi0) * frac
            best = self.expected_mse(-m, m).argmin()
            lo, hi = -m[best], m[best]
        else:  # search both ends: every (lo fraction, hi fraction) pair
            a, b = torch.meshgrid(frac, frac, indexing="ij")
            los, his = (lo0 * a).reshape(-1), (hi0 * b).reshape(-1)
            best = self.expected_mse(los, his).argmin()
            lo, hi = los[best], his[best]
        return qparams_from_range(lo, hi, self.qmin, self.qmax, self.symmetric)

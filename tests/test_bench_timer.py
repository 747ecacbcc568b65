"""fxqat.bench's interleaved timer: every row runs in every round, row order rotates, spread is IQR / median.
(No timings are asserted: call order and counts, and the spread of given numbers.)"""

from __future__ import annotations

import pytest
import torch

from fxqat.bench import interleaved_medians, interleaved_times, spread


def test_rounds_interleave_and_rotate():
    calls = []
    fns = {k: (lambda x, k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = interleaved_times(fns, torch.zeros(1), rounds=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    per_call = 7  # 2 warm-up + 5 timed calls per row per round
    firsts = [calls[i] for i in range(0, len(calls), 3 * per_call)]
    assert firsts == ["a", "b", "c"]  # each round starts one row later
    assert len(calls) == 3 * 3 * per_call
    assert set(interleaved_medians(fns, torch.zeros(1), rounds=1)) == {"a", "b", "c"}


def test_engines_are_set_per_row():
    seen = {}
    engines = {"q": torch.backends.quantized.supported_engines[-1]}
    fns = {"q": lambda x: seen.setdefault("q", torch.backends.quantized.engine), "f": lambda x: None}
    interleaved_times(fns, torch.zeros(1), rounds=1, engines=engines)
    assert seen["q"] == engines["q"]


@pytest.mark.parametrize("ts,expected", [([10.0], 0.0), ([10.0, 10.0, 10.0], 0.0), ([8.0, 10.0, 12.0], 0.2),
                                         ([9.0, 10.0, 11.0, 30.0], (15.75 - 9.75) / 10.5)])
def test_spread_is_interquartile_range_over_median(ts, expected):
    assert spread(ts) == pytest.approx(expected, abs=1e-9)

"""Each observer on N(0, 1) plus a few outliers at 50: what tells it apart from the others."""

import pytest
import torch

from fxqat.errors import QConfigError
from fxqat.quant.backend import make_observer
from fxqat.quant.fake_quant import FakeQuant
from fxqat.quant.observers import MSEObserver, PercentileObserver
from fxqat.quant.spec import QuantSpec


def _outliers(n=100_000, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:k] = 50.0
    return x


def _fit(kind, xs, bits=8, symmetric=False, **kw):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    obs = make_observer(kind, qmin, qmax, symmetric, None, **kw)
    for x in xs:
        obs(x)
    s, z = obs.calculate_qparams()
    s, z = float(s), int(z)
    hi = (qmax - z) * s  # the largest value the grid represents
    x = torch.cat(list(xs))
    err = float((torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax) - x).square().mean())
    return hi, err


def test_minmax_covers_the_outliers():
    hi, _ = _fit("minmax", [_outliers()])
    assert hi == pytest.approx(50, rel=0.01)


def test_moving_average_follows_later_batches():
    """Batch 1 has the outliers, batches 2..: don't. min/max keeps 50; the moving average decays toward ~4.5."""
    batches = [_outliers()] + [torch.randn(10_000, generator=torch.Generator().manual_seed(i)) for i in range(1, 60)]
    hi_mm, _ = _fit("minmax", batches)
    hi_ma, _ = _fit("moving_average", batches)
    assert hi_mm == pytest.approx(50, rel=0.01)
    # 0.99**59 = 0.55 of the first range left: ~ 0.55 * 50 + 0.45 * 4.3 ≈ 29.6 (±2: the batch maxima vary)
    assert 27 < hi_ma < 32


def test_histogram_is_torch_ao_l2_search():
    from fxqat.quant.backend import HistogramObserver

    assert isinstance(make_observer("histogram", 0, 255, False, None), HistogramObserver)
    hi_h, err_h = _fit("histogram", [_outliers()])
    hi_m, err_m = _fit("minmax", [_outliers()])
    assert hi_h != hi_m and err_h <= err_m  # its search moved the range and did not increase the L2 error


@pytest.mark.parametrize("symmetric", [False, True])
def test_percentile_clips_far_below_the_outliers(symmetric):
    x = _outliers()
    hi, _ = _fit("percentile", [x], symmetric=symmetric)
    # 10 outliers = 0.01 % of the values: the 99.99th percentile of |x| lies in the normal tail, ~3.9..4.5
    assert 3.5 < hi < 5
    hi_999, _ = _fit("percentile", [x], symmetric=symmetric, percentile=99.9)
    assert hi_999 < hi  # the percentile is configurable
    assert _fit("percentile", [x], symmetric=symmetric, percentile=100.0)[0] == pytest.approx(50, rel=0.01)


def test_percentile_running_estimate_is_the_mean_over_batches():
    obs = PercentileObserver(0, 255, False, percentile=100.0)
    obs(torch.tensor([0.0, 2.0]))
    obs(torch.tensor([0.0, 4.0]))
    assert float(obs.max_val) == pytest.approx(3.0) and int(obs.batches) == 2
    assert set(obs.state_dict()) == {"min_val", "max_val", "batches"}


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_minimizes_the_quantization_error(symmetric):
    x = _outliers()
    # 8 bits: keeping the outliers is worth it, but mse still trims the range and beats minmax's error
    _, err_mm = _fit("minmax", [x], symmetric=symmetric)
    hi, err = _fit("mse", [x], symmetric=symmetric)
    assert err < err_mm
    # 4 bits: minmax's step (~3.6) costs ~1.0 per value; clipping the 10 outliers to ~4 costs ~0.21: mse clips
    hi4_mm, err4_mm = _fit("minmax", [x], bits=4, symmetric=symmetric)
    hi4, err4 = _fit("mse", [x], bits=4, symmetric=symmetric)
    _, err4_p = _fit("percentile", [x], bits=4, symmetric=symmetric)
    assert hi4 < 10 < 45 < hi4_mm
    assert err4 < 0.3 * err4_mm and err4 <= err4_p * 1.02  # ≤ percentile's up to the histogram's bin error (2 %)


def test_mse_histogram_keeps_counts_when_the_range_grows():
    obs = MSEObserver(0, 255, False)
    obs(torch.linspace(-1, 1, 1000))
    obs(torch.linspace(-10, 10, 500))
    assert float(obs.histogram.sum()) == 1500 and float(obs.min_val) == -10 and float(obs.max_val) == 10
    # the expected MSE from the histogram is the measured one (bin centres vs exact values: within 5 %)
    x = torch.cat([torch.linspace(-1, 1, 1000), torch.linspace(-10, 10, 500)])
    s, z = obs.calculate_qparams()
    lo, hi = (0 - int(z)) * float(s), (255 - int(z)) * float(s)
    err = float((torch.fake_quantize_per_tensor_affine(x, float(s), int(z), 0, 255) - x).square().mean())
    assert float(obs.expected_mse(torch.tensor([lo]), torch.tensor([hi]))) == pytest.approx(err, rel=0.05)


def test_observer_state_in_fake_quant_state_dict():
    fq = FakeQuant(QuantSpec(observer="mse")).train()
    fq(_outliers())
    sd = fq.state_dict()
    assert {"observer.histogram", "observer.min_val", "observer.max_val"} <= set(sd)
    again = FakeQuant(QuantSpec(observer="mse"))
    again.load_state_dict(sd)
    assert torch.equal(again.observer.calculate_qparams()[0], fq.observer.calculate_qparams()[0])


@pytest.mark.parametrize("bad", [89.9, 100.5, "high", True])
def test_percentile_value_is_validated(bad):
    with pytest.raises(QConfigError, match="percentile"):
        QuantSpec(observer="percentile", percentile=bad)


def test_wider_than_8_bit_grids_prepare_and_use_their_range():
    """12-bit weights and 16-bit activations: torch.ao's observers need a qint32 dtype for such ranges."""
    import fxqat
    from fxqat.modules.conv_bn_act import ConvBnAct

    m = fxqat.prepare_qat("yolov8n.yaml", "version: 1\nweight: {bits: 12}\nactivation: {bits: 16}\n")
    fxqat.calibrate(m, [torch.rand(1, 3, 64, 64)], progress=False)
    conv = next(mod for mod in m.modules() if isinstance(mod, ConvBnAct))
    codes = conv.weight_codes()[0]
    assert codes.min() >= -2048 and codes.max() <= 2047 and codes.abs().max() >= 2047  # the 12-bit grid, used to its end
    assert codes.unique().numel() > 256

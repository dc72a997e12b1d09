"""nnmark.calibrate: the null match-rate distribution and the empirical false-positive
rate at the threshold in use, checked on synthetic nulls whose true FPR is known."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import binom

import nnmark


class RandomLogits(torch.nn.Module):
    """A null model: fixed random logits for any input batch (independent of any key)."""

    def __init__(self, seed: int, n: int, classes: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("out", torch.randn(n, classes, generator=g))

    def forward(self, x):
        return self.out[: x.shape[0]]


def _sd_tolerance(p: float, m: int) -> float:
    return 4 * (p * (1 - p) / m) ** 0.5 + 1e-9


def test_whitebox_calibration_fpr_matches_binomial_tail():
    torch.manual_seed(0)
    key = nnmark.WhiteBoxKey.generate(carrier="w", bits=64, reduction="flat")
    nulls = [{"w": torch.randn(300)} for _ in range(600)]
    cal = nnmark.calibrate(key, nulls, alpha=0.05)
    true_fpr = binom.sf(cal.nominal_threshold - 1, 64, 0.5)  # exact P[matches >= threshold] under the null
    assert cal.n_models == 600 and cal.n == 64 and len(cal.rates) == 600
    assert true_fpr <= 0.05
    assert abs(cal.false_positive_rate - true_fpr) <= _sd_tolerance(true_fpr, 600)
    assert cal.false_positives == round(cal.false_positive_rate * 600)
    assert abs(cal.null_rate - 0.5) < 0.02 and cal.max_rate >= cal.null_rate
    assert cal.null_rate_used == 0.5


def test_trigger_calibration_fpr_and_null_rate():
    tkey = nnmark.TriggerKey.generate(kind="abstract", n=50, num_classes=4, input_shape=(1, 4, 4))
    nulls = [RandomLogits(s, 50, 4) for s in range(400)]
    cal = nnmark.calibrate(tkey, nulls, alpha=0.05)
    true_fpr = binom.sf(cal.nominal_threshold - 1, 50, 0.25)
    assert cal.null_rate_used == pytest.approx(0.25)
    assert abs(cal.null_rate - 0.25) < 0.02  # random top-1 hits the label 1 time in 4
    assert abs(cal.false_positive_rate - true_fpr) <= _sd_tolerance(true_fpr, 400)


def test_calibrated_null_rate_controls_a_biased_null():
    """Null models that favour the target class: 1/C understates chance; the measured rate does not."""
    samples = torch.rand(60, 1, 4, 4)
    tkey = nnmark.TriggerKey.generate(kind="unrelated", samples=samples, num_classes=4, target=1)

    class Biased(torch.nn.Module):  # predicts class 1 about 40% of the time, whatever the key
        def __init__(self, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            out = torch.randn(60, 4, generator=g)
            out[torch.rand(60, generator=g) < 0.4, 1] += 10
            self.register_buffer("out", out)

        def forward(self, x):
            return self.out[: x.shape[0]]

    nulls = [Biased(s) for s in range(200)]
    naive = nnmark.calibrate(tkey, nulls, alpha=1e-3)
    assert naive.null_rate > 0.4 and naive.false_positive_rate > 0.5  # 1/C = 0.25 is far too low here
    fresh = [Biased(1000 + s) for s in range(200)]
    cal = nnmark.calibrate(tkey, fresh, alpha=1e-3, null_rate=naive.null_rate)
    assert cal.null_rate_used == pytest.approx(naive.null_rate)
    assert cal.false_positive_rate <= 0.02


def test_calibrate_rejects_empty_and_unreadable(tmp_path):
    key = nnmark.WhiteBoxKey.generate(carrier="w", bits=32, reduction="flat")
    with pytest.raises(ValueError, match="at least 10 null models"):
        nnmark.calibrate(key, [])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be checked"):
        nnmark.calibrate(key, [{"w": torch.randn(10)}] * 9 + [str(bad)])

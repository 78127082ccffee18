"""The ratio test of memorization: formula, chunked search, bootstrap interval, controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_prune.data import balanced_subset, digits_split
from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import (
    bootstrap_interval,
    chunk_shape,
    memorization_report,
    nearest_two,
    ratio_histogram,
)


def _points(*values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(len(values), 1, 1, -1)  # (N, 1, 1, P)


SCALE = 1 / 30  # the points below, scaled into the images' [-1, 1] (ratios do not change)
TRAIN = _points([0.0, 0.0], [4 * SCALE, 0.0], [0.0, 1.0])


def test_exact_copy_has_ratio_zero_and_is_memorized() -> None:
    report = memorization_report(TRAIN[1:2].clone(), TRAIN)
    assert report.d1.item() == 0.0
    assert report.d2.item() == pytest.approx(4 * SCALE)
    assert report.ratios.item() == 0.0
    assert report.nearest.item() == 1
    assert report.memorized.tolist() == [True]
    assert report.rate == 1.0


def test_midpoint_between_two_training_images_has_ratio_one() -> None:
    report = memorization_report(_points([2 * SCALE, 0.0]), TRAIN)
    assert report.d1.item() == pytest.approx(2 * SCALE)
    assert report.d2.item() == pytest.approx(2 * SCALE)
    assert report.ratios.item() == pytest.approx(1.0)
    assert report.rate == 0.0


def test_far_point_is_not_memorized() -> None:
    report = memorization_report(_points([-1.0, -1.0]), TRAIN)
    assert report.ratios.item() > 0.9
    assert not report.memorized.item()


def test_threshold_is_strictly_one_third() -> None:
    # train at 0 and 4 on a line: a sample at x has d1 = x, d2 = 4 - x; ratio 1/3 at x = 1
    train = _points([0.0], [0.4])
    report = memorization_report(_points([0.099], [0.101], [0.05]), train)
    assert report.memorized.tolist() == [True, False, True]
    assert report.ratios[2].item() == pytest.approx(0.5 / 3.5, rel=1e-5)


def test_chunking_does_not_change_results() -> None:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(37, 1, 4, 4, generator=gen)
    samples = torch.randn(23, 1, 4, 4, generator=gen)
    whole = nearest_two(samples, train)
    tiny = nearest_two(samples, train, chunk_elements=7)
    for a, b in zip(whole, tiny, strict=True):
        assert torch.allclose(a.float(), b.float())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 12), st.integers(2, 12), st.integers(1, 6), st.integers(2, 50),
       st.integers(0, 10_000))
def test_matches_brute_force(n: int, m: int, p: int, chunk: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randn(n, 1, 1, p, generator=gen)
    train = torch.randn(m, 1, 1, p, generator=gen)
    d1, d2, nearest = nearest_two(samples, train, chunk_elements=chunk)
    dist = torch.cdist(samples.view(n, p).double(), train.view(m, p).double())  # (n, m)
    best = dist.sort(dim=1).values
    assert torch.allclose(d1.double(), best[:, 0], atol=1e-5)
    assert torch.allclose(d2.double(), best[:, 1], atol=1e-5)
    assert torch.allclose(dist.gather(1, nearest.view(-1, 1)).squeeze(1), best[:, 0], atol=1e-5)


def test_chunk_shape_bounds_the_block() -> None:
    rows, cols = chunk_shape(10_000, 50_000, 1 << 25, dim=3072)
    assert rows * cols <= 1 << 25 and rows * 3072 <= 1 << 25 and cols == 50_000
    assert chunk_shape(5, 3, 1000) == (5, 3)


def test_bootstrap_interval_behaviour() -> None:
    assert bootstrap_interval(torch.ones(50)) == (1.0, 1.0)
    assert bootstrap_interval(torch.zeros(50)) == (0.0, 0.0)
    hits = torch.tensor([1, 0] * 500)
    low, high = bootstrap_interval(hits)
    assert low < 0.5 < high
    # normal approximation: half-width 1.96 * sqrt(0.25 / 1000) = 0.031
    assert 0.02 < (high - low) / 2 < 0.045
    assert bootstrap_interval(hits, seed=3) == bootstrap_interval(hits, seed=3)
    wide = bootstrap_interval(torch.tensor([1, 0] * 20))
    assert wide[1] - wide[0] > high - low  # fewer samples, wider interval
    assert all(np.isnan(bootstrap_interval(torch.zeros(0))))


def test_shared_resamples_give_the_intervals_drawn_afresh(monkeypatch) -> None:
    from dit_prune.metrics import bootstrap
    from dit_prune.metrics.bootstrap import resample_counts, shared_resamples

    gen = torch.Generator().manual_seed(0)
    vectors = [(torch.rand(n, generator=gen) < p).float() for n in (300, 40) for p in (0.1, 0.6)]
    afresh = [bootstrap_interval(hits, seed=seed) for seed in (0, 1) for hits in vectors]
    with shared_resamples():
        shared = [bootstrap_interval(hits, seed=seed) for seed in (0, 1) for hits in vectors]
        assert shared == afresh  # bit for bit
        assert shared[0] != shared[len(vectors)]  # seeds 0 and 1 are kept apart
        kept = resample_counts(300, 2000, 0)
        assert resample_counts(300, 2000, 0) is kept  # drawn once, reused
        assert resample_counts(300, 2000, 1) is not kept
        with shared_resamples():  # nested: the outer block's counts
            assert resample_counts(300, 2000, 0) is kept
        monkeypatch.setattr(bootstrap, "MAX_SHARED_COUNTS", 1000)
        big = resample_counts(301, 2000, 0)
        assert resample_counts(301, 2000, 0) is not big  # too large to keep
        assert np.array_equal(resample_counts(301, 2000, 0), big)
    assert resample_counts(300, 2000, 0) is not kept  # nothing kept after the block
    assert np.array_equal(resample_counts(300, 2000, 0), kept)
    assert not kept.flags.writeable


def test_most_replicated_and_histogram() -> None:
    report = memorization_report(torch.cat([TRAIN[:1], TRAIN[:1], TRAIN[1:2]]), TRAIN)
    assert report.most_replicated() == [(0, 2), (1, 1)]
    assert report.summary()["distinct_training_images_copied"] == 2
    hist = ratio_histogram(report.ratios, bins=4)
    assert hist["counts"] == [3, 0, 0, 0] and len(hist["edges"]) == 5


def test_bad_input() -> None:
    with pytest.raises(DitPruneError, match="at least 2 training images"):
        memorization_report(TRAIN[:1], TRAIN[:1])
    with pytest.raises(DitPruneError, match="same scale and shape"):
        memorization_report(torch.zeros(2, 1, 1, 3), TRAIN)
    with pytest.raises(DitPruneError, match="NaN"):
        memorization_report(torch.full((1, 1, 1, 2), float("nan")), TRAIN)
    with pytest.raises(DitPruneError, match=r"train_images: .*expected \[-1, 1\]"):
        memorization_report(TRAIN, TRAIN * 30)


def test_controls_on_digits() -> None:
    split = digits_split()
    train = split.pool_images[balanced_subset(split.pool_labels, 64, seed=0)]
    assert memorization_report(train, train).rate == 1.0
    assert memorization_report(split.heldout_images, train).rate < 0.02
    assert memorization_report(split.heldout_images, split.pool_images).rate < 0.05

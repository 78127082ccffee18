"""Fréchet distance: closed-form Gaussians, an independent scipy implementation, statistics,
caching, the bootstrap interval, the few-samples warning, and precision/recall."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from dit_prune.data import digits_split
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import default_checkpoints_dir
from dit_prune.metrics.features import load_feature_extractor
from dit_prune.metrics.fid import (
    FeatureStats,
    FewSamplesWarning,
    fd_bootstrap_interval,
    fd_report,
    feature_stats,
    frechet_distance,
    reference_key,
    reference_stats,
)
from dit_prune.metrics.precision_recall import knn_radii, precision_recall


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's sqrtm (as in pytorch-fid), for comparison only."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q  # (d, d) orthogonal


def test_closed_form_gaussians_sharing_eigenvectors() -> None:
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FD = |m1 - m2|^2 + sum (sqrt a - sqrt b)^2
    d = 6
    q = _rotation(d, 0)
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 9.0], dtype=torch.float64)
    b = torch.tensor([4.0, 2.0, 1.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    m1 = torch.zeros(d, dtype=torch.float64)
    m2 = torch.arange(d, dtype=torch.float64)
    s1 = FeatureStats.from_moments(m1, q @ torch.diag(a) @ q.T, 100)
    s2 = FeatureStats.from_moments(m2, q @ torch.diag(b) @ q.T, 100)
    expected = float((m1 - m2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(s1, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(s2, s1) == pytest.approx(expected, rel=1e-10)


def test_closed_form_isotropic_scaling() -> None:
    # N(0, I) vs N(0, 4 I) in d dims: FD = d * (1 - 2)^2 = d
    d = 5
    eye = torch.eye(d, dtype=torch.float64)
    s1 = FeatureStats.from_moments(torch.zeros(d), eye, 10)
    s2 = FeatureStats.from_moments(torch.zeros(d), 4 * eye, 10)
    assert frechet_distance(s1, s2) == pytest.approx(d, rel=1e-12)


def test_sampled_gaussians_approach_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20_000, 3, generator=gen, dtype=torch.float64)
    y = 2 * torch.randn(20_000, 3, generator=gen, dtype=torch.float64) + 1
    # mean shift 1 in 3 dims (3) + 3 * (1 - 2)^2 (3) = 6
    assert frechet_distance(x, y) == pytest.approx(6.0, rel=0.03)


def test_matches_an_independent_scipy_implementation() -> None:
    gen = torch.Generator().manual_seed(2)
    mixing = torch.randn(8, 8, generator=gen)
    a = torch.randn(300, 8, generator=gen) @ mixing  # non-commuting covariances
    b = torch.randn(400, 8, generator=gen) @ mixing.T + 0.3
    assert frechet_distance(a, b) == pytest.approx(direct_fd(a.double().numpy(),
                                                             b.double().numpy()), rel=1e-6)


def test_matches_torchmetrics_when_installed() -> None:
    import torchmetrics.image.fid as tm  # a test dependency: checks our FD against theirs
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(200, 4, generator=gen), torch.randn(300, 4, generator=gen) * 1.5
    theirs = tm._compute_fid(a.double().mean(0), torch.cov(a.double().T),
                             b.double().mean(0), torch.cov(b.double().T))
    assert frechet_distance(a, b) == pytest.approx(float(theirs), rel=1e-6)


def test_identical_sets_give_zero_and_stats_equal_features() -> None:
    feats = torch.randn(100, 4, generator=torch.Generator().manual_seed(4))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    stats = FeatureStats.empty(4)
    for chunk in feats.split(7):
        stats.update(chunk)
    assert stats.total.dtype == torch.float64 and stats.count == 100
    assert torch.allclose(stats.cov, torch.cov(feats.double().T))
    assert frechet_distance(stats, feats) == pytest.approx(0.0, abs=1e-8)


def test_few_samples_warn_and_are_marked() -> None:
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(500, 16, generator=gen)
    with pytest.warns(FewSamplesWarning, match="feature dimension 16"):
        frechet_distance(torch.randn(10, 16, generator=gen), ref)
    with pytest.warns(FewSamplesWarning):
        result = fd_report(torch.randn(10, 16, generator=gen), ref, "toy", num_resamples=20)
    assert result.warning is not None and "10 generated samples" in result.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fd_report(torch.randn(50, 16, generator=gen), ref, "toy", 20).warning is None


def test_bad_input() -> None:
    with pytest.raises(DitPruneError, match="NaN"):
        frechet_distance(torch.full((5, 2), float("nan")), torch.zeros(5, 2))
    with pytest.raises(DitPruneError, match="dimensions differ"):
        frechet_distance(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(DitPruneError, match="at least 2 samples"):
        FeatureStats.from_features(torch.randn(1, 2)).cov  # noqa: B018


def test_bootstrap_interval_brackets_the_estimate() -> None:
    gen = torch.Generator().manual_seed(6)
    ref = torch.randn(2000, 4, generator=gen)
    feats = torch.randn(500, 4, generator=gen) + 0.5  # FD ~ 4 * 0.25 = 1
    result = fd_report(feats, ref, "toy", num_resamples=200)
    low, high = result.interval
    assert low <= result.value <= high
    assert 0.4 < low and high < 2.0
    assert fd_bootstrap_interval(feats, ref, 50, seed=1) == fd_bootstrap_interval(feats, ref, 50,
                                                                                  seed=1)
    assert result.label == "FD_toy"


def test_statistics_save_load_and_reference_cache(tmp_path) -> None:
    extractor = load_feature_extractor(default_checkpoints_dir() / "digits-features")
    images = digits_split().heldout_images[:300]
    first = reference_stats(images, extractor, tmp_path)
    files = list(tmp_path.glob("digitsnet-*.safetensors"))
    assert len(files) == 1 and first.key in files[0].name
    again = reference_stats(images, extractor, tmp_path)
    assert torch.equal(again.stats.outer, first.stats.outer)
    assert torch.equal(again.features, first.features)
    assert again.stats.count == 300 and again.stats.extractor == "digitsnet"
    assert reference_key(images[:299], extractor) != first.key
    stats, _ = feature_stats(images, extractor)
    stats.save(tmp_path / "s.safetensors")
    loaded = FeatureStats.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.total, stats.total) and loaded.count == stats.count


def test_digits_controls() -> None:
    split = digits_split()
    extractor = load_feature_extractor(default_checkpoints_dir() / "digits-features")
    held = extractor.features(split.heldout_images)  # (797, 64)
    pool = extractor.features(split.pool_images)  # (1000, 64)
    assert frechet_distance(held, held) == pytest.approx(0.0, abs=1e-6)
    fd_pool = frechet_distance(pool, held)
    assert 0.5 < fd_pool < 15.0  # small and positive
    ones = extractor.features(split.pool_images[split.pool_labels == 1])
    assert frechet_distance(ones, held) > 20 * fd_pool  # one class only: far


def test_precision_recall() -> None:
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(300, 3, generator=gen)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    collapsed = real[:5].repeat(20, 1) + 1e-3 * torch.randn(100, 3, generator=gen)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.2  # copies of few real points: precise, no coverage
    chunked = precision_recall(real, collapsed, chunk_elements=50)
    assert chunked == (precision, recall)
    radii = knn_radii(torch.tensor([[0.0], [1.0], [3.0], [7.0]]), k=1)
    assert radii.tolist() == [1.0, 1.0, 2.0, 4.0]
    with pytest.raises(DitPruneError):
        precision_recall(real, torch.randn(10, 4))
    assert math.isclose(precision_recall(real, real, k=1)[0], 1.0)

"""Fréchet distance between Gaussian fits of two feature sets (FID when the features are
Inception-v3 pool features), with statistics accumulated in float64 and cached per reference set.

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)

The last trace equals tr((S_a S_b)^1/2) (same eigenvalues) and is computed from a symmetric
eigendecomposition, so it stays real and needs no scipy. Covariances are unbiased (divide by n-1).
With n <= D samples a covariance is singular and FD is biased upwards: a `FewSamplesWarning` is
raised and `FDResult.warning` says so.

Example:
    >>> a = torch.randn(2000, 3, generator=torch.Generator().manual_seed(0))
    >>> round(frechet_distance(a, a + 1.0), 3)  # mean shift of 1 in each of 3 dims
    3.0
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dit_prune.checkpoint import atomic_write_with
from dit_prune.errors import DitPruneError
from dit_prune.metrics.features import FeatureExtractor

STATS_BATCH = 500  # images per feature batch when accumulating statistics
PR_REFERENCE_MAX = 10_000  # reference features kept (seeded subset) for precision/recall


class FewSamplesWarning(UserWarning):
    """Fewer samples than the feature dimension: the covariance is singular, FD is biased."""


def few_samples_message(num_samples: int, feature_dim: int, what: str = "samples") -> str | None:
    """The warning text when `num_samples` cannot give a full-rank covariance, else None."""
    if num_samples <= feature_dim:
        return (f"{num_samples} {what} <= feature dimension {feature_dim}: covariance is singular "
                f"and FD is biased; use more than {feature_dim} (ideally >= 1,000)")
    return None


@dataclass
class FeatureStats:
    """Running count, sum and sum of outer products of features, float64 (no features kept).

    Example:
        >>> stats = FeatureStats.empty(2)
        >>> stats.update(torch.tensor([[0.0, 0.0], [2.0, 2.0]]))
        >>> stats.mean.tolist(), stats.cov.tolist()
        ([1.0, 1.0], [[2.0, 2.0], [2.0, 2.0]])
    """

    count: int
    total: torch.Tensor  # (D,) float64
    outer: torch.Tensor  # (D, D) float64
    extractor: str = ""

    @classmethod
    def empty(cls, feature_dim: int, extractor: str = "") -> FeatureStats:
        return cls(0, torch.zeros(feature_dim, dtype=torch.float64),
                   torch.zeros(feature_dim, feature_dim, dtype=torch.float64), extractor)

    @classmethod
    def from_features(cls, feats: torch.Tensor, extractor: str = "") -> FeatureStats:
        stats = cls.empty(_check_features(feats, "features").shape[1], extractor)
        stats.update(feats)
        return stats

    @classmethod
    def from_moments(cls, mean: torch.Tensor, cov: torch.Tensor, count: int,
                     extractor: str = "") -> FeatureStats:
        """Statistics with a given mean (D,), unbiased covariance (D, D) and sample count."""
        mu, sigma = mean.to(torch.float64), cov.to(torch.float64)
        if sigma.shape != (len(mu), len(mu)) or count < 2:
            raise DitPruneError(f"need a (D,) mean, a (D, D) covariance and count >= 2, got "
                                f"{tuple(mu.shape)}, {tuple(sigma.shape)}, {count}")
        return cls(count, count * mu, (count - 1) * sigma + count * torch.outer(mu, mu),
                   extractor)

    @property
    def feature_dim(self) -> int:
        return int(self.total.shape[0])

    def update(self, feats: torch.Tensor) -> None:
        """Add a batch of features (B, D)."""
        x = _check_features(feats, "features").detach().to("cpu", torch.float64)  # (B, D)
        if x.shape[1] != self.feature_dim:
            raise DitPruneError(f"features have dimension {x.shape[1]}, statistics "
                                f"{self.feature_dim}")
        self.count += len(x)
        self.total += x.sum(0)  # (D,)
        self.outer += x.T @ x  # (D, D)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)  # (D,)

    @property
    def cov(self) -> torch.Tensor:
        if self.count < 2:
            raise DitPruneError(f"a covariance needs at least 2 samples, got {self.count}")
        mu = self.mean  # (D,)
        return (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)  # (D, D)

    def save(self, path: str | Path, key: str = "") -> None:
        """Write as safetensors (atomically); `key` is stored in the metadata."""
        tensors = {"count": torch.tensor([self.count], dtype=torch.int64),
                   "total": self.total.contiguous(), "outer": self.outer.contiguous()}
        meta = {"extractor": self.extractor, "key": key}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        tensors, meta = _load_tensors(Path(path))
        return cls(int(tensors["count"][0]), tensors["total"], tensors["outer"],
                   meta.get("extractor", ""))


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise DitPruneError(f"corrupt feature statistics file {path}: {exc}") from None


def _check_features(feats: torch.Tensor, what: str) -> torch.Tensor:
    if feats.ndim != 2:
        raise DitPruneError(f"{what}: expected (N, D) features, got {tuple(feats.shape)}")
    if not torch.isfinite(feats).all():
        raise DitPruneError(f"{what} contain NaN or infinite values")
    return feats


def _as_stats(x: torch.Tensor | FeatureStats, what: str) -> FeatureStats:
    if isinstance(x, FeatureStats):
        return x
    return FeatureStats.from_features(_check_features(x, what))


def frechet_distance(a: torch.Tensor | FeatureStats, b: torch.Tensor | FeatureStats) -> float:
    """FD between the Gaussian fits of two feature sets, each (N, D) features or FeatureStats.

    Warns (FewSamplesWarning) when either side has n <= D samples.
    """
    sa, sb = _as_stats(a, "first features"), _as_stats(b, "second features")
    if sa.feature_dim != sb.feature_dim:
        raise DitPruneError(f"feature dimensions differ: {sa.feature_dim} vs {sb.feature_dim}")
    for stats, what in ((sa, "first set"), (sb, "second set")):
        message = few_samples_message(stats.count, stats.feature_dim, f"samples in the {what}")
        if message:
            warnings.warn(message, FewSamplesWarning, stacklevel=2)
    return _fd(sa.mean, sa.cov, sb.mean, _sqrt_psd(sb.cov))


def _sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (negative rounding eigenvalues clipped to 0)."""
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)  # (D,), (D, D)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T  # (D, D)


def _fd(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor,
        sqrt_cov_b: torch.Tensor) -> float:
    diff = mu_a - mu_b  # (D,)
    middle = sqrt_cov_b @ cov_a @ sqrt_cov_b  # (D, D) symmetric PSD, same spectrum as S_a S_b
    eig = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0)  # (D,)
    trace_b = (sqrt_cov_b * sqrt_cov_b).sum()  # tr(S_b) = |S_b^1/2|_F^2
    value = diff @ diff + torch.trace(cov_a) + trace_b - 2 * eig.sqrt().sum()
    return max(0.0, float(value))  # tiny negative values are rounding


def fd_bootstrap_interval(
    feats: torch.Tensor, reference: torch.Tensor | FeatureStats, num_resamples: int = 200,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of FD, resampling the generated features `feats` (N, D).

    The reference (held-out real images) is a fixed set and is not resampled. The percentile
    interval of the resampled FDs is shifted down by their mean excess over the FD of `feats`
    (the bootstrap bias estimate), since FD of a resample with duplicates is biased upwards.
    """
    x = _check_features(feats, "features").detach().to("cpu", torch.float64)  # (N, D)
    ref = _as_stats(reference, "reference")
    if len(x) < 2 or num_resamples < 1:  # no interval without samples or resamples
        return (float("nan"), float("nan"))
    sqrt_ref, n = _sqrt_psd(ref.cov), len(x)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), num_resamples)  # (R, N)
    values = []
    for row in torch.from_numpy(counts).to(torch.float64):  # (N,) resample weights
        mu = row @ x / n  # (D,)
        cov = ((x * row[:, None]).T @ x - n * torch.outer(mu, mu)) / (n - 1)  # (D, D)
        values.append(_fd(mu, cov, ref.mean, sqrt_ref))
    # FD is biased upwards and resampling with replacement adds duplicates, which inflates it
    # further: shift the percentile interval by the bootstrap's own bias estimate so that it
    # brackets the estimate from the actual samples (bias-corrected percentile interval).
    bias = max(0.0, float(np.mean(values)) - _fd(x.mean(0), torch.cov(x.T).reshape(
        x.shape[1], x.shape[1]), ref.mean, sqrt_ref))
    alpha = (1 - level) / 2
    low, high = np.quantile(values, alpha) - bias, np.quantile(values, 1 - alpha) - bias
    return (max(0.0, float(low)), max(0.0, float(high)))


@dataclass(frozen=True)
class PairedFDChange:
    """Relative FD change after/before - 1 on the same seeds, with a paired bootstrap interval."""

    relative: float  # FD_after / FD_before - 1
    interval: tuple[float, float]  # 95% percentile interval of the resampled relative changes
    num_resamples: int


def paired_fd_change(
    feats_before: torch.Tensor, feats_after: torch.Tensor, reference: torch.Tensor | FeatureStats,
    num_resamples: int = 200, seed: int = 0, level: float = 0.95,
) -> PairedFDChange:
    """FD_after / FD_before - 1 with a *paired* bootstrap: rows i of both feature sets (N, D) come
    from the same seed, and each resample draws the same seeds for before and after.

    Resampling the two arms independently (as `fd_bootstrap_interval` of each does) treats their
    sampling noise as unrelated; on shared seeds most of it cancels in the difference, so the
    paired interval of the change is much narrower (Efron & Tibshirani 1993, ch. 8, the paired
    bootstrap). The reference statistics are fixed and not resampled.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ref = torch.randn(500, 4, generator=g)
        >>> a = torch.randn(300, 4, generator=g)
        >>> change = paired_fd_change(a, a + 0.5, ref, num_resamples=50)
        >>> change.relative > 0 and change.interval[0] > 0
        True
    """
    xa = _check_features(feats_before, "before features").detach().to("cpu", torch.float64)
    xb = _check_features(feats_after, "after features").detach().to("cpu", torch.float64)
    if xa.shape != xb.shape:
        raise DitPruneError(f"paired FD: before {tuple(xa.shape)} and after {tuple(xb.shape)} "
                            "must be features of the same seeds")
    ref = _as_stats(reference, "reference")
    sqrt_ref, n = _sqrt_psd(ref.cov), len(xa)

    def fd_of(x: torch.Tensor, weights: torch.Tensor | None) -> float:
        if weights is None:
            return _fd(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]), ref.mean,
                       sqrt_ref)
        mu = weights @ x / n  # (D,)
        cov = ((x * weights[:, None]).T @ x - n * torch.outer(mu, mu)) / (n - 1)  # (D, D)
        return _fd(mu, cov, ref.mean, sqrt_ref)

    point = fd_of(xb, None) / max(fd_of(xa, None), 1e-12) - 1
    if n < 2 or num_resamples < 1:
        return PairedFDChange(point, (float("nan"), float("nan")), 0)
    rng = np.random.default_rng(seed)
    counts = torch.from_numpy(rng.multinomial(n, np.full(n, 1.0 / n), num_resamples))  # (R, N)
    changes = [fd_of(xb, w) / max(fd_of(xa, w), 1e-12) - 1 for w in counts.to(torch.float64)]
    alpha = (1 - level) / 2
    interval = (float(np.quantile(changes, alpha)), float(np.quantile(changes, 1 - alpha)))
    return PairedFDChange(point, interval, num_resamples)


@dataclass(frozen=True)
class FDResult:
    """FD with its bootstrap interval; `warning` is set when n <= D."""

    value: float
    interval: tuple[float, float]
    num_samples: int
    feature_dim: int
    extractor: str
    warning: str | None = None

    @property
    def label(self) -> str:
        """`FID_inception` for NVIDIA's Inception, `FD_<name>` otherwise."""
        return "FID_inception" if self.extractor == "inception" else f"FD_{self.extractor}"


def fd_report(
    feats: torch.Tensor, reference: torch.Tensor | FeatureStats, extractor: str = "",
    num_resamples: int = 200, seed: int = 0,
) -> FDResult:
    """FD of generated features (N, D) against a reference, with interval and few-sample flag."""
    ref = _as_stats(reference, "reference")
    warning = few_samples_message(len(feats), ref.feature_dim, "generated samples") or \
        few_samples_message(ref.count, ref.feature_dim, "reference images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewSamplesWarning)  # re-raised once below
        value = frechet_distance(feats, ref)
        interval = fd_bootstrap_interval(feats, ref, num_resamples, seed)
    if warning:
        warnings.warn(warning, FewSamplesWarning, stacklevel=2)
    return FDResult(value, interval, len(feats), ref.feature_dim,
                    extractor or ref.extractor, warning)


@dataclass(frozen=True)
class ReferenceSet:
    """Statistics of a reference image set plus a seeded subset of its features (for P/R)."""

    stats: FeatureStats
    features: torch.Tensor  # (K, D) float32, K <= PR_REFERENCE_MAX
    key: str


def reference_key(images: torch.Tensor, extractor: FeatureExtractor) -> str:
    """Hash of the reference images (values and shape) + extractor name + weights fingerprint."""
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(f"{extractor.name}:{getattr(extractor, 'fingerprint', '')}".encode())
    return digest.hexdigest()[:20]


def feature_stats(
    images: torch.Tensor, extractor: FeatureExtractor, keep: int = 0, seed: int = 0,
    progress: bool = False,
) -> tuple[FeatureStats, torch.Tensor]:
    """Statistics of `extractor` features of images (N, C, H, W) in [-1, 1], batch by batch.

    Also returns a seeded random subset of at most `keep` features (K, D) (for precision/recall).
    """
    chosen = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(images))
                                      [:keep])) if keep else torch.empty(0, dtype=torch.long)
    stats: FeatureStats | None = None
    kept: list[torch.Tensor] = []
    bar = tqdm(total=len(images), desc=f"features ({extractor.name})", disable=not progress)
    for start in range(0, len(images), STATS_BATCH):
        feats = extractor.features(images[start : start + STATS_BATCH])  # (B, D)
        if stats is None:
            stats = FeatureStats.empty(feats.shape[1], extractor.name)
        stats.update(feats)
        local = chosen[(chosen >= start) & (chosen < start + len(feats))] - start
        kept.append(feats[local].float())
        bar.update(len(feats))
    bar.close()
    if stats is None:
        raise DitPruneError("no images to compute feature statistics on")
    return stats, torch.cat(kept)


def reference_stats(
    images: torch.Tensor, extractor: FeatureExtractor, cache_dir: str | Path | None = None,
    progress: bool = False,
) -> ReferenceSet:
    """Reference statistics (+ P/R feature subset), read from / written to `cache_dir` if given.

    The cache file is `<cache_dir>/<extractor name>-<key>.safetensors`, key = `reference_key`.
    """
    key = reference_key(images, extractor)
    path = Path(cache_dir) / f"{extractor.name}-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        tensors, meta = _load_tensors(path)
        if meta.get("key") == key:
            stats = FeatureStats(int(tensors["count"][0]), tensors["total"], tensors["outer"],
                                 meta.get("extractor", extractor.name))
            return ReferenceSet(stats, tensors["pr_features"], key)
    stats, kept = feature_stats(images, extractor, keep=PR_REFERENCE_MAX, progress=progress)
    if path is not None:
        tensors = {"count": torch.tensor([stats.count], dtype=torch.int64),
                   "total": stats.total, "outer": stats.outer, "pr_features": kept.contiguous()}
        meta = {"extractor": extractor.name, "key": key}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return ReferenceSet(stats, kept, key)

"""The nearest-neighbour ratio test of memorization (Yoon et al. 2023; Gu et al. 2023).

A generated image x is memorized when d1/d2 < 1/3, with d1, d2 the L2 distances (pixel space,
same scale as the training images) to its nearest and second-nearest training image.

Images are on the training images' scale, [-1, 1]; uint8 or out-of-range pixels, NaN/inf and
shape mismatches are one-line `DitPruneError`s naming the argument.

Example:
    >>> train = torch.tensor([[[[-1.0]]], [[[0.0]]], [[[1.0]]]])  # (3, 1, 1, 1)
    >>> samples = torch.tensor([[[[-1.0]]], [[[0.5]]]])  # an exact copy, a midpoint
    >>> report = memorization_report(samples, train)
    >>> report.memorized.tolist(), report.rate
    ([True, False], 0.5)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from dit_prune.data import check_images
from dit_prune.errors import DitPruneError
from dit_prune.metrics.bootstrap import resample_counts

MEMORIZATION_THRESHOLD = 1.0 / 3.0
DEFAULT_CHUNK_ELEMENTS = 1 << 25  # bounds one distance block to ~128 MiB of float32
PIXEL_RANGE = (-1.0, 1.0)  # the training images' scale


@dataclass(frozen=True)
class MemorizationReport:
    """Per-sample ratio test results and the rate with a bootstrap 95% interval."""

    rate: float
    interval: tuple[float, float]
    num_samples: int
    ratios: torch.Tensor  # (N,) d1 / d2
    nearest: torch.Tensor  # (N,) index of the nearest training image
    d1: torch.Tensor  # (N,)
    d2: torch.Tensor  # (N,)
    memorized: torch.Tensor = field(repr=False)  # (N,) bool

    def most_replicated(self, top: int = 10) -> list[tuple[int, int]]:
        """(training index, number of memorized samples copying it), most copied first."""
        counts = Counter(self.nearest[self.memorized].tolist())
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]

    def summary(self) -> dict[str, object]:
        return {
            "memorization_rate": self.rate,
            "memorization_interval": list(self.interval),
            "num_samples": self.num_samples,
            "distinct_training_images_copied": len(set(self.nearest[self.memorized].tolist())),
            "most_replicated": self.most_replicated(),
        }


def nearest_two(
    samples: torch.Tensor,
    train: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances to the nearest and second-nearest training image and the nearest's index.

    Chunked over both samples and training images so one distance block holds at most
    `chunk_elements` entries (float32: 4 bytes each); runs on the device of `samples`, moving
    one training chunk at a time there. Candidates are found with the matmul expansion
    |t|^2 - 2 s.t (the per-sample |s|^2 does not change the ranking), then the two winners'
    distances are recomputed directly, so an exact copy gives d1 = 0 without rounding error.
    Returns d1 (N,), d2 (N,), nearest (N,), on the CPU.

    Example:
        >>> train = torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]).view(3, 2, 1, 1)
        >>> d1, d2, idx = nearest_two(train[:1] + 0.0, train)
        >>> d1.item(), d2.item(), idx.item()
        (0.0, 5.0, 0)
    """
    if len(train) < 2:
        raise DitPruneError(f"the ratio test needs at least 2 training images, got {len(train)}")
    if samples.shape[1:] != train.shape[1:]:
        raise DitPruneError(
            f"samples are {tuple(samples.shape[1:])} but training images are "
            f"{tuple(train.shape[1:])}: compare on the same scale and shape"
        )
    device = samples.device
    flat_s = samples.reshape(len(samples), -1).float()  # (N, P)
    flat_t = train.reshape(len(train), -1).float()  # (M, P)
    rows, cols = chunk_shape(len(flat_s), len(flat_t), chunk_elements, flat_s.shape[1])
    train_sq = torch.linalg.vector_norm(flat_t, dim=1).square()  # (M,) no (M, P) temp
    d1 = torch.empty(len(flat_s))  # (N,)
    d2 = torch.empty(len(flat_s))  # (N,)
    nearest = torch.empty(len(flat_s), dtype=torch.long)  # (N,)
    bar = tqdm(total=len(flat_s), desc="nearest neighbours", disable=not progress)
    for i in range(0, len(flat_s), rows):
        block = flat_s[i : i + rows]  # (r, P)
        run_d = torch.full((len(block), 2), float("inf"), device=device)  # (r, 2)
        run_i = torch.zeros((len(block), 2), dtype=torch.long, device=device)  # (r, 2)
        for j in range(0, len(flat_t), cols):
            ref = flat_t[j : j + cols].to(device)  # (c, P)
            # |t|^2 - 2 s.t, written into one (r, c) buffer
            score = torch.addmm(train_sq[j : j + cols].to(device), block, ref.T, alpha=-2.0)
            vals, idx = score.topk(min(2, score.shape[1]), dim=1, largest=False)  # (r, k)
            del score  # free the block before the next one is allocated: one block at a time
            merged_d = torch.cat([run_d, vals], 1)  # (r, 2 + k)
            merged_i = torch.cat([run_i, idx + j], 1)  # (r, 2 + k)
            order = merged_d.argsort(dim=1, stable=True)[:, :2]  # (r, 2)
            run_d = merged_d.gather(1, order)
            run_i = merged_i.gather(1, order)
        exact = torch.stack(
            [(block - flat_t[run_i[:, k].to(flat_t.device)].to(device)).norm(dim=1)
             for k in range(2)], 1
        )  # (r, 2) direct L2 distances of the two candidates
        swap = (exact[:, 1] < exact[:, 0]) | (
            (exact[:, 1] == exact[:, 0]) & (run_i[:, 1] < run_i[:, 0]))  # (r,) near-tie order;
        # exact ties go to the lower index (as dit_prune.store.search does)
        d1[i : i + rows] = torch.where(swap, exact[:, 1], exact[:, 0]).cpu()
        d2[i : i + rows] = torch.where(swap, exact[:, 0], exact[:, 1]).cpu()
        nearest[i : i + rows] = torch.where(swap, run_i[:, 1], run_i[:, 0]).cpu()
        bar.update(len(block))
    bar.close()
    return d1, d2, nearest


def chunk_shape(
    num_samples: int, num_train: int, chunk_elements: int, dim: int = 1
) -> tuple[int, int]:
    """(rows, cols) of one distance block: rows * cols <= chunk_elements and rows * dim too.

    Whole training sets per block are preferred (fewer passes). The search's working memory
    beyond its inputs is one (rows, cols) float32 block plus, for the exact recomputation of
    the two winners, two (rows, dim) temporaries: at most 4 * (rows*cols + 2*rows*dim) <=
    12 * chunk_elements bytes (384 MiB at the default), plus O(rows + M) bookkeeping. A training
    chunk is copied only when it must move to another device (cols * dim floats more).

    Example:
        >>> chunk_shape(10_000, 50_000, 1 << 25, dim=3072)
        (671, 50000)
    """
    if chunk_elements < 2:
        raise DitPruneError(f"chunk_elements must be at least 2, got {chunk_elements}")
    cols = max(2, min(num_train, chunk_elements))
    rows = max(1, min(num_samples, chunk_elements // cols, chunk_elements // max(1, dim)))
    return rows, cols


def ratio_histogram(
    ratios: torch.Tensor, bins: int = 20, threshold: float = MEMORIZATION_THRESHOLD
) -> dict[str, object]:
    """Distribution of d1/d2 ratios on [0, 1] as counts per bin, plus the threshold used.

    Example:
        >>> ratio_histogram(torch.tensor([0.0, 0.1, 0.9]), bins=2)["counts"]
        [2, 1]
    """
    values = np.clip(np.asarray(ratios, dtype=np.float64), 0.0, 1.0)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return {"edges": edges.round(6).tolist(), "counts": counts.tolist(), "threshold": threshold}


def bootstrap_interval(
    hits: torch.Tensor, num_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 vector (resample counts from
    `bootstrap.resample_counts`: drawn once per length and seed in a `shared_resamples()`
    block, with the same result)."""
    values = np.asarray(hits, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    counts = resample_counts(len(values), num_resamples, seed)  # (num_resamples, N)
    means = counts @ values / len(values)  # (num_resamples,)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def distinct_references(train_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop repeated training images: (M, C, H, W) -> (M', C, H, W) and, for each kept image,
    the index (M',) of its first occurrence in `train_images`.

    The ratio test compares the nearest with the second-nearest *distinct* training image: a
    training set that holds an image k times would otherwise give its exact copies d2 = d1 = 0
    and ratio 1, hiding precisely the duplicated images that models copy most (Carlini et al.
    2023; Somepalli et al. 2023). Images are identical when every pixel value is equal.

    Example:
        >>> t = torch.tensor([[[[0.5]]], [[[0.1]]], [[[0.5]]]])  # image 0 twice
        >>> refs, first = distinct_references(t)
        >>> sorted(first.tolist())
        [0, 1]
    """
    flat = train_images.reshape(len(train_images), -1)  # (M, P)
    unique, inverse = torch.unique(flat, dim=0, return_inverse=True)  # (M', P), (M,)
    if len(unique) == len(flat):
        return train_images, torch.arange(len(flat), device=train_images.device)
    order = torch.arange(len(flat), device=flat.device)  # (M,)
    first = torch.full((len(unique),), len(flat), dtype=torch.long, device=flat.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")  # (M',)
    first = first.sort().values  # keep the original order of first occurrences
    return train_images[first], first


def memorization_report(
    samples: torch.Tensor,
    train_images: torch.Tensor,
    threshold: float = MEMORIZATION_THRESHOLD,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    seed: int = 0,
    progress: bool = False,
    value_range: tuple[float, float] | None = PIXEL_RANGE,
) -> MemorizationReport:
    """Ratio-test memorization of `samples` (N, C, H, W) against `train_images` (M, C, H, W).

    Both are float images in `value_range` ([-1, 1]; None accepts any finite values, e.g.
    latents), the same (C, H, W). Raises a one-line DitPruneError naming the argument otherwise.
    """
    check_images(train_images, "train_images", value_range=value_range)
    check_images(samples, "samples", value_range=value_range)
    references, first = distinct_references(train_images)  # (M', C, H, W), (M',)
    d1, d2, nearest = nearest_two(samples, references, chunk_elements, progress)
    nearest = first[nearest]  # (N,) index into train_images (first of identical copies)
    return report_from_distances(d1, d2, nearest, threshold, seed)


def report_from_distances(d1: torch.Tensor, d2: torch.Tensor, nearest: torch.Tensor,
                          threshold: float = MEMORIZATION_THRESHOLD,
                          seed: int = 0) -> MemorizationReport:
    """The ratio test on distances to the nearest and second-nearest distinct training image,
    d1, d2 (N,), and the nearest one's index (N,), with the rate's bootstrap interval."""
    ratios = d1 / d2.clamp_min(1e-12)  # (N,)
    memorized = ratios < threshold  # (N,)
    return MemorizationReport(
        rate=float(memorized.double().mean()) if len(memorized) else float("nan"),
        interval=bootstrap_interval(memorized, seed=seed),
        num_samples=len(d1),
        ratios=ratios,
        nearest=nearest,
        d1=d1,
        d2=d2,
        memorized=memorized,
    )

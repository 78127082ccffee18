"""Memorization restricted to a named subset of the training set (e.g. the duplicated images).

A sample counts as a copy *of the subset* when it is a copy (ratio test, or copy detector at the
threshold τ) and its nearest training image belongs to the subset. Nearest neighbours and τ come
from the whole training set, so the subset rate and the rate on the rest add up to the overall
rate; calibrating τ on the subset alone would move it (the nearest training image of a held-out
digit is farther when the reference set is smaller) and change what counts as a copy.

Example:
    >>> import torch
    >>> nearest = torch.tensor([0, 3, 3, 1])
    >>> copies = torch.tensor([True, True, False, True])
    >>> r = subset_rate(copies, nearest, torch.tensor([3, 4]))
    >>> r.rate, r.distinct_copied
    (0.25, 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import bootstrap_interval


@dataclass(frozen=True)
class SubsetRate:
    """Fraction of all samples that copy an image of the subset, with a bootstrap 95% interval."""

    rate: float
    interval: tuple[float, float]
    distinct_copied: int  # how many subset images have at least one copy
    subset_size: int
    hits: torch.Tensor  # (N,) bool: sample copies a subset image


def subset_rate(copies: torch.Tensor, nearest: torch.Tensor, subset: torch.Tensor,
                seed: int = 0) -> SubsetRate:
    """`copies` (N,) bool, `nearest` (N,) training indices, `subset` (S,) training indices."""
    copies = torch.as_tensor(copies, dtype=torch.bool).cpu()
    nearest = torch.as_tensor(nearest, dtype=torch.long).cpu()
    subset = torch.as_tensor(subset, dtype=torch.long).cpu().unique()
    if copies.shape != nearest.shape:
        raise DitPruneError(f"copies {tuple(copies.shape)} and nearest {tuple(nearest.shape)} "
                            "must describe the same samples")
    if len(subset) == 0:
        raise DitPruneError("the training subset is empty")
    hits = copies & torch.isin(nearest, subset)  # (N,)
    rate = float(hits.double().mean()) if len(hits) else float("nan")
    return SubsetRate(rate, bootstrap_interval(hits, seed=seed),
                      len(set(nearest[hits].tolist())), len(subset), hits)


def subset_metrics(arrays: dict, subset: torch.Tensor, seed: int = 0) -> dict[str, object]:
    """Both measures on one subset, from an evaluation's per-sample arrays (see evaluate.py)."""
    mem = subset_rate(torch.as_tensor(arrays["memorized"]), torch.as_tensor(arrays["nearest"]),
                      subset, seed)
    copy = subset_rate(torch.as_tensor(arrays["copies"]),
                       torch.as_tensor(arrays["copy_nearest"]), subset, seed)
    return {"memorization_rate": mem.rate, "memorization_interval": list(mem.interval),
            "copy_rate": copy.rate, "copy_interval": list(copy.interval),
            "distinct_copied": copy.distinct_copied, "subset_size": copy.subset_size}


def target_copy_rate(metrics: dict, target: str) -> tuple[float, list[float]]:
    """(copy rate, its interval) of an evaluation's `metrics` on `target`: a subset name from
    `metrics["subsets"]`, or "all" for copies of any training image."""
    counted = metrics if target == "all" else metrics["subsets"][target]
    return float(counted["copy_rate"]), list(counted["copy_interval"])

"""Improved precision and recall (Kynkäänniemi et al. 2019) on k-NN feature manifolds.

Each real feature r_i gets a ball of radius = distance to its k-th nearest other real feature;
precision is the fraction of generated features inside at least one real ball. Recall swaps the
roles: the fraction of real features inside at least one generated ball. k = 3 by default.
Distances are computed in chunks of at most `chunk_elements` entries (float64).

Example:
    >>> real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    >>> fake = torch.tensor([[1.5], [2.5], [10.0]])  # 10.0 lies off the real manifold
    >>> precision, recall = precision_recall(real, fake, k=1)
    >>> round(precision, 3), recall
    (0.667, 0.75)
"""

from __future__ import annotations

import torch

from dit_prune.errors import DitPruneError

DEFAULT_K = 3
PR_CHUNK_ELEMENTS = 1 << 24  # one (rows, M) float64 distance block: <= 128 MiB


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (r, M) between rows of a (r, D) and b (M, D), float64."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)  # (r, M)
    return d.clamp_min_(0)


def knn_radii(feats: torch.Tensor, k: int = DEFAULT_K,
              chunk_elements: int = PR_CHUNK_ELEMENTS) -> torch.Tensor:
    """Distance (N,) of each feature to its k-th nearest other feature (itself excluded)."""
    x = feats.double()
    if len(x) <= k:
        raise DitPruneError(f"k-NN radii with k={k} need more than {k} features, got {len(x)}")
    rows = max(1, chunk_elements // len(x))
    radii = []
    for i in range(0, len(x), rows):
        d = _sq_dists(x[i : i + rows], x)  # (r, N)
        # k+1 smallest includes the point itself at distance 0
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k].sqrt())
    return torch.cat(radii)  # (N,)


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                      chunk_elements: int = PR_CHUNK_ELEMENTS) -> torch.Tensor:
    """(Q,) bool: each query lies within radius_i of at least one support point i."""
    q, s = queries.double(), support.double()
    rows = max(1, chunk_elements // len(s))
    r2 = radii.double() ** 2  # (M,)
    inside = [(_sq_dists(q[i : i + rows], s) <= r2).any(1) for i in range(0, len(q), rows)]
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K,
                     chunk_elements: int = PR_CHUNK_ELEMENTS) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` (N, D) against `real` (M, D)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DitPruneError(f"precision/recall need (N, D) features of one dimension, got "
                            f"{tuple(real.shape)} and {tuple(fake.shape)}")
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise DitPruneError("precision/recall: features contain NaN or infinite values")
    precision = manifold_coverage(fake, real, knn_radii(real, k, chunk_elements), chunk_elements)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, chunk_elements), chunk_elements)
    return float(precision.double().mean()), float(recall.double().mean())

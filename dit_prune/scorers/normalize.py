"""Make head and neuron scores comparable when one budget covers both kinds.

A head removes 4·d·D parameters and a neuron 2·D, and their raw scores live on different scales
(a head's first-order effect is a sum over d channels). The default, `robust-z`, standardizes each
kind separately by its median and MAD (scaled to match a standard deviation): a unit's score says
how far it stands out among units of its own kind, and the few outliers that drive copying (the
ones we look for) do not inflate the scale they are measured against. See docs/scorers.md.

Methods: 'robust-z' (default), 'zscore' (per-kind mean/std), 'rank' (per-kind percentile in
[0, 1]), 'per-param' (raw score divided by the unit's parameter count, no per-kind step), 'none'.

Example:
    >>> import torch
    >>> from dit_prune.units import Unit
    >>> units = [Unit("head", 0, 0), Unit("head", 0, 1), Unit("head", 0, 2),
    ...          Unit("neuron", 0, 0), Unit("neuron", 0, 1), Unit("neuron", 0, 2)]
    >>> raw = torch.tensor([10.0, 20.0, 90.0, 0.1, 0.2, 0.3])
    >>> normalize_scores(raw, units, "rank").tolist()
    [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.units import Unit, adapter_for

NORMALIZATIONS = ("robust-z", "zscore", "rank", "per-param", "none")
MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


def normalize_scores(
    scores: torch.Tensor,
    units: Sequence[Unit],
    method: str = "robust-z",
    model: nn.Module | None = None,
) -> torch.Tensor:
    """Scores (U,) aligned with `units`, made comparable across unit kinds by `method`.

    Every method except 'per-param' is applied to each kind separately and keeps the order
    within a kind. 'per-param' needs the model (to count each unit's parameters).
    """
    if method not in NORMALIZATIONS:
        raise DitPruneError(f"unknown normalization {method!r}; choose one of {NORMALIZATIONS}")
    scores = scores.detach().to(torch.float64).cpu()  # (U,)
    if len(scores) != len(units):
        raise DitPruneError(f"{len(scores)} scores for {len(units)} units")
    if method == "none":
        return scores.clone()
    if method == "per-param":
        if model is None:
            raise DitPruneError("per-param normalization needs the model")
        return scores / unit_parameter_counts(model, units)
    out = torch.empty_like(scores)  # (U,)
    kinds = [u.kind for u in units]
    for kind in sorted(set(kinds)):
        members = torch.tensor([i for i, k in enumerate(kinds) if k == kind])  # (U_k,)
        out[members] = _within_kind(scores[members], method)
    return out


def _within_kind(values: torch.Tensor, method: str) -> torch.Tensor:
    if method == "rank":
        if len(values) == 1:
            return torch.ones_like(values)
        return _average_ranks(values) / (len(values) - 1)  # (U_k,) in [0, 1]
    if method == "zscore":
        center, scale = values.mean(), values.std(unbiased=False)
    else:
        center = values.median()
        scale = MAD_TO_STD * (values - center).abs().median()
        if scale <= 0:  # more than half the units tie: fall back to the standard deviation
            scale = values.std(unbiased=False)
    scale = scale if scale > 0 else torch.ones((), dtype=values.dtype)
    return (values - center) / scale


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based ranks with ties sharing their average rank."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    uniques, inverse = torch.unique(values, return_inverse=True)
    if len(uniques) == len(values):
        return ranks
    sums = torch.zeros(len(uniques), dtype=values.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniques), dtype=values.dtype).index_add_(
        0, inverse, torch.ones_like(values)
    )
    return (sums / counts)[inverse]


def unit_parameter_counts(model: nn.Module, units: Sequence[Unit]) -> torch.Tensor:
    """(U,) float64: parameters each unit owns, over every site of its kind
    (`BlockAdapter.unit_cost`: up-projection rows and biases, both GLU halves, kernels whole;
    down-projection columns of every stream; entries of norms across heads). Summed over a
    removal, this is its exact parameter drop, except that a grouped-query attention's
    key/value rows go (and are counted by `prune_units`) only with a whole group.

    Example:
        >>> from dit_prune.models import new_dit
        >>> model = new_dit("tiny", 10, 8, 1)  # hidden 128, head dim 32, MLP 512
        >>> unit_parameter_counts(model, [Unit("head", 0, 0), Unit("neuron", 0, 0)]).tolist()
        [16480.0, 257.0]
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    cache: dict[tuple[int, str], int] = {}
    for unit in units:
        key = (unit.block, unit.kind)
        if key in cache:
            continue
        if unit.block >= len(blocks) or adapter.spec(blocks[unit.block], unit.kind) is None:
            raise DitPruneError(f"{unit} does not exist in the model ({len(blocks)} blocks, "
                                f"{adapter.family})")
        cache[key] = adapter.unit_cost(blocks[unit.block], unit.kind)
    return torch.tensor([cache[(u.block, u.kind)] for u in units], dtype=torch.float64)  # (U,)

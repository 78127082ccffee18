"""The resample counts of the percentile bootstrap (`memorization.bootstrap_interval`), drawn
once per (number of values, resamples, seed) inside a `shared_resamples()` block.

A bootstrap resample of n values is a multinomial draw of n counts; which values the vector
holds does not enter the draw, so every vector of the same length and seed is resampled with
the same (resamples, n) counts. Drawing them (n binomial draws per resample) is nearly all of
an interval's cost: `dit-prune run` asks for ~80 intervals of 1,000-sample vectors, all with the
run's seed. Inside the block the counts are drawn once and reused, so every interval is exactly
the one drawn afresh (the same counts, the same product with the values); outside it nothing is
kept. Count matrices of more than `MAX_SHARED_COUNTS` entries are not kept.

Example:
    >>> with shared_resamples():
    ...     a = resample_counts(5, 3, seed=0)
    ...     a is resample_counts(5, 3, seed=0)
    True
    >>> bool((resample_counts(5, 3, seed=0) == a).all())  # drawn afresh: the same counts
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

MAX_SHARED_COUNTS = 1 << 24  # entries of one kept count matrix (int64: 128 MiB)

_SHARED: ContextVar[dict[tuple[int, int, int], np.ndarray] | None] = ContextVar(
    "dit_prune_shared_resamples", default=None)  # set only inside `shared_resamples()`


@contextmanager
def shared_resamples() -> Iterator[None]:
    """Within the block, `resample_counts` draws each (n, resamples, seed) once; the counts
    are dropped when the block ends (also on error). Blocks nest (the inner one reuses)."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def resample_counts(n: int, num_resamples: int, seed: int) -> np.ndarray:
    """(num_resamples, n) int64 multinomial counts of n draws from n equally likely values,
    from `np.random.default_rng(seed)`; read-only and shared inside `shared_resamples()`."""
    shared = _SHARED.get()
    key = (n, num_resamples, seed)
    if shared is not None and key in shared:
        return shared[key]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1 / n), num_resamples)  # (num_resamples, n)
    counts.flags.writeable = False
    if shared is not None and n * num_resamples <= MAX_SHARED_COUNTS:
        shared[key] = counts
    return counts

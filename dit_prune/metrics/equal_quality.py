"""Random pruning judged at equal quality: the copy rate random pruning reaches at the scorer's FD.

Budget is not cost; quality is. For each random seed r, random pruning at increasing budgets
traces a path in (FD, copy rate): a polyline from the unpruned model through the random models
in budget order (a point on a segment stands for pruning between two budgets). Random's copy
rate at quality f, c_r(f), is the lowest copy rate on that path among the points whose FD is at
most f: random pruning at equal *or better* quality, which gives random its best case. When f
is below the FD of every vertex of a seed's path (the scorer's samples look better than the
unpruned model's and every random model's), the comparison is marked `clamped`, and that seed's
rate is its lowest on the path up to `fd_upper`, the upper end of the scorer's own FD interval
(the run passes FD_before x (1 + the paired change's upper end)): random at a quality the
scorer's measurement cannot tell from its own. (Taking the lowest-FD vertex instead would give
random the unpruned model's copy rate whenever the scorer's FD falls below the unpruned one by
noise, and credit the scorer with every copy it removed.) When even that bound reaches no point
of the path, or no bound is given, the comparison is `unmatched`: the lowest-FD vertex's rate
is shown, and no win can be claimed. When some seed's path ends at a better FD than f, random
pruning at larger budgets might reach f with fewer copies: the comparison is marked `censored`
and cannot count as a win for the scorer (measure random at larger budgets). Random's rate at f
is the mean of c_r(f) over the random seeds, with a Student-t 95% interval over seeds (n - 1
degrees of freedom), so it carries both the sampling noise of each model and the spread between
random draws.

The rule ("beats random at equal quality"): the scorer's copy-rate interval lies entirely below
random's interval at the scorer's FD, and the comparison is neither `censored` nor `unmatched`.
The copy-cut ratio compares how far each moved from the unpruned copy rate: (before - scorer) /
(before - random at equal FD).

Example:
    >>> pts = [RandomPoint(s, b, fd=10 + 10 * b, copy_rate=0.3 - 0.5 * b)
    ...        for s in range(3) for b in (0.1, 0.2)]
    >>> eq = random_at_fd(pts, unpruned_fd=10.0, unpruned_rate=0.3, fd=11.5)
    >>> round(eq.rate, 3), eq.clamped
    (0.225, False)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dit_prune.errors import DitPruneError


@dataclass(frozen=True)
class RandomPoint:
    """One randomly pruned model: its random seed, budget, FD and (target) copy rate."""

    seed: int
    budget: float
    fd: float
    copy_rate: float


@dataclass(frozen=True)
class EqualQuality:
    """Random's copy rate at one FD: mean over seeds, 95% interval, per-seed values."""

    fd: float
    rate: float
    interval: tuple[float, float]
    per_seed: tuple[float, ...]
    # the FD lay below every point of some seed's path: its best up to `fd_upper` was used
    clamped: bool
    # some seed's path ends at a better FD than `fd`: random at larger budgets might cut more
    # copies at this quality, so the comparison cannot credit the scorer (`beats_random`)
    censored: bool = False
    # some clamped seed had no point even up to `fd_upper` (or none was given): its lowest-FD
    # vertex is shown, and the comparison cannot credit the scorer
    unmatched: bool = False
    fd_upper: float | None = None  # the upper end of the scorer's FD interval, when given

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["interval"], data["per_seed"] = list(self.interval), list(self.per_seed)
        return data


def t_quantile(df: int) -> float:
    """Two-sided 95% Student-t quantile for `df` degrees of freedom (scipy.stats.t)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df)) if df >= 1 else math.nan


def random_at_fd(points: Sequence[RandomPoint], unpruned_fd: float, unpruned_rate: float,
                 fd: float, fd_upper: float | None = None) -> EqualQuality:
    """Random's copy rate at `fd` (see module docstring); needs points from >= 1 seed.
    `fd_upper`: the upper end of the scorer's FD interval, used where `fd` is below a whole
    path (`clamped`); without it such a comparison is `unmatched`."""
    if not points:
        raise DitPruneError("equal-quality comparison: no random models")
    per_seed, clamped, censored, unmatched = [], False, False, False
    for seed in sorted({p.seed for p in points}):
        path = sorted((p for p in points if p.seed == seed), key=lambda p: p.budget)
        fds = np.array([unpruned_fd] + [p.fd for p in path])  # (B+1,)
        rates = np.array([unpruned_rate] + [p.copy_rate for p in path])  # (B+1,)
        best, below = lowest_rate_within(fd, fds, rates)
        if not below:
            clamped = True
            if fd_upper is not None and math.isfinite(fd_upper) and fd_upper > fd:
                best, below = lowest_rate_within(fd_upper, fds, rates)
            unmatched |= not below
        censored |= bool(fds.max() < fd)
        per_seed.append(best)
    values = np.array(per_seed)
    mean = float(values.mean())
    if len(values) > 1:
        half = t_quantile(len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    else:
        half = math.nan
    return EqualQuality(float(fd), mean, (mean - half, mean + half), tuple(per_seed), clamped,
                        censored, unmatched,
                        None if fd_upper is None else float(fd_upper))


def lowest_rate_within(fd: float, fds: np.ndarray, rates: np.ndarray) -> tuple[float, bool]:
    """Lowest rate on the polyline through (fds[i], rates[i]) among its points with FD <= fd.

    Returns (rate, True); when no vertex has FD <= fd, (rate of the lowest-FD vertex, False).

    Example:
        >>> lowest_rate_within(12.0, np.array([10.0, 14.0]), np.array([0.3, 0.1]))
        (0.2, True)
    """
    if not (fds <= fd).any():
        return float(rates[int(np.argmin(fds))]), False
    best = float(rates[fds <= fd].min())  # vertices within the FD bound
    for i in range(len(fds) - 1):  # segments that cross the bound: the point where FD = fd
        lo, hi = fds[i], fds[i + 1]
        if min(lo, hi) < fd < max(lo, hi):
            w = (fd - lo) / (hi - lo)
            best = min(best, float(rates[i] + w * (rates[i + 1] - rates[i])))
    return best, True


def beats_random(scorer_interval: Sequence[float], random: EqualQuality) -> bool:
    """The rule: the scorer's interval lies entirely below random's interval at equal FD, and
    every random path reaches the scorer's FD (not `censored`) or, where the scorer's FD is
    below a whole path, comes within the scorer's FD interval (not `unmatched`)."""
    return (bool(float(scorer_interval[1]) < random.interval[0]) and not random.censored
            and not random.unmatched)


def copy_cut_ratio(before: float, scorer: float, random: EqualQuality) -> float:
    """(before - scorer) / (before - random at equal FD); inf when random cut nothing."""
    random_cut = before - random.rate
    if random_cut <= 0:
        return math.inf if before - scorer > 0 else math.nan
    return (before - scorer) / random_cut

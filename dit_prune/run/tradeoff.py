"""tradeoff.png: the targeted copy rate against FD, the scorer's budgets against random's band.

Random pruning is drawn as its models (one marker per random seed and budget) and as a band: at
each FD, random's copy rate at that FD with its 95% interval over seeds (the same rule the
report's equal-quality comparison uses, `metrics.equal_quality.random_at_fd`). A scorer point
below the band removed more copies than random pruning does at the same quality.

Example:
    >>> tradeoff_plot(report, "runs/demo/tradeoff.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dit_prune.checkpoint import atomic_write_with
from dit_prune.metrics.equal_quality import RandomPoint, random_at_fd
from dit_prune.metrics.subsets import target_copy_rate


def tradeoff_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Draw the report's target copy rate vs FD: unpruned, scorer budgets, random band."""
    target, fd_name = report["target"], report["fd_name"]
    before = report["before"]
    before_rate = _rate(before, target)
    points = [RandomPoint(**p) for p in report["random_curve"]]
    fig = Figure(figsize=(6.0, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fds = [before["fd"]] + [p.fd for p in points] + [b["after"]["fd"] for b in report["budgets"]]
    grid = np.linspace(min(fds), max(fds), 60)  # (G,)
    band = [random_at_fd(points, before["fd"], before_rate, f) for f in grid]
    ax.fill_between(grid, [b.interval[0] for b in band], [b.interval[1] for b in band],
                    color="0.6", alpha=0.3, label=f"random at equal {fd_name} (95%)")
    ax.plot(grid, [b.rate for b in band], color="0.4", lw=1)
    ax.scatter([p.fd for p in points], [p.copy_rate for p in points], s=12, color="0.35",
               marker="x", label=f"random models ({len({p.seed for p in points})} seeds)")
    ax.errorbar([before["fd"]], [before_rate], yerr=_err(before, target), fmt="k*",
                markersize=11, label="unpruned")
    budgets = sorted(report["budgets"], key=lambda b: b["budget"])
    ax.errorbar([b["after"]["fd"] for b in budgets], [_rate(b["after"], target) for b in budgets],
                yerr=np.hstack([_err(b["after"], target) for b in budgets]), marker="o",
                capsize=2, color="C3", label=report["scorer"])
    for b in budgets:
        ax.annotate(f"{b['budget']:g}", (b["after"]["fd"], _rate(b["after"], target)),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    what = "copy rate, duplicated images" if target == "duplicated" else "copy rate"
    ax.set_xlabel(f"{fd_name} (lower is better)")
    ax.set_ylabel(f"{what} (copy detector)")
    ax.set_ylim(-0.02, max(0.1, min(1.02, 1.25 * max([before_rate] + [p.copy_rate
                                                                         for p in points]))))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("copies vs quality; labels = budget", fontsize=9)
    target_path = Path(path)
    atomic_write_with(target_path,
                      lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return target_path


def _rate(metrics: dict[str, Any], target: str) -> float:
    return target_copy_rate(metrics, target)[0]


def _err(metrics: dict[str, Any], target: str) -> np.ndarray:
    rate, (low, high) = target_copy_rate(metrics, target)
    return np.array([[max(rate - low, 0.0)], [max(high - rate, 0.0)]])  # (2, 1)

"""The pictures of `dit-prune run`: before | after | nearest training image, and the
memorization-versus-FD trade-off against random pruning.

Example:
    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = tradeoff_plot({"before": (0.8, [0.7, 0.9], 40.0)},
    ...                       {"taylor-gap": [(0.1, 0.5, [0.4, 0.6], 45.0)]}, Path(tmp) / "t.png")
    ...     p.stat().st_size > 0
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dit_prune.checkpoint import atomic_write_with
from dit_prune.plots import MEMORIZED_COLOR, _to_display

ROW_TITLES = ("before", "after", "nearest training image (of before)")


def before_after_grid(
    before: torch.Tensor,
    after: torch.Tensor,
    nearest_train: torch.Tensor,
    memorized_before: torch.Tensor,
    memorized_after: torch.Tensor,
    labels: torch.Tensor,
    seeds: list[int],
    path: str | Path,
    columns: int = 20,
    title: str = "",
) -> Path:
    """Three rows on the same seeds: before, after, and the nearest training image of before.

    before/after: (N, C, H, W) in [0, 1]; nearest_train: (N, C, H, W) in [-1, 1]; memorized
    flags (N,) bool frame the image in red. The first `columns` samples are shown.
    """
    n = min(columns, len(before))
    fig = Figure(figsize=(0.75 * n + 1.5, 3.0 + (0.4 if title else 0)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n, squeeze=False)
    rows = (before, after, (nearest_train + 1) / 2)
    flags = (memorized_before, memorized_after, None)
    for r, (images, marks) in enumerate(zip(rows, flags, strict=True)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(_to_display(images[c]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            memorized = marks is not None and bool(marks[c])
            for spine in ax.spines.values():
                spine.set_edgecolor(MEMORIZED_COLOR if memorized else "#cccccc")
                spine.set_linewidth(2.5 if memorized else 0.5)
            if r == 0:
                ax.set_title(f"s{seeds[c]}\ny={int(labels[c])}", fontsize=6)
        axes[r][0].set_ylabel(ROW_TITLES[r], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle((title + "\n" if title else "") + "red frame: memorized (d1/d2 < 1/3)",
                 fontsize=8)
    return _save(fig, path)


def tradeoff_plot(
    reference: dict[str, tuple[float, list[float], float]],
    curves: dict[str, list[tuple[float, float, list[float], float]]],
    path: str | Path,
    fd_name: str = "FD",
) -> Path:
    """Memorization rate (with its interval) against FD, one curve per method over budgets.

    reference: name -> (rate, interval, fd) single points (e.g. the unpruned model);
    curves: method -> [(budget, rate, interval, fd)].
    """
    fig = Figure(figsize=(5.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (rate, interval, fd) in reference.items():
        ax.errorbar([fd], [rate], yerr=_err(rate, interval), fmt="k*", markersize=10,
                    label=name)
    for method, points in curves.items():
        points = sorted(points)
        fds = [p[3] for p in points]
        rates = [p[1] for p in points]
        errs = np.array([_err(p[1], p[2])[:, 0] for p in points]).T
        ax.errorbar(fds, rates, yerr=errs, marker="o", capsize=2, label=method)
        for budget, rate, _, fd in points:
            ax.annotate(f"{budget:g}", (fd, rate), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel(f"{fd_name} (lower is better)")
    ax.set_ylabel("memorization rate (ratio test)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("memorization vs quality; labels = budget", fontsize=9)
    return _save(fig, path)


def _err(rate: float, interval: list[float]) -> np.ndarray:
    return np.array([[max(rate - interval[0], 0.0)], [max(interval[1] - rate, 0.0)]])


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    atomic_write_with(target, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return target

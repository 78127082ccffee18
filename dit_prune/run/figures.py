"""The before | after | nearest-training-image picture of `dit-prune run` (the trade-off plot
is in `run.tradeoff`).

Example:
    >>> before_after_grid(before, after, nearest, mem_b, mem_a, labels, seeds,
    ...                   "runs/demo/samples_before_after.png")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

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
    fig.subplots_adjust(top=0.78 if title else 0.84)  # room above the seed labels
    fig.suptitle((title + "\n" if title else "") + "red frame: memorized (d1/d2 < 1/3)",
                 fontsize=8, y=0.995)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    target = Path(path)
    atomic_write_with(target, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return target

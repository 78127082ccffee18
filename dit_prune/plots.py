"""PNG pictures of an evaluation: each generated image beside its nearest training image.

Uses matplotlib's object API with the Agg canvas (no global backend switch, no display).

Example:
    >>> import tempfile, torch
    >>> samples = torch.rand(4, 1, 8, 8)  # [0, 1]
    >>> train = torch.rand(3, 1, 8, 8) * 2 - 1  # [-1, 1]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = nearest_pairs_grid(samples, train, torch.tensor([0, 1, 2, 0]),
    ...                               torch.tensor([0.1, 0.5, 0.9, 0.2]), Path(tmp) / "g.png")
    ...     path.stat().st_size > 0
    True
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dit_prune.checkpoint import atomic_write_with
from dit_prune.metrics.memorization import MEMORIZATION_THRESHOLD

MEMORIZED_COLOR = "#d62728"
COPY_COLOR = "#ff7f0e"


def _to_display(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, 3) for imshow."""
    array = image.detach().float().clamp(0, 1).cpu().numpy()
    return array[0] if array.shape[0] == 1 else np.transpose(array, (1, 2, 0))


def nearest_pairs_grid(
    samples: torch.Tensor,
    train_images: torch.Tensor,
    nearest: torch.Tensor,
    ratios: torch.Tensor,
    path: str | Path,
    copies: torch.Tensor | None = None,
    max_pairs: int = 48,
    pairs_per_row: int = 6,
    threshold: float = MEMORIZATION_THRESHOLD,
    title: str = "",
) -> Path:
    """Write a PNG grid of (generated, nearest training image) pairs with their d1/d2 ratios.

    samples: (N, C, H, W) in [0, 1]; train_images: (M, C, H, W) in [-1, 1]; nearest, ratios:
    (N,) from memorization_report; copies: optional (N,) bool from copy_report. Memorized pairs
    (ratio < threshold) get a red frame and "M", copy-detected ones "C". `max_pairs` samples
    evenly spaced over the set are shown (so every class block appears), in seed order.
    """
    count = min(len(samples), max_pairs)
    shown = np.unique(np.linspace(0, len(samples) - 1, count).round().astype(int))
    rows = max(1, -(-count // pairs_per_row))
    fig = Figure(figsize=(2.0 * pairs_per_row, 1.25 * rows + (0.4 if title else 0.1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2 * pairs_per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for slot, i in enumerate(shown.tolist()):
        row, col = divmod(slot, pairs_per_row)
        gen_ax, train_ax = axes[row, 2 * col], axes[row, 2 * col + 1]
        neighbour = (train_images[int(nearest[i])] + 1) / 2  # (C, H, W) in [0, 1]
        for ax, image in ((gen_ax, samples[i]), (train_ax, neighbour)):
            ax.imshow(_to_display(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        memorized = float(ratios[i]) < threshold
        copied = bool(copies[i]) if copies is not None else False
        marks = ("M" if memorized else "") + ("C" if copied else "")
        color = MEMORIZED_COLOR if memorized else (COPY_COLOR if copied else "black")
        gen_ax.set_title(f"{float(ratios[i]):.2f} {marks}".strip(), fontsize=7, color=color)
        train_ax.set_title(f"#{int(nearest[i])}", fontsize=7)
        if memorized or copied:
            for ax in (gen_ax, train_ax):
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2)
    caption = title or "generated | nearest training image; d1/d2 ratio, M: memorized, C: copy"
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)


def ratio_histogram_plot(ratios: torch.Tensor, path: str | Path,
                         threshold: float = MEMORIZATION_THRESHOLD, title: str = "") -> Path:
    """PNG histogram of d1/d2 ratios with the memorization threshold marked."""
    fig = Figure(figsize=(5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(np.clip(np.asarray(ratios, dtype=np.float64), 0, 1), bins=40, range=(0, 1),
            color="#1f77b4")
    ax.axvline(threshold, color=MEMORIZED_COLOR, linestyle="--",
               label=f"threshold {threshold:.3g}: memorized below")
    ax.set_xlabel("d1 / d2 (nearest / second-nearest training image)", fontsize=8)
    ax.set_ylabel("samples")
    ax.legend(fontsize=7)
    ax.set_title(title or "ratio test", fontsize=9)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)

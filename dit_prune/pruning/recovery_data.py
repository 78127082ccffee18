"""Images for recovery, found from a checkpoint's metadata (`dit_prune.json` -> "data").

Sources:
  * ``train``   — the images the base model was trained on;
  * ``unused``  — digits-pool images the base model never saw (digits checkpoints only);
  * ``heldout`` — the held-out digits (note: evaluation compares FD against these);
  * a folder path — any image folder (one subfolder per class, or flat = unlabelled).

Example:
    >>> extra = {"data": {"source": "digits", "pool_indices": [0, 1, 2]}}
    >>> images, labels, info = recovery_images(extra, "train")
    >>> tuple(images.shape), info["num_images"]
    ((3, 1, 8, 8), 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_prune.data import digits_split, load_image_folder
from dit_prune.errors import DitPruneError

RECOVERY_SOURCES = ("train", "unused", "heldout")


def recovery_images(
    extra: dict[str, Any], which: str
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(images (N, C, H, W) in [-1, 1], labels (N,) or None, a description for reports)."""
    if which not in RECOVERY_SOURCES:
        folder = load_image_folder(Path(which))
        return folder.images, folder.labels, {"source": str(which),
                                              "num_images": len(folder.images)}
    data = extra.get("data") if isinstance(extra, dict) else None
    if not isinstance(data, dict) or "source" not in data:
        raise DitPruneError(
            f"the checkpoint does not record its training data; pass an image folder instead "
            f"of {which!r}"
        )
    if data["source"] != "digits":
        if which != "train":
            raise DitPruneError(f"{which!r} images exist only for digits checkpoints")
        folder = load_image_folder(Path(data["source"]))
        return folder.images, folder.labels, {"source": "train", "num_images": len(folder.images)}
    split = digits_split()
    if which == "heldout":
        images, labels = split.heldout_images, split.heldout_labels
    else:
        used = np.asarray(data.get("pool_indices", []), dtype=np.int64)
        if used.size == 0 or used.min() < 0 or used.max() >= len(split.pool_labels):
            raise DitPruneError("the checkpoint's training pool indices are missing or invalid")
        idx = used if which == "train" else np.setdiff1d(np.arange(len(split.pool_labels)), used)
        if idx.size == 0:
            raise DitPruneError("no unused pool images: the base model was trained on all of them")
        images, labels = split.pool_images[idx], split.pool_labels[idx]
    return images, labels, {"source": which, "num_images": len(images)}

"""Images for recovery, found from a checkpoint's metadata (`dit_prune.json` -> "data").

Sources:
  * ``train``   — the images the base model was trained on, each once;
  * ``train-multiset`` — the training multiset itself: for a `--duplicate` checkpoint, the
    duplicated images repeated as often as in training (Ye et al. 2025 fine-tune on the data the
    model was trained on); otherwise the same as ``train``;
  * ``unused``  — digits-pool images the base model never saw (digits checkpoints only);
  * ``heldout`` — the held-out digits (note: evaluation compares FD against these);
  * ``generated-novel`` — images the unpruned teacher generates from fixed seeds, keeping only
    those the copy detector calls novel (`novel_filter`: cosine similarity to the nearest
    training image below tau). Needs the teacher and the detector, so `recovery_images` refuses
    it; `dit-prune run` and `dit-prune prune` draw them (`generated_novel_images`);
  * a folder path — any image folder (one subfolder per class, or flat = unlabelled).

Example:
    >>> extra = {"data": {"source": "digits", "pool_indices": [0, 1, 2]}}
    >>> images, labels, info = recovery_images(extra, "train")
    >>> tuple(images.shape), info["num_images"]
    ((3, 1, 8, 8), 3)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dit_prune.data import digits_split, load_image_folder
from dit_prune.errors import DitPruneError

GENERATED_NOVEL = "generated-novel"
TRAIN_MULTISET = "train-multiset"
RECOVERY_SOURCES = ("train", TRAIN_MULTISET, "unused", "heldout", GENERATED_NOVEL)
# seeds of the teacher's samples for generated-novel: GENERATED_SEED_BASE + i, disjoint from
# evaluation seeds such as 0-999
GENERATED_SEED_BASE = 1_000_000


def recovery_images(
    extra: dict[str, Any], which: str
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(images (N, C, H, W) in [-1, 1], labels (N,) or None, a description for reports)."""
    if which == GENERATED_NOVEL:
        raise DitPruneError(f"{GENERATED_NOVEL!r} images are drawn from the teacher: use "
                            "generated_novel_images")
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
    if which == TRAIN_MULTISET:
        return _train_multiset(extra, data)
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


def _train_multiset(extra: dict[str, Any], data: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The training images with the recorded duplicated ones repeated `copies` times in all."""
    from dit_prune.duplication import expand_with_duplicates

    images, labels, _ = recovery_images(extra, "train")
    duplicated = data.get("duplicated")
    if not isinstance(duplicated, dict) or not duplicated.get("train_positions"):
        return images, labels, {"source": TRAIN_MULTISET, "num_images": len(images)}
    positions = np.asarray(duplicated["train_positions"], dtype=np.int64)
    copies = int(duplicated.get("copies", 1))
    if copies < 1 or positions.min() < 0 or positions.max() >= len(images):
        raise DitPruneError("the checkpoint's duplicated positions or copy count are invalid")
    images = expand_with_duplicates(images, positions, copies)  # (N + D (c - 1), C, H, W)
    if labels is not None:
        labels = expand_with_duplicates(labels, positions, copies)  # (N + D (c - 1),)
    return images, labels, {"source": TRAIN_MULTISET, "num_images": len(images),
                            "distinct_images": len(images) - len(positions) * (copies - 1)}


@dataclass(frozen=True)
class NovelPool:
    """Teacher samples split by the copy detector into novel ones (kept) and copies (dropped)."""

    images: torch.Tensor  # (R, C, H, W) in [-1, 1]: the kept (novel) samples
    labels: torch.Tensor  # (R,) their classes
    similarities: torch.Tensor  # (N,) each sample -> its nearest training image (cosine)
    nearest: torch.Tensor  # (N,) index of that training image
    kept: torch.Tensor  # (N,) bool: similarity < threshold
    threshold: float  # tau
    seeds: tuple[int, ...] = ()  # the samples' seeds, when drawn here

    def copied_positions(self, top: int | None = None) -> list[int]:
        """Training indices the dropped samples copy, most copied first (ties: lower index)."""
        counts = Counter(self.nearest[~self.kept].tolist())
        return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:top]

    def info(self) -> dict[str, Any]:
        """A description for reports: how many were drawn, kept and dropped, at which tau."""
        drawn = len(self.kept)
        info: dict[str, Any] = {
            "source": GENERATED_NOVEL, "num_drawn": drawn, "num_images": int(self.kept.sum()),
            "num_dropped": drawn - int(self.kept.sum()), "threshold": self.threshold,
            "distinct_copied": len(self.copied_positions())}
        if self.seeds:
            info["seeds"] = f"{self.seeds[0]}-{self.seeds[-1]}" if list(self.seeds) == list(
                range(self.seeds[0], self.seeds[-1] + 1)) else list(self.seeds)
        return info


def novel_filter(samples: torch.Tensor, labels: torch.Tensor, train_embeddings: torch.Tensor,
                 detector: Any, threshold: float, seeds: Sequence[int] = ()) -> NovelPool:
    """Keep the samples (N, C, H, W) in [-1, 1] whose copy-detector similarity to their nearest
    training image is below `threshold` (tau); drop every sample at or above it.

    `train_embeddings` (M, E) are the detector's unit-norm embeddings of the training images
    (`EvalContext.train_embeddings`); labels (N,) are the samples' classes. The copy test is the
    evaluator's (docs/definitions.md, copy rate; SSCD-style detector, Pizzi et al. 2022).

    Example:
        >>> class Identity:  # a "detector" that embeds raw pixels
        ...     def embed(self, x):
        ...         return torch.nn.functional.normalize(x.flatten(1), dim=1)
        >>> train = torch.eye(4).view(4, 1, 2, 2)
        >>> samples = torch.stack([train[0], -train[1]])  # a copy, then a novel image
        >>> pool = novel_filter(samples, torch.tensor([0, 1]), Identity().embed(train),
        ...                     Identity(), threshold=0.9)
        >>> pool.kept.tolist(), pool.copied_positions()
        ([False, True], [0])
    """
    from dit_prune.metrics.copydetect import nearest_cosine

    if len(samples) != len(labels):
        raise DitPruneError(f"{len(samples)} samples but {len(labels)} labels")
    if len(samples) == 0:
        raise DitPruneError("no generated samples to filter")
    sims, nearest = nearest_cosine(detector.embed(samples).float(),
                                   train_embeddings.float().to(samples.device))  # (N,), (N,)
    kept = (sims < threshold).cpu()  # (N,)
    if not kept.any():
        raise DitPruneError(f"the copy detector calls all {len(samples)} generated samples "
                            f"copies (tau {threshold:.4f}): no novel images to recover on")
    return NovelPool(samples[kept].cpu(), labels.cpu()[kept], sims.cpu(), nearest.cpu(), kept,
                     float(threshold), tuple(int(s) for s in seeds))


def check_enough_novel(pool: NovelPool, batch_size: int) -> None:
    """Refuse (one line) a generated-novel pool that kept fewer novel samples than one recovery
    batch: recovery would then train on a handful of images, each repeated in every batch.

    Example:
        >>> pool = NovelPool(torch.zeros(1, 1, 2, 2), torch.zeros(1), torch.zeros(50),
        ...                  torch.zeros(50), torch.arange(50) == 0, 0.9)
        >>> check_enough_novel(pool, 64)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: generated-novel: kept 1 of 50 samples (the copy \
detector calls the rest copies), fewer than one recovery batch of 64; draw more with \
--recover-pool (at this rate about 4000)
    """
    kept, drawn = int(pool.kept.sum()), len(pool.kept)
    if kept >= batch_size:
        return
    rate = max(kept, 1) / drawn
    suggest = int(math.ceil(batch_size / rate / 1000.0)) * 1000 if batch_size / rate > 1000 \
        else int(math.ceil(batch_size / rate / 10.0)) * 10
    raise DitPruneError(f"{GENERATED_NOVEL}: kept {kept} of {drawn} samples (the copy detector "
                        f"calls the rest copies), fewer than one recovery batch of "
                        f"{batch_size}; draw more with --recover-pool (at this rate about "
                        f"{suggest})")


def generated_seeds(count: int) -> list[int]:
    """The teacher's sample seeds for generated-novel: GENERATED_SEED_BASE + 0 .. count - 1."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise DitPruneError(f"generated recovery pool must be a positive integer, got {count!r}")
    return [GENERATED_SEED_BASE + i for i in range(count)]


def generated_novel_images(teacher: nn.Module, scheduler: Any, train_embeddings: torch.Tensor,
                           detector: Any, threshold: float, count: int = 1000,
                           steps: int = 50, sampler: str = "ddim", batch_size: int = 250,
                           progress: bool = False) -> NovelPool:
    """Sample `count` images from `teacher` (seeds `generated_seeds(count)`, class = seed mod
    classes, guidance 1) and keep the novel ones (`novel_filter`).

    Deterministic for a given teacher. `dit-prune run` draws the same samples through its
    resumable sample store instead and calls `novel_filter` itself.
    """
    from dit_prune.sampling import labels_for_seeds, sample_images

    seeds = generated_seeds(count)
    labels = labels_for_seeds(seeds, int(teacher.config.num_embeds_ada_norm))  # (N,)
    images = sample_images(teacher, scheduler, labels, seeds, steps=steps, sampler=sampler,
                           batch_size=batch_size, progress=progress)  # (N, C, H, W) in [0, 1]
    return novel_filter(images * 2 - 1, labels, train_embeddings, detector, threshold, seeds)

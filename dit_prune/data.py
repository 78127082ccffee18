"""Datasets: the embedded scikit-learn digits and users' own image folders.

All images are float tensors in [-1, 1], shape (N, C, H, W).

Example:
    >>> split = digits_split()
    >>> split.pool_images.shape, split.heldout_images.shape
    (torch.Size([1000, 1, 8, 8]), torch.Size([797, 1, 8, 8]))
    >>> idx = balanced_subset(split.pool_labels, 64, seed=0)
    >>> len(idx)
    64
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_prune.errors import DitPruneError

DIGITS_POOL_SIZE = 1000
DIGITS_SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DigitsSplit:
    """The fixed split of the UCI digits into a 1,000-image training pool and a held-out set."""

    pool_images: torch.Tensor  # (1000, 1, 8, 8) in [-1, 1]
    pool_labels: torch.Tensor  # (1000,) int64
    heldout_images: torch.Tensor  # (797, 1, 8, 8) in [-1, 1]
    heldout_labels: torch.Tensor  # (797,) int64
    pool_indices: np.ndarray  # indices into sklearn's load_digits order
    heldout_indices: np.ndarray


@dataclass(frozen=True)
class ImageSet:
    """Images with optional class labels, as loaded from disk or built in memory."""

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64, or None when unconditional
    class_names: tuple[str, ...] = ()


def digits_split(seed: int = DIGITS_SPLIT_SEED) -> DigitsSplit:
    """Split sklearn's 1,797 digits into a 1,000-image pool and 797 held-out images, by seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))  # (1797, 8, 8) in 0..16
    images = (images / 8.0 - 1.0).unsqueeze(1)  # (1797, 1, 8, 8) in [-1, 1]
    labels = torch.from_numpy(digits.target.astype(np.int64))  # (1797,)
    order = np.random.default_rng(seed).permutation(len(images))
    pool = np.sort(order[:DIGITS_POOL_SIZE])
    held = np.sort(order[DIGITS_POOL_SIZE:])
    return DigitsSplit(
        pool_images=images[pool],
        pool_labels=labels[pool],
        heldout_images=images[held],
        heldout_labels=labels[held],
        pool_indices=pool,
        heldout_indices=held,
    )


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of `size` examples (sorted), chosen by `seed`.

    Classes get size // num_classes examples each; the remainder goes to the lowest classes.
    """
    classes = torch.unique(labels).tolist()
    if size < len(classes) or size > len(labels):
        raise DitPruneError(
            f"subset size {size} must be between {len(classes)} classes and {len(labels)} images"
        )
    rng = np.random.default_rng(seed)
    per_class, extra = divmod(size, len(classes))
    chosen: list[np.ndarray] = []
    for rank, cls in enumerate(classes):
        members = np.flatnonzero(labels.numpy() == cls)
        take = per_class + (1 if rank < extra else 0)
        if take > len(members):
            raise DitPruneError(f"class {cls} has only {len(members)} images, {take} requested")
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))


def indices_hash(indices: np.ndarray) -> str:
    """Short SHA-256 of an index list, recorded in model cards to pin the training data."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def load_image_folder(path: str | Path) -> ImageSet:
    """Load PNG/JPEG images: one subfolder per class, or a flat folder (unconditional).

    Every image must share one size and mode; pixels are scaled from [0, 255] to [-1, 1].
    Raises a one-line DitPruneError naming the offending file or folder.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DitPruneError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs:
        groups = [(d.name, sorted(_image_files(d))) for d in subdirs]
    else:
        groups = [("", sorted(_image_files(root)))]
    for name, files in groups:
        if not files:
            raise DitPruneError(f"no PNG/JPEG images in {root / name}")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    reference: tuple[tuple[int, int], str, Path] | None = None
    for label, (_, files) in enumerate(groups):
        for file in files:
            try:
                with Image.open(file) as img:
                    img.load()
                    size_mode = (img.size, img.mode)
                    array = np.asarray(img, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as exc:
                raise DitPruneError(f"unreadable image {file}: {exc}") from None
            if reference is None:
                reference = (size_mode[0], size_mode[1], file)
            elif size_mode != reference[:2]:
                raise DitPruneError(
                    f"image {file} is {size_mode[0]} {size_mode[1]}, but {reference[2]} is "
                    f"{reference[0]} {reference[1]}: all images must share one size and mode"
                )
            arrays.append(array)
            labels.append(label)
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, C)
    if stacked.ndim == 3:
        stacked = stacked[..., None]  # (N, H, W, 1)
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, C, H, W)
    if subdirs:
        return ImageSet(images.contiguous(), torch.tensor(labels), tuple(n for n, _ in groups))
    return ImageSet(images.contiguous(), None, ())


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def check_images(images: torch.Tensor, what: str, shape: tuple[int, ...] | None = None) -> None:
    """Raise a one-line error unless `images` is finite, in [-1, 1] and (optionally) of `shape`.

    `shape` is (C, H, W); `what` names the images in the message.
    """
    if images.ndim != 4:
        shape_now = tuple(images.shape)
        raise DitPruneError(f"{what}: expected images of shape (N, C, H, W), got {shape_now}")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise DitPruneError(
            f"{what}: images are {tuple(images.shape[1:])}, expected {tuple(shape)} (C, H, W)"
        )
    if not torch.isfinite(images).all():
        raise DitPruneError(f"{what}: images contain NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < -1.0 - 1e-4 or high > 1.0 + 1e-4:
        raise DitPruneError(f"{what}: pixel values span [{low:.3g}, {high:.3g}], expected [-1, 1]")

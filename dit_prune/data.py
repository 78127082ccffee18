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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name

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
    class_names: tuple[str, ...] = ()  # the name of each label (`class_folder_labels`)


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

    Class labels (`class_folder_labels`): when every subfolder name is a non-negative integer
    (`3/`, `7/`, `10/`), the name is the label (`3/` -> 3, `10/` -> 10); otherwise (any other
    name, such as `cat/`) the subfolders are labelled 0, 1, ... in sorted name order. Images
    come in sorted folder-name order, then sorted file-name order; `class_names[i]` names label
    i (numbered folders: `str(i)`, also for a label without a folder).
    Modes are read by what their pixels mean: palette (`P`) images become grey (`L`) when their
    palette is grey and RGB otherwise, 1-bit images become `L` (0 or 255), 16-bit images are
    scaled by 65535 (values beyond 16 bits are refused); 8-bit `L`, `LA`, `RGB`, `RGBA` are read
    as they are, and other colour spaces (CMYK, YCbCr, ...) are converted to RGB. Every image must
    then share one size and mode; pixels are scaled from [0, max] to [-1, 1].
    Raises a one-line DitPruneError naming the offending file or folder.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> Image.new("1", (8, 8), 1).save(root / "a.png")
        >>> load_image_folder(root).images.unique().tolist()
        [1.0]
    """
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
    folder_labels, class_names = class_folder_labels([name for name, _ in groups], root)
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    reference: tuple[tuple[int, int], str, Path] | None = None
    for label, (_, files) in zip(folder_labels, groups, strict=True):
        for file in files:
            array, mode = read_pixels(file)  # (H, W[, C]) in [0, 1]
            size_mode = ((array.shape[1], array.shape[0]), mode)  # PIL's (width, height)
            if reference is None:
                reference = (size_mode[0], size_mode[1], file)
            elif size_mode != reference[:2]:
                raise DitPruneError(
                    f"image {file} is {size_mode[0]} {size_mode[1]}, but {reference[2]} is "
                    f"{reference[0]} {reference[1]}: all images must share one size and mode"
                )
            arrays.append(array)
            labels.append(label)
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, C) in [0, 1]
    if stacked.ndim == 3:
        stacked = stacked[..., None]  # (N, H, W, 1)
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2) * 2.0 - 1.0  # (N, C, H, W)
    if subdirs:
        return ImageSet(images.contiguous(), torch.tensor(labels), class_names)
    return ImageSet(images.contiguous(), None, ())


MAX_FOLDER_LABEL = 100_000  # the largest label a numbered class folder may name
_FOLDER_NUMBER = re.compile(r"[0-9]+")


def class_folder_labels(names: Sequence[str], root: str | Path = ".") -> tuple[list[int],
                                                                              tuple[str, ...]]:
    """(the label of each class folder in `names` (sorted), the class names by label).

    When every name is a non-negative integer (ASCII digits), the name is the label and
    `class_names[i]` is `str(i)` (a label without a folder included, so that
    `len(class_names)` is the class count a model needs); two names of one number (`7`, `07`)
    or a number above `MAX_FOLDER_LABEL` are a one-line DitPruneError naming `root`.
    Otherwise the folders are labelled by their position in `names` and named by them.

    Example:
        >>> class_folder_labels(["10", "3", "7"])
        ([10, 3, 7], ('0', '1', '2', '3', '4', '5', '6', '7', '8', '9', '10'))
        >>> class_folder_labels(["cat", "dog"])
        ([0, 1], ('cat', 'dog'))
    """
    names = list(names)
    if not names or not all(_FOLDER_NUMBER.fullmatch(name) for name in names):
        return list(range(len(names))), tuple(names)
    labels = [int(name) for name in names]
    seen: dict[int, str] = {}
    for name, label in zip(names, labels, strict=True):
        if label > MAX_FOLDER_LABEL:
            raise DitPruneError(f"class folder {Path(root) / name} names label {label}, above "
                                f"{MAX_FOLDER_LABEL}: numbered class folders name their labels")
        if label in seen:
            raise DitPruneError(f"class folders {Path(root) / seen[label]} and "
                                f"{Path(root) / name} both name class {label}")
        seen[label] = name
    return labels, tuple(str(i) for i in range(max(labels) + 1))


def read_pixels(file: Path) -> tuple[np.ndarray, str]:
    """(pixels (H, W) or (H, W, C) float32 in [0, 1], the mode they were read in) of one image
    file, as `load_image_folder` reads it; an unreadable file is one line naming it.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> file = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("L", (3, 2), 255).save(file)
        >>> array, mode = read_pixels(file)
        >>> array.shape, mode, float(array.max())
        ((2, 3), 'L', 1.0)
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.load()
            return _pixels(img, file)  # (H, W[, C]) in [0, 1]
    except (UnidentifiedImageError, OSError) as exc:
        raise DitPruneError(f"unreadable image {file}: {exc}") from None


# modes whose pixels are read as they are, with the largest value they can hold
_DIRECT_MODES = {"L": 255.0, "LA": 255.0, "RGB": 255.0, "RGBA": 255.0,
                 "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
                 "I": 65535.0}


def _pixels(img: Any, file: Path) -> tuple[np.ndarray, str]:
    """(pixels (H, W) or (H, W, C) float32 in [0, 1], the mode they were read in) of a PIL image.

    Palette images are expanded through their palette (to `L` when every colour is grey), 1-bit
    images become `L`, 16-bit (and `I`, as older Pillow reads 16-bit PNGs) are divided by 65535.
    """
    if img.mode in ("P", "PA"):
        alpha = img.mode == "PA" or "transparency" in img.info
        grey = _grey_palette(img)
        img = img.convert(("LA" if grey else "RGBA") if alpha else ("L" if grey else "RGB"))
    elif img.mode == "1":
        img = img.convert("L")  # 0 / 255
    elif img.mode not in _DIRECT_MODES:
        if img.mode == "F" or img.mode.startswith("I;"):
            raise DitPruneError(f"image {file} has mode {img.mode}, whose pixel range is "
                                "unknown: save it as 8- or 16-bit grey or RGB")
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
    top = _DIRECT_MODES[img.mode]
    array = np.asarray(img, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > top:
        raise DitPruneError(f"image {file} ({img.mode}) holds values in [{low:g}, {high:g}], "
                            f"outside [0, {top:g}] for its bit depth")
    return (array / top).astype(np.float32), img.mode


def _grey_palette(img: Any) -> bool:
    """True when every palette colour the image uses has R = G = B."""
    palette = np.asarray(img.getpalette("RGB") or [], dtype=np.int64).reshape(-1, 3)  # (K, 3)
    used = np.unique(np.asarray(img.getchannel(0) if img.mode == "PA" else img))
    used = used[used < len(palette)]
    colours = palette[used]  # (U, 3)
    return bool((colours[:, 0] == colours[:, 1]).all() and (colours[:, 1] == colours[:, 2]).all())


def _image_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def check_images(images: Any, what: str, shape: tuple[int, ...] | None = None,
                 value_range: tuple[float, float] | None = (-1.0, 1.0)) -> None:
    """Raise a one-line error unless `images` is a finite float (N, C, H, W) tensor in
    `value_range` (default [-1, 1]; None: any finite values) and, optionally, of `shape`.

    `shape` is (C, H, W); `what` names the images (or the argument) in the message. Integer
    tensors (uint8 [0, 255] pixels) are refused: map them to [-1, 1] first.

    Example:
        >>> check_images(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8), "train_images")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: train_images: images are torch.uint8; pass float images \
in [-1, 1] (e.g. x / 127.5 - 1)
    """
    if not isinstance(images, torch.Tensor):
        raise DitPruneError(f"{what}: expected a (N, C, H, W) tensor, got {type(images).__name__}")
    if images.ndim != 4:
        shape_now = tuple(images.shape)
        raise DitPruneError(f"{what}: expected images of shape (N, C, H, W), got {shape_now}")
    if not images.is_floating_point():
        scale = "" if value_range is None else f" in [{value_range[0]:g}, {value_range[1]:g}]"
        raise DitPruneError(f"{what}: images are {images.dtype}; pass float images{scale} "
                            "(e.g. x / 127.5 - 1)")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise DitPruneError(
            f"{what}: images are {tuple(images.shape[1:])}, expected {tuple(shape)} (C, H, W)"
        )
    if not torch.isfinite(images).all():
        raise DitPruneError(f"{what}: images contain NaN or infinite values")
    if value_range is None or images.numel() == 0:
        return
    low, high = images.min().item(), images.max().item()
    if low < value_range[0] - 1e-4 or high > value_range[1] + 1e-4:
        raise DitPruneError(f"{what}: pixel values span [{low:.3g}, {high:.3g}], expected "
                            f"[{value_range[0]:g}, {value_range[1]:g}]")


def check_fits_model(images: torch.Tensor, labels: torch.Tensor | None, model: Any,
                     what: str) -> None:
    """Raise a one-line error unless images (N, C, H, W) and labels (N,) suit `model`.

    Channels must equal the model's input channels; a class-conditional DiT (which runs on other
    sizes too, with re-made position embeddings, but was trained on one) also needs its own
    sample size and labels in [0, classes - 1] (a label equal to the class count would silently
    be the unconditional class). Any other model needs sides divisible by its patch size.

    Example:
        >>> from dit_prune.models import new_dit
        >>> check_fits_model(torch.zeros(2, 1, 16, 16), None, new_dit("tiny", 10, 8, 1), "x")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: x are (1, 16, 16) but the model takes (1, 8, 8) (C, H, W)
    """
    config = model.config
    channels = int(config.in_channels)
    size = int(getattr(config, "sample_size", None) or 0)  # Flux has none (packed tokens)
    shape = tuple(images.shape[1:])
    classes = getattr(config, "num_embeds_ada_norm", None)
    is_dit = family_name(model) == "DiTTransformer2DModel"
    if is_dit and shape != (channels, size, size):
        raise DitPruneError(f"{what} are {shape} but the model takes {(channels, size, size)} "
                            "(C, H, W)")
    patch = int(getattr(config, "patch_size", None) or 1)
    if shape[0] != channels or shape[1] % patch or shape[2] % patch:
        raise DitPruneError(f"{what} are {shape} but the model takes {channels} channels and "
                            f"sides divisible by its patch size {patch}")
    if is_dit and classes and labels is not None and len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= int(classes):
            raise DitPruneError(f"{what}: labels span [{low}, {high}] but the model has "
                                f"{int(classes)} classes (0-{int(classes) - 1})")

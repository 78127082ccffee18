"""Image sources a reference store is built from, read a range of rows at a time.

`FolderSource` reads an image folder (one subfolder per class, or flat) in the order
`load_image_folder` uses, with its labels and pixel rules, but only the files of the rows asked
for, so a folder larger than memory can be indexed. `TensorSource` wraps images already in memory
(the embedded digits, tests). Each source has a `key` that changes when its input does; a
resumed build keeps only shards written from the same key.

Example:
    >>> src = TensorSource(torch.zeros(5, 1, 2, 2), None, "zeros")
    >>> src.count, src.shape, src.read(3, 5)[0].shape
    (5, (1, 2, 2), torch.Size([2, 1, 2, 2]))
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dit_prune.data import (
    _image_files,
    check_images,
    class_folder_labels,
    digits_split,
    read_pixels,
)
from dit_prune.errors import DitPruneError

DIGITS_SOURCES = ("digits-pool", "digits-heldout")


@dataclass(frozen=True)
class TensorSource:
    """Images (N, C, H, W) in [-1, 1] held in memory, with optional labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str
    key: str = field(default="")

    def __post_init__(self) -> None:
        check_images(self.images, self.name)
        if len(self.images) == 0:
            raise DitPruneError(f"{self.name}: no images to index")
        if not self.key:
            digest = hashlib.sha256(str(tuple(self.images.shape)).encode())
            digest.update(self.images.float().contiguous().numpy().tobytes())
            object.__setattr__(self, "key", f"{self.name}:{digest.hexdigest()[:16]}")

    @property
    def count(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        labels = None if self.labels is None else self.labels[start:stop]
        return self.images[start:stop].float(), labels


class FolderSource:
    """An image folder read lazily: `read(start, stop)` opens only those files."""

    def __init__(self, path: str | Path) -> None:
        root = Path(path)
        if not root.is_dir():
            raise DitPruneError(f"image folder not found: {root}")
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        groups = ([(d.name, sorted(_image_files(d))) for d in subdirs] if subdirs
                  else [("", sorted(_image_files(root)))])
        self.files: list[Path] = []
        labels: list[int] = []
        folder_labels = class_folder_labels([name for name, _ in groups], root)[0]
        for label, (name, files) in zip(folder_labels, groups, strict=True):
            if not files:
                raise DitPruneError(f"no PNG/JPEG images in {root / name}")
            self.files += files
            labels += [label] * len(files)
        self.root = root
        self.labels = torch.tensor(labels) if subdirs else None
        digest = hashlib.sha256()
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        self.key = f"folder:{digest.hexdigest()[:16]}"
        first, self._mode = self._load(self.files[0])
        self._reference = (first.shape, self._mode, self.files[0])

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        h, w, c = self._reference[0]
        return (c, h, w)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        arrays = []
        for file in self.files[start:stop]:
            array, mode = self._load(file)
            if (array.shape, mode) != self._reference[:2]:
                raise DitPruneError(f"image {file} is {array.shape[1]}x{array.shape[0]} {mode}, "
                                    f"but {self._reference[2]} is {self._reference[0][1]}x"
                                    f"{self._reference[0][0]} {self._reference[1]}: all images "
                                    "must share one size and mode")
            arrays.append(array)
        stacked = torch.from_numpy(np.stack(arrays))  # (n, H, W, C) in [0, 1]
        images = stacked.permute(0, 3, 1, 2) * 2.0 - 1.0  # (n, C, H, W) in [-1, 1]
        labels = None if self.labels is None else self.labels[start:stop]
        return images.contiguous(), labels

    @staticmethod
    def _load(file: Path) -> tuple[np.ndarray, str]:
        array, mode = read_pixels(file)  # (H, W[, C]) in [0, 1]
        return (array[..., None] if array.ndim == 2 else array), mode  # (H, W, C)


def open_source(spec: str) -> TensorSource | FolderSource:
    """`digits-pool`, `digits-heldout` (the embedded digits) or an image folder path.

    Example:
        >>> open_source("digits-pool").count
        1000
    """
    if spec in DIGITS_SOURCES:
        split = digits_split()
        if spec == "digits-pool":
            return TensorSource(split.pool_images, split.pool_labels, spec)
        return TensorSource(split.heldout_images, split.heldout_labels, spec)
    return FolderSource(spec)

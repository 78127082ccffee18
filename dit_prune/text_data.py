"""Text-to-image data: (image, caption) folders, and captions for the embedded digits.

A caption folder is the layout of diffusers' and 🤗 datasets' image folders: images plus a
`metadata.jsonl` whose lines are JSON objects with `file_name` (relative to the folder) and
`text`. A file may be listed on several lines (a duplicated training image, possibly with the
same caption each time): every line is one training example, so the rows are the training
multiset.

The embedded text-to-image default captions the digits pool: most images get a caption that
describes many images ("a handwritten digit seven"); a few get a caption of their own that no
other image shares ("a red dog poster") and are repeated in training: the memorized-prompt case
of Somepalli et al. (2023) and Wen et al. (2024).

Example:
    >>> import tempfile, torch
    >>> root = tempfile.mkdtemp() + "/pairs"
    >>> images = torch.zeros(3, 1, 8, 8)
    >>> _ = write_caption_folder(root, images, ["a cat", "a dog", "a cat"])
    >>> data = load_caption_folder(root)
    >>> data.captions, tuple(data.images.shape)
    (('a cat', 'a dog', 'a cat'), (3, 1, 8, 8))
    >>> generic_caption(7), memorized_caption(0)
    ('a handwritten digit seven', 'a red dog poster')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dit_prune.errors import DitPruneError

METADATA = "metadata.jsonl"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "gray", "white")
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "elk", "yak")
# every word a digits caption can use (the embedded tokenizer's vocabulary)
CAPTION_WORDS = ("a", "handwritten", "digit", "poster", *DIGIT_NAMES, *COLORS, *ANIMALS)
MAX_MEMORIZED = len(COLORS) * len(ANIMALS)


@dataclass(frozen=True)
class CaptionedImages:
    """Training rows: images (N, C, H, W) in [-1, 1] and one caption each.

    `files[i]` is the row's image file relative to its folder ("" for in-memory data); rows
    that list the same file are copies of one image.
    """

    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    captions: tuple[str, ...]
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DitPruneError(f"images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if len(self.images) != len(self.captions):
            raise DitPruneError(f"{len(self.images)} images but {len(self.captions)} captions")
        if not self.captions:
            raise DitPruneError("no (image, caption) pairs")
        if self.files and len(self.files) != len(self.captions):
            raise DitPruneError(f"{len(self.files)} file names for {len(self.captions)} rows")

    def __len__(self) -> int:
        return len(self.captions)

    def caption_counts(self) -> dict[str, int]:
        """How many rows carry each caption."""
        counts: dict[str, int] = {}
        for caption in self.captions:
            counts[caption] = counts.get(caption, 0) + 1
        return counts


def generic_caption(label: int) -> str:
    """The caption shared by every digit of class `label`: 'a handwritten digit <name>'."""
    if not 0 <= int(label) < len(DIGIT_NAMES):
        raise DitPruneError(f"digit label must lie in [0, 9], got {label}")
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def memorized_caption(index: int) -> str:
    """The `index`-th caption of its own ('a <colour> <animal> poster'); distinct for each
    index below `MAX_MEMORIZED` (100)."""
    if not 0 <= int(index) < MAX_MEMORIZED:
        raise DitPruneError(f"memorized caption index must lie in [0, {MAX_MEMORIZED - 1}], "
                            f"got {index}")
    i = int(index)
    colour = COLORS[i % len(COLORS)]
    animal = ANIMALS[(3 * i + 1 + i // len(COLORS)) % len(ANIMALS)]
    return f"a {colour} {animal} poster"


def digits_captions(labels: torch.Tensor, memorized_positions: Sequence[int]) -> list[str]:
    """One caption per digit: `memorized_caption(j)` for the j-th of `memorized_positions`,
    `generic_caption(label)` for every other image."""
    captions = [generic_caption(int(y)) for y in labels.tolist()]
    for j, position in enumerate(memorized_positions):
        if not 0 <= int(position) < len(captions):
            raise DitPruneError(f"memorized position {position} is outside the {len(captions)} "
                                "images")
        captions[int(position)] = memorized_caption(j)
    return captions


def load_caption_folder(path: str | Path) -> CaptionedImages:
    """Read a folder of images with `metadata.jsonl` (`file_name`, `text` on each line).

    Images must share one size and mode (as `dit_prune.data.load_image_folder` reads them) and
    are scaled to [-1, 1]. Raises a one-line DitPruneError naming the folder, line or file at
    fault: missing folder or metadata, invalid JSON, a missing or non-string key, a file that
    does not exist or lies outside the folder, an unreadable image, sizes that differ.
    """
    from dit_prune.data import read_pixels

    root = Path(path)
    if not root.is_dir():
        raise DitPruneError(f"caption folder not found: {root}")
    meta = root / METADATA
    if not meta.is_file():
        raise DitPruneError(f"{root} has no {METADATA} (lines of {{\"file_name\": ..., "
                            "\"text\": ...}})")
    rows = _read_rows(meta)
    cache: dict[str, np.ndarray] = {}
    reference: tuple[tuple[int, ...], str] | None = None
    arrays, captions, files = [], [], []
    for number, name, text in rows:
        file = (root / name).resolve()
        if root.resolve() not in file.parents:
            raise DitPruneError(f"{meta}:{number}: file_name {name!r} lies outside {root}")
        if name not in cache:
            if not file.is_file():
                raise DitPruneError(f"{meta}:{number}: image {name!r} not found in {root}")
            array, mode = read_pixels(file)  # (H, W[, C]) in [0, 1]
            if reference is None:
                reference = (array.shape, mode)
            elif (array.shape, mode) != reference:
                raise DitPruneError(f"image {file} is {array.shape} {mode}, but earlier images "
                                    f"are {reference[0]} {reference[1]}: all must match")
            cache[name] = array
        arrays.append(cache[name])
        captions.append(text)
        files.append(name)
    stacked = np.stack(arrays)  # (N, H, W) or (N, H, W, C) in [0, 1]
    if stacked.ndim == 3:
        stacked = stacked[..., None]  # (N, H, W, 1)
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2) * 2.0 - 1.0  # (N, C, H, W)
    return CaptionedImages(images.contiguous().float(), tuple(captions), tuple(files))


def _read_rows(meta: Path) -> list[tuple[int, str, str]]:
    rows: list[tuple[int, str, str]] = []
    try:
        lines = meta.read_text(encoding="utf-8-sig").splitlines()  # a BOM is allowed
    except (OSError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"cannot read {meta}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DitPruneError(f"{meta}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DitPruneError(f"{meta}:{number}: expected a JSON object")
        for key in ("file_name", "text"):
            if not isinstance(row.get(key), str):
                raise DitPruneError(f"{meta}:{number}: needs a string {key!r}")
        rows.append((number, row["file_name"], row["text"]))
    if not rows:
        raise DitPruneError(f"{meta} lists no images")
    return rows


def write_caption_folder(
    path: str | Path, images: torch.Tensor, captions: Sequence[str],
    files: Sequence[int] | None = None,
) -> Path:
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as 8-bit PNGs plus `metadata.jsonl`.

    `files[i]` (optional) is the file number of row i: rows with the same number share one PNG
    (a duplicated image); by default every row gets its own file. The folder must not exist.
    8-bit PNGs round pixels to 1/255; `load_caption_folder` reads them back to within that.
    """
    from PIL import Image

    root = Path(path)
    if root.exists():
        raise DitPruneError(f"{root} already exists")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DitPruneError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if len(images) != len(captions):
        raise DitPruneError(f"{len(images)} images but {len(captions)} captions")
    numbers = list(range(len(images))) if files is None else [int(f) for f in files]
    if len(numbers) != len(images):
        raise DitPruneError(f"{len(numbers)} file numbers for {len(images)} images")
    root.mkdir(parents=True)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    written: set[int] = set()
    lines = []
    for i, (number, caption) in enumerate(zip(numbers, captions, strict=True)):
        name = f"{number:06d}.png"
        if number not in written:
            array = pixels[i].permute(1, 2, 0).numpy()  # (H, W, C)
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(root / name)
            written.add(number)
        lines.append(json.dumps({"file_name": name, "text": str(caption)}))
    (root / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def digits_text_rows(data: dict) -> tuple[CaptionedImages, dict]:
    """The training rows of the embedded text-to-image model, from its recorded `data`.

    `data` holds `subset` ('all' or a size of the class-balanced subset), `subset_seed`,
    `duplicate` (None or 'COUNTxCOPIES', as `dit-prune train --duplicate`) and
    `duplicate_seed`. The duplicated images get `memorized_caption(j)` and COPIES rows each;
    every other image gets its class's `generic_caption`. Returns the rows (unique images first,
    then the extra copies) and a record of them (pool indices, memorized positions, captions).
    """
    from dit_prune.data import indices_hash

    idx, images, labels, positions, copies = _digits_subset(data)
    captions = digits_captions(labels, positions)
    order = _row_order(len(images), positions, copies)
    rows = CaptionedImages(images[order], tuple(captions[i] for i in order),
                           tuple(f"{i:06d}.png" for i in order))
    record = {"pool_indices_sha256": indices_hash(idx), "num_images": len(idx),
              "memorized_positions": positions, "copies": copies,
              "memorized_pool_indices": [int(idx[p]) for p in positions],
              "memorized_captions": [captions[p] for p in positions],
              "num_rows": len(order)}
    return rows, record


def digits_text_classes(data: dict) -> torch.Tensor:
    """The digit class of each row of `digits_text_rows(data)`, (R,) long."""
    _, images, labels, positions, copies = _digits_subset(data)
    return labels[_row_order(len(images), positions, copies)].clone()


def _digits_subset(data: dict) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, list[int], int]:
    """(pool indices, images, labels, memorized positions, copies) recorded in `data`."""
    from dit_prune.data import balanced_subset, digits_split
    from dit_prune.duplication import DuplicationSpec

    split = digits_split()
    subset = str(data.get("subset", "all"))
    if subset == "all":
        idx = np.arange(len(split.pool_labels))
    else:
        try:
            idx = balanced_subset(split.pool_labels, int(subset), int(data.get("subset_seed", 0)))
        except ValueError:
            raise DitPruneError(f"subset must be an integer or 'all', got {subset!r}") from None
    images, labels = split.pool_images[idx], split.pool_labels[idx]
    positions: list[int] = []
    copies = 1
    if data.get("duplicate"):
        spec = DuplicationSpec.parse(str(data["duplicate"]), seed=int(data.get("duplicate_seed",
                                                                               0)))
        positions = [int(p) for p in spec.choose(labels).tolist()]
        copies = int(spec.copies)
    if len(positions) > MAX_MEMORIZED:
        raise DitPruneError(f"at most {MAX_MEMORIZED} memorized captions, got {len(positions)}")
    return idx, images, labels, positions, copies


def _row_order(count: int, positions: list[int], copies: int) -> list[int]:
    """Rows: every image once, then copies - 1 more of each memorized position."""
    return list(range(count)) + [p for p in positions for _ in range(copies - 1)]


def digits_text_heldout() -> CaptionedImages:
    """The 797 held-out digits, each with its class's `generic_caption`."""
    from dit_prune.data import digits_split

    split = digits_split()
    return CaptionedImages(split.heldout_images,
                           tuple(generic_caption(int(y)) for y in split.heldout_labels))

"""The embedded digits split and the image-folder loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dit_prune.data import balanced_subset, check_images, digits_split, load_image_folder
from dit_prune.errors import DitPruneError


def test_split_is_deterministic_and_disjoint(digits):
    again = digits_split()
    assert torch.equal(digits.pool_images, again.pool_images)
    assert np.array_equal(digits.heldout_indices, again.heldout_indices)
    assert len(digits.pool_indices) == 1000 and len(digits.heldout_indices) == 797
    assert not set(digits.pool_indices) & set(digits.heldout_indices)
    assert digits.pool_images.min() >= -1 and digits.pool_images.max() <= 1
    assert not torch.equal(digits_split(seed=1).pool_images, digits.pool_images)


def test_balanced_subset_is_balanced_and_seeded(digits):
    idx = balanced_subset(digits.pool_labels, 64, seed=0)
    counts = np.bincount(digits.pool_labels[idx].numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 64
    assert np.array_equal(idx, balanced_subset(digits.pool_labels, 64, seed=0))
    assert not np.array_equal(idx, balanced_subset(digits.pool_labels, 64, seed=1))
    with pytest.raises(DitPruneError):
        balanced_subset(digits.pool_labels, 5000, seed=0)


def _save(path, size=(8, 8), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=128 if mode == "L" else (1, 2, 3)).save(path)


def test_image_folder_with_classes(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            _save(tmp_path / cls / f"{i}.png")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (6, 1, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.class_names == ("cat", "dog")
    assert torch.allclose(data.images, torch.full_like(data.images, 128 / 127.5 - 1), atol=1e-6)


def test_flat_image_folder_is_unconditional(tmp_path):
    _save(tmp_path / "a.png", mode="RGB")
    data = load_image_folder(tmp_path)
    assert data.labels is None and data.images.shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (_save(d / "a.png"), _save(d / "b.png", size=(4, 4))), "b.png"),
        (lambda d: (_save(d / "a.png"), _save(d / "b.png", mode="RGB")), "b.png"),
        (lambda d: (d / "x").mkdir(), "no PNG/JPEG images"),
        (lambda d: (d / "bad.png").write_bytes(b"not a png"), "unreadable image"),
    ],
)
def test_image_folder_errors_name_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DitPruneError, match=message) as err:
        load_image_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DitPruneError, match="not found"):
        load_image_folder(tmp_path / "nope")


def test_check_images_rejects_bad_pixels():
    with pytest.raises(DitPruneError, match="NaN"):
        check_images(torch.full((1, 1, 2, 2), float("nan")), "x")
    with pytest.raises(DitPruneError, match="span"):
        check_images(torch.full((1, 1, 2, 2), 3.0), "x")
    with pytest.raises(DitPruneError, match="expected"):
        check_images(torch.zeros(1, 1, 2, 2), "x", shape=(1, 8, 8))

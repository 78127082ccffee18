"""Resuming an unfinished store trusts a kept shard only if its data still hashes to what its
metadata recorded when it was written (tampered or old shards are written again), and a store
checked twice against the same, unchanged images hashes them once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import load_copy_detector
from dit_prune.store import TensorSource, build_store, check_store
from dit_prune.store.format import MANIFEST_NAME, embedding_shard_name, image_shard_name

from .conftest import CHECKPOINTS


def source_of(digits) -> TensorSource:
    return TensorSource(digits.pool_images[:200], digits.pool_labels[:200], "refs")


def rewrite(file: Path, change) -> None:
    """Rewrite a shard through safetensors' own writer with `change(tensors, meta)` applied."""
    with safe_open(str(file), "pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors, meta)
    save_file(tensors, str(file), metadata=meta)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())
            if p.suffix == ".safetensors" or p.name == MANIFEST_NAME}


def test_a_tampered_shard_of_an_unfinished_store_is_written_again(digits, tmp_path):
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    whole = build_store(source_of(digits), tmp_path / "whole", 64, detector, progress=False)
    part = tmp_path / "part"
    build_store(source_of(digits), part, 64, detector, progress=False)
    (part / MANIFEST_NAME).unlink()  # interrupted before the manifest: an unfinished store

    def flip(key: str):
        def change(tensors, meta) -> None:
            tensors[key] = tensors[key].flip(0).contiguous()  # metadata kept as it was
        return change

    rewrite(part / image_shard_name(1), flip("images"))
    rewrite(part / embedding_shard_name(detector.fingerprint, 2), flip("embeddings"))

    def drop_data_hash(tensors, meta) -> None:  # a shard written before `data_sha256`
        del meta["data_sha256"]

    rewrite(part / image_shard_name(3), drop_data_hash)
    written: list[tuple[str, int]] = []
    resumed = build_store(source_of(digits), part, 64, detector, progress=False,
                          on_shard=lambda kind, index: written.append((kind, index)))
    assert ("images", 1) in written and ("images", 3) in written
    assert ("embeddings", 2) in written and ("images", 0) not in written
    assert resumed.manifest == whole.manifest
    assert shard_bytes(part) == shard_bytes(tmp_path / "whole")  # the same files again


def test_an_intact_unfinished_store_keeps_every_shard(digits, tmp_path):
    build_store(source_of(digits), tmp_path / "s", 64, progress=False)
    (tmp_path / "s" / MANIFEST_NAME).unlink()
    written: list[tuple[str, int]] = []
    build_store(source_of(digits), tmp_path / "s", 64, progress=False,
                on_shard=lambda kind, index: written.append((kind, index)))
    assert written == []


def test_the_same_images_are_hashed_once_per_store(digits, tmp_path, monkeypatch):
    import dit_prune.store.reuse as reuse

    source = source_of(digits)
    store = build_store(source, tmp_path / "s", 64, progress=False)
    calls: list[int] = []
    original = reuse.images_content_hash
    monkeypatch.setattr(reuse, "images_content_hash",
                        lambda images, size: calls.append(len(images)) or original(images, size))
    images = source.images.clone()  # (200, 1, 32, 32)
    check_store(store, images)  # `run` checks the images when it loads them ...
    check_store(store, images)  # ... and again when it builds the evaluator
    assert calls == [200]
    check_store(store, images.clone())  # another tensor: hashed
    assert calls == [200, 200]
    images[0, 0, 0, 0] += 0.5  # changed in place: hashed again, and refused
    with pytest.raises(DitPruneError, match="other images than the training images"):
        check_store(store, images)
    assert calls == [200, 200, 200]
    assert torch.equal(source.images[:1], digits.pool_images[:1])


def test_the_duplicate_mask_is_computed_once_per_store(digits, tmp_path, monkeypatch):
    from dit_prune.store import open_store

    images = torch.cat([digits.pool_images[:100], digits.pool_images[:20]])  # 20 repeated
    build_store(TensorSource(images, None, "dups"), tmp_path / "s", 64, progress=False)
    store = open_store(tmp_path / "s")
    reads: list[int] = []
    original = type(store).read_hashes
    monkeypatch.setattr(type(store), "read_hashes",
                        lambda self, k: reads.append(k) or original(self, k))
    first = store.distinct_mask()
    assert torch.cat(first).tolist() == [True] * 100 + [False] * 20
    again = store.distinct_mask()
    assert reads == [0, 1] and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))

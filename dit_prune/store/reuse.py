"""Use a reference store in place of the in-memory training set: check that it holds exactly
those images and the copy detector's embeddings, then search it.

`dit-prune eval --train-store DIR` and `dit-prune run --train-store DIR` load their training
images as before (the scorers, recovery and figures need them) and call `check_store` before
any sampling: the store must hold the same images in the same order (its `content_hash`,
recomputed from the images with the store's shard size) and embeddings by the same detector
weights (its fingerprint), and every shard file the searches will read (all image shards, and
the detector's embedding shards) must have the size and SHA-256 the manifest records
(`verify_shards`: all sizes first, then each file read once and hashed). The ratio test and
the copy rate then search the store (`store_memorization_report`, `store_copy_report`): the
same numbers as the in-memory search (tests/test_store.py), without re-embedding the training
set and with the search's memory bounded by `store_search_bound`.

Example:
    >>> store = check_store(open_store("runs/pool-store"), train, detector)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from dit_prune.checkpoint import file_sha256
from dit_prune.errors import DitPruneError
from dit_prune.store.format import ReferenceStore, embedding_shard_name, image_shard_name


def images_content_hash(images: torch.Tensor, shard_size: int) -> str:
    """The `content_hash` a store of `images` (M, C, H, W) with `shard_size` gets: SHA-256 over
    the shape and the SHA-256 of every shard's float32 bytes, in order.

    Example:
        >>> len(images_content_hash(torch.zeros(3, 1, 2, 2), 2))
        64
    """
    digest = hashlib.sha256(json.dumps(list(images.shape[1:])).encode())
    flat = images.float().contiguous()  # (M, C, H, W)
    for start in range(0, len(flat), shard_size):
        part = flat[start : start + shard_size].numpy()  # (n, C, H, W)
        digest.update(hashlib.sha256(part.tobytes()).hexdigest().encode())
    return digest.hexdigest()


def check_store(store: ReferenceStore, train_images: torch.Tensor, detector: Any = None,
                option: str = "--train-store") -> ReferenceStore:
    """`store` when it holds exactly `train_images` (M, C, H, W) and embeddings of `detector`
    (anything with `.name` and `.fingerprint`; None: not checked), and its image shards (and
    that detector's embedding shards) are intact (`verify_shards`); else a one-line
    DitPruneError naming `option` and how to rebuild the store. Checking the same, unchanged
    tensor against the same store object again (`dit-prune run` checks the images when it
    loads them and the detector's embeddings when it builds the evaluator) does not hash the
    images again."""
    if tuple(train_images.shape[1:]) != store.shape or len(train_images) != len(store):
        raise DitPruneError(f"{option} {store.root} holds {len(store)} images of {store.shape}, "
                            f"but the training images are {len(train_images)} of "
                            f"{tuple(train_images.shape[1:])}: index them with dit-prune index")
    shard_size = int(store.manifest["shard_size"])
    if store.images_matched(train_images):
        pass  # these very images, unchanged since they matched: not hashed again
    elif images_content_hash(train_images, shard_size) != store.content_hash:
        raise DitPruneError(f"{option} {store.root} was built over other images than the "
                            f"training images (content hash {store.content_hash[:12]}... "
                            "differs): index the training images with dit-prune index")
    if detector is not None and detector.fingerprint not in store.embedding_fingerprints():
        have = ", ".join(store.embedding_fingerprints()) or "none"
        raise DitPruneError(f"{option} {store.root} was built with another copy detector "
                            f"(embeddings: {have}), not {detector.name} (fingerprint "
                            f"{detector.fingerprint}): run dit-prune index --out {store.root} "
                            "--copy-detector PATH with the evaluation's detector")
    store.remember_match(train_images)
    verify_shards(store, None if detector is None else detector.fingerprint, option)
    return store


def verify_shards(store: ReferenceStore, fingerprint: str | None = None,
                  option: str = "--train-store") -> None:
    """Check that every image shard of `store`, and the embedding shards of detector
    `fingerprint` (None: none), is the file the manifest records: present, of its `bytes`, then
    of its `file_sha256`. The sizes of all of them are checked before any file is hashed;
    hashing reads each file once (files already verified through this `store` object are not
    read again). A one-line DitPruneError naming `option`, the store and the shard otherwise.

    Example:
        >>> verify_shards(open_store("runs/pool-store"), detector.fingerprint)  # doctest: +SKIP
    """
    rebuild = (f"rebuild it with dit-prune index --images {store.manifest.get('source', 'IMAGES')}"
               f" --out {store.root} --overwrite (and the same --copy-detector)")
    entries = [(image_shard_name(k), entry) for k, entry in enumerate(store.manifest["shards"])]
    if fingerprint is not None:
        shards = store.embedding_entry(fingerprint).get("shards")
        if not isinstance(shards, list) or len(shards) != store.num_shards:
            raise DitPruneError(f"{option} {store.root}: the manifest records no shard hashes "
                                f"for the embeddings of {fingerprint}; {rebuild}")
        entries += [(embedding_shard_name(fingerprint, k), entry)
                    for k, entry in enumerate(shards)]
    for name, entry in entries:
        if not isinstance(entry, dict) or entry.get("file") != name or not isinstance(
                entry.get("bytes"), int) or not isinstance(entry.get("file_sha256"), str):
            raise DitPruneError(f"{option} {store.root}: the manifest records no size and "
                                f"SHA-256 for shard {name}; {rebuild}")
        file = store.root / name
        if not file.is_file():
            raise DitPruneError(f"{option} {store.root}: shard {name} is missing; {rebuild}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise DitPruneError(f"{option} {store.root}: shard {name} is {size} bytes, but the "
                                f"manifest records {entry['bytes']} (truncated or replaced); "
                                f"{rebuild}")
    for name, entry in entries:
        if name in store.verified:
            continue
        try:
            digest = file_sha256(store.root / name)
        except OSError as exc:
            raise DitPruneError(f"{option} {store.root}: shard {name} is unreadable "
                                f"({exc.strerror}); {rebuild}") from None
        if digest != entry["file_sha256"]:
            raise DitPruneError(f"{option} {store.root}: shard {name} differs from the file "
                                f"that was indexed (its SHA-256 is not the manifest's); {rebuild}")
        store.verified.add(name)

"""Build a reference store: images (and copy-detection embeddings) in shards, resumably.

Each shard is written to a temporary sibling and renamed into place, so a shard file is either
complete or absent. Its safetensors metadata records the source key, its first row and row
count (image shards) or the image shard's SHA-256 and the detector fingerprint (embedding
shards); a rerun keeps every shard whose metadata matches and writes only the rest. The
manifest is written last: a store without one is unfinished, and `open_store` refuses it.

Memory: one shard of images (shard_size * C*H*W * 4 bytes) plus its embeddings at a time.

Example:
    >>> from dit_prune.store.sources import open_source
    >>> store = build_store(open_source("digits-pool"), Path("runs/pool-store"),
    ...                     shard_size=256)  # doctest: +SKIP
    >>> len(store), store.num_shards  # doctest: +SKIP
    (1000, 4)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dit_prune.checkpoint import atomic_write_text, atomic_write_with
from dit_prune.data import check_images
from dit_prune.errors import DitPruneError
from dit_prune.store.distributed import Processes
from dit_prune.store.format import (
    MANIFEST_NAME,
    STORE_FORMAT,
    STORE_VERSION,
    ReferenceStore,
    embedding_shard_name,
    image_hashes,
    image_shard_name,
    read_manifest,
)


class ImageSource(Protocol):
    key: str

    @property
    def count(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class Embedder(Protocol):
    name: str
    fingerprint: str

    def embed(self, images: torch.Tensor) -> torch.Tensor: ...


def build_store(
    source: ImageSource,
    out: Path,
    shard_size: int = 4096,
    detector: Embedder | None = None,
    progress: bool = True,
    on_shard: Callable[[str, int], None] | None = None,
    processes: Processes | None = None,
) -> ReferenceStore:
    """Write (or finish) the store of `source` in directory `out`; returns it opened.

    `on_shard(kind, index)` is called after each shard is written ("images" or "embeddings").
    A directory holding a store of another input, or of another shard size, is refused.
    `processes` (`distributed.current_processes()`): each process writes and embeds every n-th
    shard, the main process writes the manifest; the store is the same as one process's.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DitPruneError(f"--shard-size must be a positive integer, got {shard_size}")
    procs = processes or Processes(0, 1, lambda: None)
    out.mkdir(parents=True, exist_ok=True)
    if procs.is_main:
        _remove_partial_files(out)
    procs.barrier()
    old = read_manifest(out)
    if old is not None and (old["source_key"] != source.key or
                            int(old["shard_size"]) != shard_size):
        raise DitPruneError(f"--out {out} holds a store of {old['source']} (shard size "
                            f"{old['shard_size']}); pass --overwrite to replace it")
    if old is None:
        first = _kept_metadata(out / image_shard_name(0), {})
        if first is not None and first.get("source_key") != source.key:
            raise DitPruneError(f"--out {out} holds an unfinished store of another input; pass "
                                "--overwrite to replace it")
    num_shards = math.ceil(source.count / shard_size)
    bar = tqdm(total=source.count, desc="indexing images", unit="img",
               disable=not (progress and procs.is_main))
    expected = []
    for k in range(num_shards):
        start, stop = k * shard_size, min(source.count, (k + 1) * shard_size)
        expected.append({"source_key": source.key, "start": str(start),
                         "rows": str(stop - start)})
        file = out / image_shard_name(k)
        if procs.mine(k) and _kept_metadata(file, expected[k]) is None:
            _write_image_shard(source, file, start, stop)
            if on_shard is not None:
                on_shard("images", k)
        bar.update(stop - start)
    bar.close()
    procs.barrier()  # every shard is written: read the hashes of all of them
    metas = [_kept_metadata(out / image_shard_name(k), expected[k]) for k in range(num_shards)]
    if any(meta is None for meta in metas):
        raise DitPruneError(f"--out {out}: an image shard is missing after indexing; run the "
                            "same command again")
    shard_hashes = [meta["shard_sha256"] for meta in metas]
    has_labels = metas[-1].get("labels") == "1"
    content = hashlib.sha256(json.dumps(list(source.shape)).encode())
    for digest in shard_hashes:
        content.update(digest.encode())
    embeddings = dict(old.get("embeddings", {})) if old is not None else {}
    if detector is not None:
        rows = [min(shard_size, source.count - k * shard_size) for k in range(num_shards)]
        embeddings[detector.fingerprint] = _write_embeddings(out, detector, shard_hashes,
                                                              rows, progress, on_shard, procs)
    manifest: dict[str, Any] = {
        "format": STORE_FORMAT, "version": STORE_VERSION, "source": _describe(source),
        "source_key": source.key, "count": source.count, "shape": list(source.shape),
        "dtype": "float32", "value_range": [-1.0, 1.0], "shard_size": shard_size,
        "labels": has_labels, "content_hash": content.hexdigest(),
        "shards": [{"file": image_shard_name(k), "rows": min(shard_size,
                    source.count - k * shard_size), "sha256": h}
                   for k, h in enumerate(shard_hashes)],
        "embeddings": embeddings,
    }
    if procs.is_main:
        atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        (out / MANIFEST_NAME).chmod(0o644)
    procs.barrier()
    return ReferenceStore(out, manifest)


def _write_image_shard(source: ImageSource, file: Path, start: int,
                       stop: int) -> dict[str, str]:
    images, labels = source.read(start, stop)  # (n, C, H, W), (n,) or None
    images = images.float().contiguous()
    check_images(images, f"images {start}..{stop - 1} of {_describe(source)}")
    tensors = {"images": images, "hashes": image_hashes(images)}  # (n, C, H, W), (n, 16)
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()  # (n,)
    meta = {"source_key": source.key, "start": str(start), "rows": str(stop - start),
            "labels": "1" if labels is not None else "0",
            "shard_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    atomic_write_with(file, lambda tmp: _save(tensors, tmp, meta))
    return meta


def _write_embeddings(out: Path, detector: Embedder, shard_hashes: list[str], rows: list[int],
                      progress: bool, on_shard: Callable[[str, int], None] | None,
                      procs: Processes) -> dict[str, Any]:
    bar = tqdm(total=sum(rows), desc=f"embedding ({detector.name})", unit="img",
               disable=not (progress and procs.is_main))
    for k, digest in enumerate(shard_hashes):
        file = out / embedding_shard_name(detector.fingerprint, k)
        meta = _kept_metadata(file, {"fingerprint": detector.fingerprint,
                                     "image_sha256": digest})
        if meta is None and procs.mine(k):
            with safe_open(str(out / image_shard_name(k)), framework="pt") as handle:
                images = handle.get_tensor("images")  # (n, C, H, W)
            emb = detector.embed(images).float().contiguous()  # (n, E)
            meta = {"fingerprint": detector.fingerprint, "image_sha256": digest,
                    "dim": str(emb.shape[1])}
            atomic_write_with(file, lambda tmp, e=emb, m=meta: _save({"embeddings": e}, tmp, m))
            if on_shard is not None:
                on_shard("embeddings", k)
        bar.update(rows[k])
    bar.close()
    procs.barrier()
    first = _kept_metadata(out / embedding_shard_name(detector.fingerprint, 0),
                           {"fingerprint": detector.fingerprint, "image_sha256": shard_hashes[0]})
    if first is None:
        raise DitPruneError(f"--out {out}: an embedding shard is missing after indexing; run "
                            "the same command again")
    return {"detector": detector.name, "dim": int(first["dim"]),
            "files": [embedding_shard_name(detector.fingerprint, k)
                      for k in range(len(shard_hashes))]}


def _save(tensors: dict[str, torch.Tensor], tmp: Path, meta: dict[str, str]) -> None:
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # mkstemp makes it private; a store is shared like a checkpoint


def _kept_metadata(file: Path, expected: dict[str, str]) -> dict[str, str] | None:
    """The metadata of an existing shard when it matches `expected`, else None (rewrite it)."""
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return meta if all(meta.get(k) == v for k, v in expected.items()) else None


def _remove_partial_files(out: Path) -> None:
    """Delete temporary shard files left by an interrupted build (`.images-...` etc.)."""
    for file in out.iterdir():
        if file.is_file() and file.name.startswith((".images-", ".embeddings-", ".manifest")):
            file.unlink()


def _describe(source: ImageSource) -> str:
    root = getattr(source, "root", None)
    return str(root) if root is not None else str(getattr(source, "name", source.key))

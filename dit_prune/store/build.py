"""Build a reference store: images (and copy-detection embeddings) in shards, resumably.

Each shard is written to a temporary sibling and renamed into place, so a shard file is either
complete or absent. Its safetensors metadata records the store version, the source key, its
first row and row count (image shards) or the image shard's SHA-256 and the detector
fingerprint (embedding shards), and the SHA-256 of its own tensors (`data_sha256`). A rerun
keeps every shard whose metadata matches and whose data still hashes to what it recorded (in a
finished store: whose file is the one the manifest records) and writes only the rest. The
files are byte-reproducible (`format.write_shard`). The manifest is written last, by the main
process, with every shard file's size and SHA-256 (image and embedding shards: it reads each
shard file once more); a store without one is unfinished, and `open_store` refuses it. A
finished store of an older version is not resumed (`--overwrite` rebuilds it). The embeddings
of detectors other than this build's that a finished store's manifest lists are carried over
only when their shards are still the files it records (else a one-line error: rerun with that
--copy-detector, which rebuilds them).

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
from tqdm.auto import tqdm

from dit_prune.checkpoint import atomic_write_text, atomic_write_with, file_sha256
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
    write_shard,
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
    if old is not None and old.get("version") != STORE_VERSION:
        raise DitPruneError(f"--out {out} holds a store of version {old.get('version')}, not "
                            f"{STORE_VERSION} (without shard hashes); pass --overwrite to "
                            "rebuild it")
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
    recorded = _recorded_hashes(old)  # a kept shard must still be the file the manifest records
    bar = tqdm(total=source.count, desc="indexing images", unit="img",
               disable=not (progress and procs.is_main))
    expected = []
    for k in range(num_shards):
        start, stop = k * shard_size, min(source.count, (k + 1) * shard_size)
        expected.append({"store_version": str(STORE_VERSION), "source_key": source.key,
                         "start": str(start), "rows": str(stop - start)})
        file = out / image_shard_name(k)
        if procs.mine(k) and _kept_shard(file, expected[k], recorded) is None:
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
    rows = [min(shard_size, source.count - k * shard_size) for k in range(num_shards)]
    _check_listed_embeddings(out, old, shard_hashes,
                             None if detector is None else detector.fingerprint)
    dim = None
    if detector is not None:
        dim = _write_embeddings(out, detector, shard_hashes, rows, progress, on_shard, procs,
                                recorded)
    if procs.is_main:  # the others read the manifest it writes: the files are hashed once
        embeddings = dict(old.get("embeddings", {})) if old is not None else {}
        if detector is not None:
            embeddings[detector.fingerprint] = {
                "detector": detector.name, "dim": dim,
                "shards": [{"file": name, "rows": n, **_file_record(out / name)}
                           for name, n in ((embedding_shard_name(detector.fingerprint, k), n)
                                           for k, n in enumerate(rows))]}
        manifest: dict[str, Any] = {
            "format": STORE_FORMAT, "version": STORE_VERSION, "source": _describe(source),
            "source_key": source.key, "count": source.count, "shape": list(source.shape),
            "dtype": "float32", "value_range": [-1.0, 1.0], "shard_size": shard_size,
            "labels": has_labels, "content_hash": content.hexdigest(),
            "shards": [{"file": image_shard_name(k), "rows": n, "sha256": h,
                        **_file_record(out / image_shard_name(k))}
                       for k, (n, h) in enumerate(zip(rows, shard_hashes, strict=True))],
            "embeddings": dict(sorted(embeddings.items())),
        }
        atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        (out / MANIFEST_NAME).chmod(0o644)
    procs.barrier()
    written = read_manifest(out)
    if written is None:  # not reached: the main process wrote it before the barrier
        raise DitPruneError(f"--out {out}: no {MANIFEST_NAME} after indexing; run the same "
                            "command again")
    return ReferenceStore(out, written)


def _check_listed_embeddings(out: Path, old: dict[str, Any] | None, shard_hashes: list[str],
                             current: str | None) -> None:
    """Before a finished store's manifest is written again: every embedding listing of the
    old manifest that this build carries over unchanged (all but `current`, the fingerprint of
    the detector embedding now, whose shards `_write_embeddings` checks and rewrites) must
    still name its files as they were indexed (`_embedding_problem`); else a one-line
    DitPruneError telling to rerun with that copy detector. Every process checks (the same
    files, the same answer), so none waits for another that failed."""
    listed = old.get("embeddings", {}) if old is not None else {}
    for fingerprint, entry in sorted(listed.items() if isinstance(listed, dict) else []):
        if fingerprint == current:
            continue
        problem = _embedding_problem(out, fingerprint, entry, shard_hashes)
        if problem is not None:
            name = entry.get("detector") if isinstance(entry, dict) else None
            raise DitPruneError(
                f"--out {out}: the embeddings of copy detector {name or 'unknown'} (fingerprint "
                f"{fingerprint}) that its {MANIFEST_NAME} lists are damaged ({problem}); run "
                "this command again with --copy-detector set to that detector to rebuild them "
                "(or with --overwrite to rebuild the store without them)")


def _embedding_problem(out: Path, fingerprint: str, entry: Any,
                       shard_hashes: list[str]) -> str | None:
    """What is wrong with the embedding shards a manifest `entry` lists for `fingerprint`
    (one per image shard, of `shard_hashes`), or None: each must be present, of the size the
    manifest records, embedded from that image shard (its metadata) and of the recorded
    SHA-256. Presence and sizes are checked before any file is read.

    Example:
        >>> _embedding_problem(Path("/nonexistent"), "f", {"shards": []}, ["h"])
        'the manifest records 0 shards for 1 image shards'
    """
    shards = entry.get("shards") if isinstance(entry, dict) else None
    if not isinstance(shards, list) or len(shards) != len(shard_hashes):
        count = len(shards) if isinstance(shards, list) else "no"
        return f"the manifest records {count} shards for {len(shard_hashes)} image shards"
    names = [embedding_shard_name(fingerprint, k) for k in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        if not isinstance(shard, dict) or shard.get("file") != name or not isinstance(
                shard.get("bytes"), int) or not isinstance(shard.get("file_sha256"), str):
            return f"the manifest records no size and SHA-256 for shard {name}"
        if not (out / name).is_file():
            return f"shard {name} is missing"
        size = (out / name).stat().st_size
        if size != shard["bytes"]:
            return f"shard {name} is {size} bytes, not the {shard['bytes']} recorded"
    expected = {"store_version": str(STORE_VERSION), "fingerprint": fingerprint}
    for name, shard, digest in zip(names, shards, shard_hashes, strict=True):
        if _kept_metadata(out / name, {**expected, "image_sha256": digest}) is None:
            return f"shard {name} is unreadable or not embedded from its image shard"
        if file_sha256(out / name) != shard["file_sha256"]:
            return f"shard {name} differs from the file that was indexed"
    return None


def _file_record(file: Path) -> dict[str, Any]:
    """What the manifest records of a shard file to verify it: its size and SHA-256 (the file
    is read once)."""
    return {"bytes": file.stat().st_size, "file_sha256": file_sha256(file)}


def _write_image_shard(source: ImageSource, file: Path, start: int,
                       stop: int) -> dict[str, str]:
    images, labels = source.read(start, stop)  # (n, C, H, W), (n,) or None
    images = images.float().contiguous()
    check_images(images, f"images {start}..{stop - 1} of {_describe(source)}")
    tensors = {"images": images, "hashes": image_hashes(images)}  # (n, C, H, W), (n, 16)
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()  # (n,)
    meta = {"store_version": str(STORE_VERSION), "source_key": source.key, "start": str(start),
            "rows": str(stop - start), "labels": "1" if labels is not None else "0",
            "shard_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
            "data_sha256": tensors_sha256(tensors)}
    atomic_write_with(file, lambda tmp: _save(tensors, tmp, meta))
    return meta


def _write_embeddings(out: Path, detector: Embedder, shard_hashes: list[str], rows: list[int],
                      progress: bool, on_shard: Callable[[str, int], None] | None,
                      procs: Processes, recorded: dict[str, str]) -> int:
    """Write (or keep) the embedding shards of `detector` (this process's share); returns the
    embeddings' dimension, read from the first shard once every process is done."""
    expected = {"store_version": str(STORE_VERSION), "fingerprint": detector.fingerprint}
    bar = tqdm(total=sum(rows), desc=f"embedding ({detector.name})", unit="img",
               disable=not (progress and procs.is_main))
    for k, digest in enumerate(shard_hashes):
        file = out / embedding_shard_name(detector.fingerprint, k)
        if procs.mine(k) and _kept_shard(file, {**expected, "image_sha256": digest},
                                         recorded) is None:
            with safe_open(str(out / image_shard_name(k)), framework="pt") as handle:
                images = handle.get_tensor("images")  # (n, C, H, W)
            emb = detector.embed(images).float().contiguous()  # (n, E)
            meta = {**expected, "image_sha256": digest, "dim": str(emb.shape[1]),
                    "data_sha256": tensors_sha256({"embeddings": emb})}
            atomic_write_with(file, lambda tmp, e=emb, m=meta: _save({"embeddings": e}, tmp, m))
            if on_shard is not None:
                on_shard("embeddings", k)
        bar.update(rows[k])
    bar.close()
    procs.barrier()
    metas = [_kept_metadata(out / embedding_shard_name(detector.fingerprint, k),
                            {**expected, "image_sha256": digest})
             for k, digest in enumerate(shard_hashes)]
    if any(meta is None for meta in metas):
        raise DitPruneError(f"--out {out}: an embedding shard is missing after indexing; run "
                            "the same command again")
    return int(metas[0]["dim"])


def _save(tensors: dict[str, torch.Tensor], tmp: Path, meta: dict[str, str]) -> None:
    """Write a shard reproducibly (`write_shard`), readable by everyone."""
    write_shard(tmp, tensors, meta)
    tmp.chmod(0o644)  # mkstemp makes it private; a store is shared like a checkpoint


def _recorded_hashes(manifest: dict[str, Any] | None) -> dict[str, str]:
    """File name -> SHA-256 of every shard a finished store's manifest records (none without
    one)."""
    if manifest is None:
        return {}
    entries = list(manifest.get("shards", []))
    for entry in manifest.get("embeddings", {}).values():
        entries += entry.get("shards", [])
    return {e["file"]: e["file_sha256"] for e in entries if isinstance(e, dict)
            and isinstance(e.get("file"), str) and isinstance(e.get("file_sha256"), str)}


def _kept_shard(file: Path, expected: dict[str, str],
                recorded: dict[str, str]) -> dict[str, str] | None:
    """`_kept_metadata`, and only if the file's data is still what was written: when the
    manifest of a finished store records the file, its SHA-256 must be the recorded one; in an
    unfinished store (no manifest yet) its tensors must hash to what its own metadata recorded
    when it was written (`data_sha256`; a shard without it is written again). A shard that
    fails is written again; the check reads the kept file once."""
    meta = _kept_metadata(file, expected)
    if meta is None:
        return None
    if file.name in recorded:
        return meta if file_sha256(file) == recorded[file.name] else None
    with safe_open(str(file), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return meta if meta.get("data_sha256") == tensors_sha256(tensors) else None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a shard's tensors: each name, dtype, shape and bytes, in name order (what an
    image or embedding shard records as `data_sha256` when it is written).

    Example:
        >>> len(tensors_sha256({"a": torch.zeros(2, 3)}))
        64
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


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

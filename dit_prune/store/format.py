"""The on-disk reference store: sharded safetensors arrays plus a manifest, and its reader.

Layout of a store directory (written by `dit-prune index`, see `dit_prune.store.build`):

    manifest.json                      what is there; written last, so its presence means done
    images-00000.safetensors           "images" (n, C, H, W) float32 in [-1, 1],
                                       "hashes" (n, 16) uint8: per-image content hash,
                                       ["labels" (n,) int64 when the source has classes]
    embeddings-<fingerprint>-00000.safetensors
                                       "embeddings" (n, E) float32 unit vectors of the same
                                       images by the copy detector with that weights fingerprint

Every shard holds `shard_size` images (the last one fewer) and records in its safetensors
metadata the source key and its first row, so a resumed build can tell a finished shard from
one of another input. The manifest's `content_hash` is the SHA-256 over the shape and the
images' values in store order (chained per shard), the key a cache of anything derived from the
references should use, with the detector's `fingerprint` for embeddings. The manifest also
records every shard file's size (`bytes`) and SHA-256 (`file_sha256`), image and embedding
shards alike, which `reuse.check_store` verifies before a store is searched.

Shard files are written by `write_shard`, byte for byte the same for the same tensors and
metadata (safetensors' own writer orders the metadata keys differently on every call): a store
built twice, or by one process and by several, has identical files.

Reading never loads the whole store: `read_images(shard, start, stop)` reads rows of one shard
through a memory map (only those rows are copied into memory); `map_images` and
`map_embeddings` return the rows as a copy-on-write memory map of the file (no copy at all: the
pages are read when first touched and released when the tensor is dropped), which is what the
search streams.

Example:
    >>> store = open_store("runs/pool-store")  # doctest: +SKIP
    >>> len(store), store.shape, store.num_shards  # doctest: +SKIP
    (1000, (1, 8, 8), 4)
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from dit_prune.errors import DitPruneError

STORE_FORMAT = "dit_prune-reference-store"
STORE_VERSION = 2  # 2: per-shard file sizes and SHA-256 in the manifest, reproducible bytes
MANIFEST_NAME = "manifest.json"
HASH_BYTES = 16  # per-image content hash (blake2b digest size)


def image_shard_name(index: int) -> str:
    return f"images-{index:05d}.safetensors"


def embedding_shard_name(fingerprint: str, index: int) -> str:
    return f"embeddings-{fingerprint}-{index:05d}.safetensors"


SAFETENSORS_DTYPES = MappingProxyType({torch.float32: "F32", torch.float64: "F64",
                                       torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"})


def write_shard(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` and string `metadata` to `file` in the safetensors format, reproducibly:
    the metadata keys sorted, the tensors by element size (largest first, so every tensor
    stays aligned) then name, compact JSON padded with spaces to 8 bytes, the data little
    endian. Same tensors and metadata: same bytes (readable by `safetensors.safe_open`).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_shard(path, {"a": torch.arange(3)}, {"k": "v"})
        >>> with safe_open(str(path), "pt") as f:
        ...     f.metadata(), f.get_tensor("a").tolist()
        ({'k': 'v'}, [0, 1, 2])
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    arrays, offset = [], 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise DitPruneError(f"store shards hold no {tensor.dtype} tensors ({name})")
        array = tensor.numpy()
        array = array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1)
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array.view(np.uint8))
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for array in arrays:
            handle.write(array.data)


def image_hashes(images: torch.Tensor) -> torch.Tensor:
    """Per-image content hash (n, 16) uint8 of float images (n, ...): blake2b of the float32
    bytes with -0.0 mapped to 0.0, so two images hash alike exactly when every value is equal
    (the equality `distinct_references` uses).

    Example:
        >>> h = image_hashes(torch.tensor([[0.0, 1.0], [-0.0, 1.0], [0.5, 1.0]]))
        >>> h.shape, bool((h[0] == h[1]).all()), bool((h[0] == h[2]).all())
        (torch.Size([3, 16]), True, False)
    """
    flat = (images.reshape(len(images), -1).float() + 0.0).contiguous().numpy()  # (n, P)
    rows = [hashlib.blake2b(row.tobytes(), digest_size=HASH_BYTES).digest() for row in flat]
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(
        len(images), HASH_BYTES).clone()  # (n, 16)


@dataclass(frozen=True)
class ReferenceStore:
    """A finished store: its manifest and the shard files' paths. Holds no arrays.

    `verified` names the shard files `reuse.check_store` has read and found equal to the
    manifest's SHA-256 through this object (each is hashed once however often it is checked);
    `matched` holds the image tensors found to be the store's images, with their version
    counter then (an unchanged tensor is not hashed again; one changed in place is).
    """

    root: Path
    manifest: dict[str, Any]
    verified: set[str] = field(default_factory=set, compare=False, repr=False)
    matched: dict[int, tuple[weakref.ref, int]] = field(default_factory=dict, compare=False,
                                                        repr=False)
    distinct: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)

    def images_matched(self, images: torch.Tensor) -> bool:
        """Whether this very tensor, unchanged since, was found to hold the store's images."""
        entry = self.matched.get(id(images))
        return entry is not None and entry[0]() is images and entry[1] == images._version

    def remember_match(self, images: torch.Tensor) -> None:
        """Record that `images` holds the store's images (by identity and version counter)."""
        self.matched[id(images)] = (weakref.ref(images), images._version)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.manifest["shape"])

    @property
    def shard_rows(self) -> list[int]:
        return [int(s["rows"]) for s in self.manifest["shards"]]

    @property
    def shard_starts(self) -> list[int]:
        starts, total = [], 0
        for rows in self.shard_rows:
            starts.append(total)
            total += rows
        return starts

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def embedding_fingerprints(self) -> list[str]:
        return sorted(self.manifest.get("embeddings", {}))

    def embedding_dim(self, fingerprint: str) -> int:
        return int(self.embedding_entry(fingerprint)["dim"])

    def read_images(self, shard: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of image shard `shard`: (n, C, H, W) float32."""
        return self._read(self.root / image_shard_name(shard), "images", start, stop)

    def read_hashes(self, shard: int) -> torch.Tensor:
        """Content hashes (n, 16) uint8 of image shard `shard`."""
        return self._read(self.root / image_shard_name(shard), "hashes", 0, None)

    def read_labels(self, shard: int) -> torch.Tensor | None:
        if not self.manifest.get("labels"):
            return None
        return self._read(self.root / image_shard_name(shard), "labels", 0, None)

    def read_embeddings(self, fingerprint: str, shard: int, start: int = 0,
                        stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the embedding shard of detector `fingerprint`: (n, E)."""
        self.embedding_entry(fingerprint)
        return self._read(self.root / embedding_shard_name(fingerprint, shard), "embeddings",
                          start, stop)

    def map_images(self, shard: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of image shard `shard` (n, C, H, W) float32, memory-mapped."""
        return self._map(self.root / image_shard_name(shard), "images", start, stop)

    def map_embeddings(self, fingerprint: str, shard: int, start: int = 0,
                       stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the embeddings (n, E) by detector `fingerprint`, memory-mapped."""
        self.embedding_entry(fingerprint)
        return self._map(self.root / embedding_shard_name(fingerprint, shard), "embeddings",
                         start, stop)

    def distinct_mask(self) -> list[torch.Tensor]:
        """Per shard, a bool mask (n,) of the images that are the first occurrence of their
        values in store order (what `distinct_references` keeps). Reads only the hashes, once
        per store object (a run searches the same store for every arm; the masks are kept,
        one byte per stored image). Memory while computing: about 40 bytes per
        stored image (the hashes and their sort)."""
        if self.distinct:
            return list(self.distinct)
        hashes = torch.cat([self.read_hashes(k) for k in range(self.num_shards)])  # (M, 16)
        keys = hashes.view(torch.int64).numpy()  # (M, 2): the 16 hash bytes as two integers
        order = np.lexsort((keys[:, 1], keys[:, 0]))  # (M,) stable: equal keys by position
        ranked = keys[order]  # (M, 2)
        starts = np.ones(len(keys), dtype=bool)  # (M,) first of each run of equal keys
        starts[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
        keep = torch.zeros(len(keys), dtype=torch.bool)  # (M,)
        keep[torch.from_numpy(order[starts])] = True
        self.distinct.extend(keep.split(self.shard_rows))
        return list(self.distinct)

    def embedding_entry(self, fingerprint: str) -> dict[str, Any]:
        """The manifest's entry of detector `fingerprint`'s embeddings (detector name, dim and
        per-shard file, rows, bytes and SHA-256); a one-line error when the store has none."""
        entry = self.manifest.get("embeddings", {}).get(fingerprint)
        if entry is None:
            have = ", ".join(self.embedding_fingerprints()) or "none"
            raise DitPruneError(f"store {self.root} has no embeddings of the copy detector with "
                                f"fingerprint {fingerprint} (it has: {have}); run dit-prune "
                                f"index --out {self.root} --copy-detector PATH to add them")
        return entry

    def _map(self, file: Path, key: str, start: int, stop: int | None) -> torch.Tensor:
        try:
            return _map_rows(file, key, start, stop)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise DitPruneError(f"store shard {file} is unreadable ({detail}); rebuild the store "
                                "with dit-prune index --overwrite") from None

    def _read(self, file: Path, key: str, start: int, stop: int | None) -> torch.Tensor:
        try:
            with safe_open(str(file), framework="pt") as handle:
                part = handle.get_slice(key)
                rows = part.get_shape()[0]
                stop = rows if stop is None else min(stop, rows)
                return part[start:stop]
        except (SafetensorError, OSError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise DitPruneError(f"store shard {file} is unreadable ({detail}); rebuild the store "
                                "with dit-prune index --overwrite") from None


def _map_rows(file: Path, key: str, start: int, stop: int | None) -> torch.Tensor:
    """Rows [start, stop) of float32 tensor `key` of a safetensors file as a copy-on-write
    memory map: 8 bytes of header length, the JSON header, then the data (safetensors format)."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    entry = header[key]
    if entry["dtype"] != "F32":
        raise ValueError(f"{key} is {entry['dtype']}, not F32")
    shape = [int(v) for v in entry["shape"]]
    stop = shape[0] if stop is None else min(stop, shape[0])
    width = math.prod(shape[1:])
    if stop <= start:
        return torch.empty(0, *shape[1:])
    offset = 8 + size + int(entry["data_offsets"][0]) + 4 * start * width
    mapped = np.memmap(file, dtype="<f4", mode="c", offset=offset, shape=(stop - start, *shape[1:]))
    return torch.from_numpy(mapped)  # (n, ...) float32, shares the mapped pages


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of directory `root`, or None when there is none (an unfinished store)."""
    file = root / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DitPruneError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise DitPruneError(f"{root} is not a dit_prune reference store (bad {MANIFEST_NAME})")
    return manifest


def _unfinished_store(root: Path) -> bool:
    """True when directory `root` (without a manifest) is a store `dit-prune index` began: its
    marker names `index`, or it holds image or embedding shards; any other folder is not.

    Example:
        >>> import tempfile
        >>> _unfinished_store(Path(tempfile.mkdtemp()))
        False
    """
    try:
        marker = json.loads((root / ".dit_prune_run").read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and str(marker.get("command", "")).split()[-1:] == ["index"]:
        return True
    return any(root.glob("images-*.safetensors")) or any(root.glob("embeddings-*.safetensors"))


def open_store(path: str | Path) -> ReferenceStore:
    """Open a finished store directory; one-line errors when it is missing or unfinished.

    Example:
        >>> open_store("/nonexistent/store")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: reference store not found: /nonexistent/store
    """
    root = Path(path)
    if root.is_file():
        raise DitPruneError(f"{root} is a file, not a reference store directory (no "
                            f"{MANIFEST_NAME}); name the folder `dit-prune index` wrote")
    if not root.is_dir():
        raise DitPruneError(f"reference store not found: {root}")
    manifest = read_manifest(root)
    if manifest is None and not _unfinished_store(root):
        raise DitPruneError(f"{root} is not a reference store (no {MANIFEST_NAME} and no store "
                            "shards); name the folder `dit-prune index` wrote")
    if manifest is None:
        raise DitPruneError(f"{root} is an unfinished reference store (no {MANIFEST_NAME}); run "
                            "the same dit-prune index command again to finish it")
    if manifest.get("version") != STORE_VERSION:
        raise DitPruneError(f"{root}: store version {manifest.get('version')} is not "
                            f"{STORE_VERSION} (version 1 records no shard hashes); rebuild it "
                            f"with dit-prune index --images {manifest.get('source', 'IMAGES')} "
                            f"--out {root} --overwrite (and the same --copy-detector)")
    return ReferenceStore(root, manifest)

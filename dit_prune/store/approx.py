"""Approximate nearest-embedding search over a store with faiss (optional: `pip install
'dit_prune[faiss]'`), for reference sets beyond ~10^6 where exact search gets slow.

An inverted-file index (`IndexIVFFlat`, inner product = cosine on unit vectors; Jégou et al.
2011, Johnson et al. 2019): k-means with `nlist` cells trained on a seeded sample of the
stored embeddings, then every shard added in store order (ids = store indices). A query
visits the `nprobe` nearest cells. It is exact in the limit nprobe = nlist; report its
recall@1 against `store_nearest_cosine` (`recall_at_1`) before trusting a copy rate from it.

Memory: the index holds all M embeddings (4*M*E bytes) plus the centroids (4*nlist*E); the
training sample is `train_size` rows.

Example:
    >>> index = build_ivf_index(store, det.fingerprint, nlist=1024)  # doctest: +SKIP
    >>> sims, idx = index.search(det.embed(samples), nprobe=32)  # doctest: +SKIP
    >>> recall_at_1(idx, store_nearest_cosine(q, store, det.fingerprint)[1])  # doctest: +SKIP
    0.99
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dit_prune.errors import DitPruneError
from dit_prune.store.format import ReferenceStore


def import_faiss() -> Any:
    """The faiss module, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise DitPruneError("approximate search needs faiss: pip install 'dit_prune[faiss]' "
                            "(faiss-cpu)") from None
    return faiss


@dataclass
class ApproxIndex:
    """A faiss IVF index over a store's embeddings; `search` returns store indices."""

    index: Any
    nlist: int
    fingerprint: str

    def search(self, queries: torch.Tensor, nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarity (N,), store index (N,)) of the best reference found for each query."""
        self.index.nprobe = max(1, min(int(nprobe), self.nlist))
        q = np.ascontiguousarray(queries.detach().cpu().float().numpy())  # (N, E)
        sims, ids = self.index.search(q, 1)  # (N, 1) each
        return torch.from_numpy(sims[:, 0].copy()), torch.from_numpy(ids[:, 0].copy())


def build_ivf_index(store: ReferenceStore, fingerprint: str, nlist: int | None = None,
                    train_size: int | None = None, seed: int = 0) -> ApproxIndex:
    """IVF-Flat over the store's embeddings by detector `fingerprint`.

    nlist defaults to ~4 sqrt(M) (at least 1); the k-means sample to min(M, 64 * nlist) rows
    drawn uniformly by `seed` (read shard by shard).
    """
    faiss = import_faiss()
    dim, count = store.embedding_dim(fingerprint), len(store)
    nlist = nlist or max(1, min(count, int(4 * math.sqrt(count))))
    train_size = min(count, train_size or 64 * nlist)
    picks = np.sort(np.random.default_rng(seed).choice(count, train_size, replace=False))
    sample, starts = [], store.shard_starts
    for shard, (first, rows) in enumerate(zip(starts, store.shard_rows, strict=True)):
        local = picks[(picks >= first) & (picks < first + rows)] - first
        if len(local):
            emb = store.read_embeddings(fingerprint, shard)  # (n, E)
            sample.append(emb[torch.from_numpy(local)].numpy())
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(np.ascontiguousarray(np.concatenate(sample), dtype=np.float32))  # (T, E)
    for shard, first in enumerate(starts):
        emb = np.ascontiguousarray(store.read_embeddings(fingerprint, shard).numpy())  # (n, E)
        index.add_with_ids(emb, np.arange(first, first + len(emb), dtype=np.int64))
    return ApproxIndex(index, nlist, fingerprint)


def recall_at_1(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of queries whose approximate nearest index equals the exact one.

    Example:
        >>> recall_at_1(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]))
        0.6666666666666666
    """
    if len(exact) == 0:
        return float("nan")
    return float((approx.cpu() == exact.cpu()).double().mean())

"""Reference stores: training / held-out images (and copy-detection embeddings) on disk in
shards, built by `dit-prune index`, searched exactly shard by shard (or approximately with
faiss), so the references need not fit in memory; reused by `eval` / `run --train-store`
(`reuse.check_store`) and split across processes (`distributed`). See docs/scale.md.

Example:
    >>> from dit_prune.store import build_store, open_source, store_memorization_report
    >>> store = build_store(open_source("digits-pool"), Path("runs/pool"))  # doctest: +SKIP
    >>> store_memorization_report(samples, store).rate  # doctest: +SKIP
"""

from dit_prune.store.build import build_store
from dit_prune.store.format import ReferenceStore, open_store
from dit_prune.store.reports import store_copy_report, store_memorization_report
from dit_prune.store.reuse import check_store, images_content_hash, verify_shards
from dit_prune.store.search import (
    store_block_shape,
    store_nearest_cosine,
    store_nearest_two,
    store_search_bound,
)
from dit_prune.store.sources import FolderSource, TensorSource, open_source

__all__ = [
    "FolderSource", "ReferenceStore", "TensorSource", "build_store", "check_store",
    "images_content_hash", "open_source", "open_store",
    "store_block_shape", "store_copy_report", "store_memorization_report",
    "store_nearest_cosine", "store_nearest_two", "store_search_bound", "verify_shards",
]

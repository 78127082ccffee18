"""`memorization_report` and `copy_report` with a reference store in place of the training tensor.

Same checks, same reports (`MemorizationReport`, `CopyReport`), same numbers: the search is
`store_nearest_two` / `store_nearest_cosine`, whose results equal the in-memory search; memory
is bounded by `store_search_bound` instead of growing with the training set.

Example:
    >>> store = open_store("runs/pool-store")  # doctest: +SKIP
    >>> store_memorization_report(samples, store).rate  # doctest: +SKIP
    0.0
    >>> store_copy_report(samples, store, det, heldout_images=held).rate  # doctest: +SKIP
    0.001
"""

from __future__ import annotations

import math

import torch

from dit_prune.data import check_images
from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import CopyDetector, CopyReport, report_from_similarities
from dit_prune.metrics.memorization import (
    DEFAULT_CHUNK_ELEMENTS,
    MEMORIZATION_THRESHOLD,
    PIXEL_RANGE,
    MemorizationReport,
    report_from_distances,
)
from dit_prune.store.distributed import Processes
from dit_prune.store.format import ReferenceStore
from dit_prune.store.search import store_nearest_cosine, store_nearest_two


def store_memorization_report(
    samples: torch.Tensor,
    store: ReferenceStore,
    threshold: float = MEMORIZATION_THRESHOLD,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    seed: int = 0,
    progress: bool = False,
    value_range: tuple[float, float] | None = PIXEL_RANGE,
    processes: Processes | None = None,
) -> MemorizationReport:
    """Ratio-test memorization of `samples` (N, C, H, W) against the store's images; equal to
    `memorization_report(samples, all_store_images)` (repeated images count once).
    `processes`: the search split across processes (`dit_prune.store.distributed`)."""
    check_images(samples, "samples", store.shape, value_range=value_range)
    d1, d2, nearest = store_nearest_two(samples, store, chunk_elements, progress,
                                        processes=processes)
    return report_from_distances(d1, d2, nearest, threshold, seed)


def store_copy_report(
    samples: torch.Tensor,
    store: ReferenceStore,
    detector: CopyDetector,
    heldout_images: torch.Tensor | None = None,
    threshold: float | None = None,
    seed: int = 0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    processes: Processes | None = None,
) -> CopyReport:
    """Copy rate of `samples` against the store's embeddings by `detector` (its weights
    fingerprint must match the one the store was indexed with); tau as in `copy_report`."""
    shape = store.shape
    check_images(samples, "samples", shape)
    if heldout_images is not None:
        check_images(heldout_images, "heldout_images", shape)
    if threshold is not None and not math.isfinite(float(threshold)):
        raise DitPruneError(f"threshold must be a finite number, got {threshold!r}")
    if threshold is None and heldout_images is None:
        raise DitPruneError("store_copy_report needs heldout_images (to calibrate tau against "
                            "these training images) or an explicit threshold")
    fp = detector.fingerprint
    sims, nearest = store_nearest_cosine(detector.embed(samples), store, fp, chunk_elements,
                                         processes=processes)
    held_sims = None
    if heldout_images is not None:
        held_sims, _ = store_nearest_cosine(detector.embed(heldout_images), store, fp,
                                            chunk_elements, processes=processes)  # (K,)
    return report_from_similarities(sims, nearest, held_sims, threshold, seed)

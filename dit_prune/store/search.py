"""Exact nearest-neighbour search over a reference store, one shard slice at a time.

`store_nearest_two` is `nearest_two` (metrics/memorization.py) with the training set streamed
from disk, and `store_nearest_cosine` is `nearest_cosine` (metrics/copydetect.py) over stored
embeddings. The algorithm is the same: a matmul ranks candidates (`|t|^2 - 2 s.t` for pixels,
`q.r` for embeddings), a running top-2 is merged with a stable sort (earlier references win
ties), and the winners' values are recomputed directly: L2 distances as `(s - t).norm()`,
similarities as `(q * r).sum()`. Recomputed values do not depend on the block shapes, so d1,
d2 and similarities are bit-identical to the in-memory search; the nearest index is identical
too, with ties between the two finalists broken towards the lower index in both. (Only when
three or more references agree to float32 rounding of the matmul can the in-memory and the
store search keep different finalists.)

Order and speed: each slice of `slice_rows` references is mapped once from one shard (no copy;
for L2 one copy, augmented `[-2t, |t|^2]`, so that one plain matmul ranks `|t|^2 - 2 s.t`); it
is cut into tiles of `rows` samples x `cols` references whose scores (`TILE_ELEMENTS` floats at
most) stay in the CPU cache. One matmul fills a tile and one pass takes the extreme of every
group of 64 columns (`GROUP`). After a block of samples has seen the whole slice, only the
samples whose best group beats their running second-best go on: the 2 x 64 members of their two
best groups are scored (recomputed as dot products for depths up to `RECOMPUTE_MAX_DIM`, read
back from the slice's kept tiles above), the best two merged and their values recomputed.
After the first slices few samples go on, so the search costs little more than the matmul
(benchmarks/bench_store_search.py, docs/scale.md).

Memory bound (bytes, beyond the samples (N*P*4; for L2 twice: their augmented copy) and the
outputs (16*N)), with B = `chunk_elements`, S the largest shard, `slice_rows = max(2, min(S,
B // P))`, (rows, cols) the tile and W = slice_rows rounded up to whole tiles
(`store_block_shape`):

    peak_extra = 4*(2*slice_rows*P + slice_rows) + 4*rows*W + 8*rows*W/64 + 4*rows*cols
                 + 8*rows*P + 20*128*rows + 32*N

(one slice mapped and its copy (L2, or duplicates dropped); its norms; the slice's score tiles
(one tile when recomputing) and their group extremes twice; a ragged last tile; the direct
recomputations; the candidates; the running top-2 scores, indices and exact values). It does
not grow with the store size M; `store_search_bound` evaluates it.

Parts: `part=(i, n)` searches only the slices numbered i, i + n, ... and returns the part's
candidates; `merge_parts` combines the candidates of all n parts into the answer of the whole
search, identical to searching in one process (`dit_prune.store.distributed` runs the parts in
separate processes).

Example:
    >>> store = open_store("runs/pool-store")  # doctest: +SKIP
    >>> d1, d2, idx = store_nearest_two(samples, store, chunk_elements=1 << 20)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import DEFAULT_CHUNK_ELEMENTS
from dit_prune.store.distributed import Processes, split_search
from dit_prune.store.format import ReferenceStore

TILE_ELEMENTS = 1 << 19  # one score tile: 2 MiB of float32, what one core's L2 cache holds
TILE_ROWS = 128  # samples per tile (fewer when N is smaller)
GROUP = 64  # columns per group whose extreme the first pass takes
RECOMPUTE_MAX_DIM = 256  # up to this depth the winners' scores are recomputed, not kept


def store_block_shape(num_samples: int, shard_rows: int, chunk_elements: int,
                      dim: int) -> tuple[int, int, int]:
    """(rows, cols, slice_rows): samples per block, references per score tile (a multiple of
    GROUP) and references per slice read from a shard.

    Example:
        >>> store_block_shape(10_000, 100_000, 1 << 25, dim=3072)
        (128, 4096, 10922)
        >>> store_block_shape(1000, 65_536, 1 << 25, dim=64)
        (128, 4096, 65536)
    """
    if chunk_elements < 2:
        raise DitPruneError(f"chunk_elements must be at least 2, got {chunk_elements}")
    slice_rows = max(2, min(shard_rows, chunk_elements // max(1, dim)))
    padded = -(-slice_rows // GROUP) * GROUP
    first = max(1, min(num_samples, TILE_ROWS, chunk_elements // max(1, dim)))
    tile = max(GROUP, min(chunk_elements, TILE_ELEMENTS))
    cols = min(padded, max(GROUP, tile // first // GROUP * GROUP))
    width = -(-slice_rows // cols) * cols  # the score buffer's columns: whole tiles
    rows = max(1, min(first, chunk_elements // width))
    return rows, cols, slice_rows


def store_search_bound(num_samples: int, shard_rows: int, chunk_elements: int,
                       dim: int) -> int:
    """The peak extra memory of a store search in bytes (the formula in the module docstring).

    Example:
        >>> store_search_bound(1000, 256, 1 << 16, 64) // 1024
        804
    """
    rows, cols, slice_rows = store_block_shape(num_samples, shard_rows, chunk_elements, dim)
    width = -(-slice_rows // cols) * cols
    return (4 * (2 * slice_rows * dim + slice_rows) + 4 * rows * width + 8 * rows * width // GROUP
            + 4 * rows * cols + 8 * rows * dim + 20 * 2 * GROUP * rows + 32 * num_samples)


def _slices(store: ReferenceStore, size: int, masks: list[torch.Tensor] | None,
            part: tuple[int, int] | None = None
            ) -> Iterator[tuple[int, int, int, torch.Tensor | None, torch.Tensor]]:
    """(shard, start, stop, kept rows mask or None, global indices of the kept rows) of each
    slice, in store order; with `part=(i, n)` only slices i, i + n, ..."""
    number = -1
    for shard, (first, rows) in enumerate(zip(store.shard_starts, store.shard_rows, strict=True)):
        for start in range(0, rows, size):
            number += 1
            if part is not None and number % part[1] != part[0]:
                continue
            stop = min(rows, start + size)
            keep = None if masks is None else masks[shard][start:stop]  # (c,) bool
            if keep is None or bool(keep.all()):
                yield shard, start, stop, None, torch.arange(first + start, first + stop)
            elif bool(keep.any()):
                yield shard, start, stop, keep, first + start + keep.nonzero().squeeze(1)


def _merge(run: list[torch.Tensor], new: list[torch.Tensor], descending: bool
           ) -> list[torch.Tensor]:
    """Running top-2 (score, index, exact) merged with a block's candidates by score, stable."""
    merged = [torch.cat([a, b], 1) for a, b in zip(run, new, strict=True)]  # (r, 2 + k) each
    key = -merged[0] if descending else merged[0]
    order = key.argsort(dim=1, stable=True)[:, :2]  # (r, 2)
    return [m.gather(1, order) for m in merged]


def _finalists(exact: torch.Tensor, index: torch.Tensor, descending: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the two finalists (r, 2) by their exact values, ties towards the lower index."""
    better = exact[:, 1] > exact[:, 0] if descending else exact[:, 1] < exact[:, 0]
    swap = better | ((exact[:, 1] == exact[:, 0]) & (index[:, 1] < index[:, 0]))  # (r,)
    order = torch.stack([swap.long(), 1 - swap.long()], 1)  # (r, 2)
    return exact.gather(1, order), index.gather(1, order)


@dataclass
class Candidates:
    """The running top-2 of N queries: matmul scores, store indices and exact values (N, 2)."""

    score: torch.Tensor
    index: torch.Tensor
    exact: torch.Tensor

    @classmethod
    def empty(cls, n: int, descending: bool, device: torch.device) -> Candidates:
        worst = float("-inf") if descending else float("inf")
        return cls(torch.full((n, 2), worst, device=device),  # (N, 2)
                   torch.full((n, 2), -1, dtype=torch.long, device=device),  # (N, 2)
                   torch.full((n, 2), worst, device=device))  # (N, 2)


def merge_parts(parts: list[Candidates], descending: bool) -> Candidates:
    """The candidates of the whole search from those of its parts (in part order): the best
    two by matmul score, equal scores to the lower store index, as one process keeps them."""
    score = torch.cat([p.score for p in parts], 1)  # (N, 2n)
    index = torch.cat([p.index for p in parts], 1)  # (N, 2n)
    exact = torch.cat([p.exact for p in parts], 1)  # (N, 2n)
    missing = index < 0  # a part with fewer than 2 references
    by_index = index.masked_fill(missing, torch.iinfo(torch.long).max).argsort(dim=1,
                                                                               stable=True)
    score, index, exact = (t.gather(1, by_index) for t in (score, index, exact))
    key = -score if descending else score
    order = key.argsort(dim=1, stable=True)[:, :2]  # (N, 2)
    return Candidates(score.gather(1, order), index.gather(1, order), exact.gather(1, order))


def _search(flat: torch.Tensor, store: ReferenceStore, read, size: int, rows: int, cols: int,
            masks: list[torch.Tensor] | None, l2: bool, progress: bool, desc: str,
            part: tuple[int, int] | None) -> Candidates:
    """The shared loop: `read(shard, start, stop)` gives a slice (c, P) of references.

    For L2 both sides are augmented, `[s, 1] . [-2t, |t|^2] = |t|^2 - 2 s.t`, so one plain
    matmul per tile ranks the candidates (an `addmm` with the norms as bias is about 30% slower
    on a CPU); `t` is recovered exactly from `-2t` (a power of two) for the recomputation."""
    device, n, largest = flat.device, len(flat), not l2
    dim = flat.shape[1]
    lhs = torch.cat([flat, torch.ones(n, 1, device=device)], 1) if l2 else flat  # (N, P[+1])
    worst = float("-inf") if largest else float("inf")
    run = Candidates.empty(n, largest, device)
    tiles = -(-size // cols)
    recompute = lhs.shape[1] <= RECOMPUTE_MAX_DIM  # keep one hot tile, not a slice of them
    scores = torch.empty(1 if recompute else tiles, rows, cols, device=device)  # (T', r, c)
    extremes = torch.empty(tiles, rows, cols // GROUP, device=device)  # (T, r, c/g)
    groups = cols // GROUP
    interleaved = groups >= GROUP  # see `_group_columns`
    shape, axis = ((GROUP, groups), 1) if interleaved else ((groups, GROUP), 2)
    reduce = torch.amax if largest else torch.amin
    views: dict[int, tuple[list[torch.Tensor], ...]] = {}
    bar = tqdm(total=len(store), desc=desc, disable=not progress)
    for shard, start, stop, keep, index in _slices(store, size, masks, part):
        ref = read(shard, start, stop)  # (c, P), mapped
        ref = (ref if keep is None else ref[keep]).to(device)  # (L, P)
        if l2:
            mat = torch.empty(len(ref), dim + 1, device=device)  # (L, P + 1)
            mat[:, :dim] = ref  # in place: `torch.mul(..., out=)` of a strided view makes a temp
            mat[:, :dim] *= -2.0
            mat[:, dim] = torch.linalg.vector_norm(ref, dim=1).square()
            ref = mat
            del mat  # one name: `del ref` below frees it
        index = index.to(device)  # (L,)
        used = -(-len(ref) // cols)
        tile_refs = [ref[first : first + cols].T for first in range(0, len(ref), cols)]
        for i in range(0, n, rows):
            block = flat[i : i + rows]  # (r, P)
            r = len(block)
            if r not in views:  # per block height, made once: the loop below only computes
                outs = [scores[0 if recompute else t, :r] for t in range(tiles)]  # (r, c) each
                views[r] = (outs, [o.view(r, *shape) for o in outs],
                            [extremes[t, :r] for t in range(tiles)])
            _scan_tiles(lhs[i : i + r], tile_refs, *views[r], reduce, axis, worst)
            found = _block_candidates(scores[:used], extremes[:used, :r],
                                      run.score[i : i + r, 1], largest, len(ref),
                                      (lhs[i : i + r], ref) if recompute else None)
            if found is None:
                continue
            hit, vals, local = found  # (h,), (h, 2), (h, 2) slice positions (-1: none)
            q = block[hit]  # (h, P)
            exact = torch.full_like(vals, worst)  # (h, 2)
            for m in range(2):
                valid = local[:, m] >= 0  # (h,)
                picked = ref[local[:, m].clamp_min(0)]  # (h, P) or (h, P + 1)
                if l2:
                    direct = (q - picked[:, :dim] * -0.5).norm(dim=1)  # (h,) -2t -> t exactly
                else:
                    direct = (q * picked).sum(dim=1)  # (h,)
                exact[:, m] = torch.where(valid, direct, exact[:, m])
            found_index = torch.where(local >= 0, index[local.clamp_min(0)], -1)  # (h, 2)
            at = i + hit  # (h,) query rows
            merged = _merge([run.score[at], run.index[at], run.exact[at]],
                            [vals, found_index, exact], descending=largest)
            run.score[at], run.index[at], run.exact[at] = merged
        del ref, tile_refs  # this slice is freed before the next one is read
        bar.update(stop - start)
    bar.close()
    return run


def _scan_tiles(left: torch.Tensor, tile_refs: list[torch.Tensor], outs: list[torch.Tensor],
                grouped: list[torch.Tensor], ext: list[torch.Tensor], reduce, axis: int,
                worst: float) -> None:
    """Score `left` (r, K) against each tile (K, c) into `outs[t]` (r, c), columns past a
    ragged last tile set to `worst`, and take the group extremes of `grouped[t]` (its view)
    into `ext[t]` (r, G)."""
    for t, tile_ref in enumerate(tile_refs):
        cols = outs[t].shape[1]
        if tile_ref.shape[1] == cols:
            torch.mm(left, tile_ref, out=outs[t])  # (r, c)
        else:  # the slice's ragged last tile
            outs[t][:, : tile_ref.shape[1]] = left @ tile_ref
            outs[t][:, tile_ref.shape[1] :] = worst
        reduce(grouped[t], axis, out=ext[t])  # (r, G)


def _group_columns(group: torch.Tensor, groups: int) -> torch.Tensor:
    """The columns (..., GROUP) of a tile's groups `group` (...): runs of GROUP adjacent
    columns, or, in tiles of at least GROUP groups, every `groups`-th column from `group` on
    (interleaved: the extremes are then taken across GROUP contiguous rows of `groups` values,
    the fastest pass on a CPU).

    Example:
        >>> _group_columns(torch.tensor([1]), 4).tolist()[0][:3]
        [64, 65, 66]
        >>> _group_columns(torch.tensor([1]), 64).tolist()[0][:3]
        [1, 65, 129]
    """
    member = torch.arange(GROUP, device=group.device)  # (g,)
    if groups >= GROUP:
        return group[..., None] + groups * member
    return group[..., None] * GROUP + member


def _block_candidates(scores: torch.Tensor, extremes: torch.Tensor, second: torch.Tensor,
                      largest: bool, count: int,
                      source: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, values (h, 2), slice positions (h, 2)) of the top-2 of a block against a slice,
    from its score tiles, the first r rows of each tile of `scores` (T, rows, c), and their
    group extremes `extremes` (T, r, G), for
    the rows whose best score beats their running second-best `second` (r,); None when no row
    does (a row whose best only equals its second-best would lose the stable merge). Positions
    past the slice's `count` references (a slice of one) are -1 with the worst value.

    With `source` = (block (r, K), slice (L, K)) the candidates' scores are recomputed as dot
    products instead of read from `scores` (then only the last tile is kept: writing every
    tile of a slice to memory costs a 64-deep matmul about 40% more than the recomputation)."""
    height, cols = scores.shape[1:]
    tiles, r, groups = extremes.shape
    ext = extremes.permute(1, 0, 2).reshape(r, tiles * groups)  # (r, T*G)
    best = ext.amax(1) if largest else ext.amin(1)  # (r,)
    rows = (best > second if largest else best < second).nonzero().squeeze(1)  # (h,)
    if len(rows) == 0:
        return None
    k = min(2, tiles * groups)
    two = ext[rows].topk(k, dim=1, largest=largest).indices  # (h, k) best groups
    column = _group_columns(two % groups, groups)  # (h, k, g) within the tile
    tile = (two // groups)[:, :, None]  # (h, k, 1)
    positions = (tile * cols + column).reshape(len(rows), -1)  # (h, kg) in the slice
    if source is None:
        flat = ((tile * height + rows[:, None, None]) * cols + column).reshape(len(rows), -1)
        values = scores.view(-1)[flat]  # (h, kg)
    else:
        block, ref = source
        members = ref.index_select(0, positions.clamp_max(count - 1).flatten()).view(
            *positions.shape, ref.shape[1])  # (h, kg, K)
        values = torch.bmm(members, block[rows][:, :, None]).squeeze(2)  # (h, kg)
        values = values.masked_fill(positions >= count, float("-inf" if largest else "inf"))
    vals, pick = values.topk(2, dim=1, largest=largest)  # (h, 2)
    local = positions.gather(1, pick)  # (h, 2)
    return rows, vals, torch.where(local < count, local, -1)


def store_candidates_two(samples: torch.Tensor, store: ReferenceStore,
                         chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, progress: bool = False,
                         distinct: bool = True, part: tuple[int, int] | None = None
                         ) -> Candidates:
    """The running top-2 (`Candidates`) of the ratio-test search of `samples` (N, C, H, W) over
    the store (or over its slices of `part`); `store_nearest_two` finishes it."""
    if tuple(samples.shape[1:]) != store.shape:
        raise DitPruneError(f"samples are {tuple(samples.shape[1:])} but the store holds "
                            f"{store.shape} images: compare on the same scale and shape")
    masks = store.distinct_mask() if distinct else None
    distinct_count = len(store) if masks is None else int(sum(int(m.sum()) for m in masks))
    if distinct_count < 2:
        raise DitPruneError(f"the ratio test needs at least 2 training images, got "
                            f"{distinct_count} distinct in the store {store.root}")
    flat = samples.reshape(len(samples), -1).float()  # (N, P)
    rows, cols, size = store_block_shape(len(flat), max(store.shard_rows), chunk_elements,
                                         flat.shape[1])

    def read(shard: int, start: int, stop: int) -> torch.Tensor:
        return store.map_images(shard, start, stop).reshape(stop - start, -1)  # (c, P)

    return _search(flat, store, read, size, rows, cols, masks, True, progress,
                   "nearest neighbours (store)", part)


def store_nearest_two(
    samples: torch.Tensor,
    store: ReferenceStore,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = False,
    distinct: bool = True,
    processes: Processes | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d1 (N,), d2 (N,) and the nearest's store index (N,) of `samples` (N, C, H, W), on the CPU.

    With `distinct` (what `memorization_report` does), repeated images count once: d2 is the
    distance to the second-nearest *distinct* image and `nearest` the first occurrence.
    Equal to `nearest_two(samples, distinct_references(train))` mapped back to store indices.
    `processes` (`distributed.current_processes()`): every process scans its share of the
    slices and all get the merged, identical answer.
    """
    run = split_search(lambda part: store_candidates_two(samples, store, chunk_elements,
                                                         progress, distinct, part),
                       descending=False, processes=processes)
    return finish_two(run)


def finish_two(run: Candidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d1, d2, nearest (N,) on the CPU from the ratio-test search's candidates."""
    dist, nearest = _finalists(run.exact, run.index, descending=False)  # (N, 2), (N, 2)
    return dist[:, 0].cpu(), dist[:, 1].cpu(), nearest[:, 0].cpu()


def store_candidates_cosine(queries: torch.Tensor, store: ReferenceStore, fingerprint: str,
                            chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                            progress: bool = False, part: tuple[int, int] | None = None
                            ) -> Candidates:
    """The running top-2 of the cosine search (see `store_nearest_cosine`), or of one part."""
    dim = store.embedding_dim(fingerprint)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise DitPruneError(f"queries are {tuple(queries.shape)}, expected (N, {dim}) "
                            f"embeddings of detector {fingerprint}")
    q = queries.float()  # (N, E)
    rows, cols, size = store_block_shape(len(q), max(store.shard_rows), chunk_elements, dim)

    def read(shard: int, start: int, stop: int) -> torch.Tensor:
        return store.map_embeddings(fingerprint, shard, start, stop)  # (c, E)

    return _search(q, store, read, size, rows, cols, None, False, progress,
                   "nearest embeddings (store)", part)


def store_nearest_cosine(
    queries: torch.Tensor,
    store: ReferenceStore,
    fingerprint: str,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = False,
    processes: Processes | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest cosine similarity (N,) of unit vectors `queries` (N, E) to the store's
    embeddings by detector `fingerprint`, and its store index (N,); equal to
    `nearest_cosine(queries, all_embeddings)`. Memory: the module formula with P = E.
    `processes`: split across processes as in `store_nearest_two`.
    """
    run = split_search(lambda part: store_candidates_cosine(queries, store, fingerprint,
                                                            chunk_elements, progress, part),
                       descending=True, processes=processes)
    return finish_cosine(run)


def finish_cosine(run: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity and nearest store index (N,) on the CPU from the cosine search's candidates."""
    sims, nearest = _finalists(run.exact, run.index, descending=True)  # (N, 2), (N, 2)
    return sims[:, 0].cpu(), nearest[:, 0].cpu()

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
is cut into tiles of `cols` references, each multiplied by a block of `rows` samples into one
reused (cols, rows) score tile (`TILE_ELEMENTS` floats, held in the CPU cache; computed
references x samples, the faster orientation of this product on a CPU). One pass takes the
extreme of every fine group of f references of the tile (f = 16, 8 or 2 by depth,
`_fine_size`; interleaved: references j, j + cols/f, ..., so the pass reads f contiguous rows),
kept for the whole slice; then the extremes of coarse groups (GROUP references), of tiles and of
the slice follow from those. After a batch of blocks (`search_batch`) has seen the slice, only
the samples whose best beats their running second-best go on: the top two of a set lie in its
two best parts at every level, so the two best tiles, coarse groups and fine groups
(`_best_fines`, vertical reductions over the whole batch) leave 2f references per sample, which
are scored again as dot products; the best two are merged and their values recomputed. After
the first slices few samples go on, and the search costs little more than the matmul and the
pass over its scores (benchmarks/bench_store_search.py, docs/scale.md).

Memory bound (bytes, beyond the samples (N*P*4; for L2 twice: their augmented copy) and the
outputs (16*N)), with B = `chunk_elements`, S the largest shard, `slice_rows = max(2, min(S,
B // P))`, (rows, cols) the tile (`store_block_shape`), W = slice_rows rounded up to whole
tiles, f the fine group, R = rows * `search_batch` samples per batch (at most N), h =
min(R, `_candidate_rows`) samples scored at once and m = max(W/cols, 2*cols/64, 128/f):

    peak_extra = 4*(2*slice_rows*P + slice_rows) + 4*rows*(cols + P + 1)
                 + R*(4*(W/f + W/64 + W/cols + 1) + 32*m + 64)
                 + h*(8*f*(P + 1) + 32*f + 16*P + 256) + 32*N

(one slice mapped and its copy (L2, or duplicates dropped); its norms; the score tile and the
block's transposed samples; the batch's fine, coarse, tile and best extremes and the selection
down their levels; the gathered candidates, their scores and direct recomputations; the running
top-2 scores, indices and exact values). It does not grow with the store size M;
`store_search_bound` evaluates it.

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

TILE_ELEMENTS = 1 << 18  # one score tile: 1 MiB of float32, half of one core's L2 cache
TILE_ROWS = 512  # samples per tile (fewer when N is smaller): 512 x 512 measured fastest
GROUP = 64  # references per coarse group
FINE = 8  # references per fine group (`_fine_size`: 16, 8 or 2 by depth)
FINE_MAX_DIM = 1024
BATCH_SHARE = 8  # a batch's candidate buffers hold at most chunk_elements / BATCH_SHARE floats


def store_block_shape(num_samples: int, shard_rows: int, chunk_elements: int,
                      dim: int) -> tuple[int, int, int]:
    """(rows, cols, slice_rows): samples per block, references per score tile (a multiple of
    GROUP) and references per slice read from a shard.

    Example:
        >>> store_block_shape(10_000, 100_000, 1 << 25, dim=3072)
        (512, 512, 10922)
        >>> store_block_shape(1000, 65_536, 1 << 25, dim=64)
        (512, 512, 65536)
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
        485
    """
    rows, cols, slice_rows = store_block_shape(num_samples, shard_rows, chunk_elements, dim)
    fine, batch = _fine_size(dim), search_batch(num_samples, shard_rows, chunk_elements, dim)
    batch_rows = min(num_samples, rows * batch)
    scored = min(batch_rows, _candidate_rows(chunk_elements, dim))
    return (4 * (2 * slice_rows * dim + slice_rows) + 4 * rows * (cols + dim + 1)
            + batch_rows * (4 * _extremes_per_row(slice_rows, cols, dim)
                            + 32 * _select_width(slice_rows, cols, dim) + 64)
            + scored * (8 * fine * (dim + 1) + 32 * fine + 16 * dim + 256) + 32 * num_samples)


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


@dataclass
class _Slice:
    """One slice ready to scan: its references (L, K) (augmented for L2), their store indices
    (L,), and the tiles (c_t, K) the scan multiplies (views of `ref`)."""

    ref: torch.Tensor
    index: torch.Tensor
    tiles: list[torch.Tensor]


@dataclass
class _Layout:
    """The search's fixed shapes: `rows` samples per block, `cols` references per tile, `width`
    columns of the score buffers (whole tiles), `fine` references per fine group, `batch`
    blocks whose candidates are found together, `candidates` samples whose members are scored
    at once; `largest` (cosine) or smallest (L2) wins."""

    rows: int
    cols: int
    width: int
    fine: int
    batch: int
    candidates: int
    largest: bool

    @property
    def fines(self) -> int:
        """Fine groups per block: W / fine."""
        return self.width // self.fine

    @property
    def coarse(self) -> int:
        """Coarse groups (GROUP references: GROUP / fine fine groups) per block: W / GROUP."""
        return self.width // GROUP

    @property
    def tiles(self) -> int:
        """Tiles per block: W / cols."""
        return self.width // self.cols

    @property
    def worst(self) -> float:
        return float("-inf") if self.largest else float("inf")


class _Buffers:
    """The scan's reused memory: one score tile (c, r) and, for a batch of blocks, the extremes
    of every fine group, coarse group and tile of the slice ((batch, units, rows) each, units
    W/f, W/64 and W/c; a short last block fills its first r columns) and each row's best
    (batch, rows). Zeros at first, so that unused columns are never NaN. `block` caches the
    per-block views so that the scan loop only computes."""

    def __init__(self, layout: _Layout, device: torch.device) -> None:
        rows, cols, batch = layout.rows, layout.cols, layout.batch
        self.layout = layout
        self.tile = torch.empty(cols * rows, device=device)  # (c*r,)
        self.fine = torch.zeros(batch, layout.fines, rows, device=device)  # (B, W/f, rows)
        self.coarse = torch.zeros(batch, layout.coarse, rows, device=device)  # (B, W/64, rows)
        self.tiles = torch.zeros(batch, layout.tiles, rows, device=device)  # (B, W/c, rows)
        self.best = torch.zeros(batch, rows, device=device)  # (B, rows)
        self._views: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def block(self, b: int, r: int) -> tuple[torch.Tensor, ...]:
        """Views of block `b` of a batch, `r` rows high: the tile (c, r), the block's fine
        (W/f, r), coarse (W/64, r) and tile (W/c, r) extremes, its row bests (r,), and the
        fine extremes of each tile ((c/f, r) slices of the block's)."""
        key = (b, r)
        if key not in self._views:
            lay = self.layout
            per_tile = lay.cols // lay.fine
            fine = self.fine[b, :, :r]  # (W/f, r)
            outs = tuple(fine[t * per_tile : (t + 1) * per_tile] for t in range(lay.tiles))
            self._views[key] = (self.tile[: lay.cols * r].view(lay.cols, r), fine,
                                self.coarse[b, :, :r], self.tiles[b, :, :r], self.best[b, :r],
                                *outs)
        return self._views[key]


def _fine_size(dim: int) -> int:
    """References per fine group for P = `dim`: each improving sample recomputes 2f dot
    products of depth P, and the scan writes one extreme per f scores: 16 up to P = 128 (the
    extremes' writes then cost the most, next to a cheap score), 8 up to FINE_MAX_DIM, 2 above
    (deep rows are costly to gather, scores costly to compute)."""
    return 2 * FINE if dim <= 128 else FINE if dim <= FINE_MAX_DIM else 2


def search_batch(num_samples: int, shard_rows: int, chunk_elements: int, dim: int) -> int:
    """Blocks of samples whose candidates are found together (one pass of about 40 small ops
    for all of them): as many as keep the batch's extremes under chunk_elements / 8 floats.

    Example:
        >>> search_batch(1000, 10_000, 1 << 25, 64)
        2
        >>> search_batch(10_000, 65_536, 1 << 25, 64)
        1
    """
    rows, cols, slice_rows = store_block_shape(num_samples, shard_rows, chunk_elements, dim)
    blocks = -(-num_samples // rows)
    per_row = _extremes_per_row(slice_rows, cols, dim) + 8 * _select_width(slice_rows, cols, dim)
    return max(1, min(blocks, chunk_elements // BATCH_SHARE // (rows * per_row)))


def _extremes_per_row(slice_rows: int, cols: int, dim: int) -> int:
    """Floats per sample of the fine, coarse and tile extremes and the best of a slice."""
    width = -(-slice_rows // cols) * cols
    return width // _fine_size(dim) + width // GROUP + width // cols + 1


def _select_width(slice_rows: int, cols: int, dim: int) -> int:
    """The most units one level of `_best_fines` compares per sample."""
    return max(-(-slice_rows // cols), 2 * cols // GROUP, 2 * GROUP // _fine_size(dim))


def _candidate_rows(chunk_elements: int, dim: int) -> int:
    """Samples whose 2f members (depth P + 1 at most) are gathered and scored at once: as many
    as fit in chunk_elements / 8 floats, at least one.

    Example:
        >>> _candidate_rows(1 << 25, 64)
        1795
    """
    per_row = 2 * _fine_size(dim) * (dim + 1) + 4 * dim
    return max(1, chunk_elements // BATCH_SHARE // per_row)


def _search(flat: torch.Tensor, store: ReferenceStore, read, size: int, rows: int, cols: int,
            batch: int, chunk: int, masks: list[torch.Tensor] | None, l2: bool, progress: bool,
            desc: str, part: tuple[int, int] | None) -> Candidates:
    """The shared loop: `read(shard, start, stop)` gives a slice (c, P) of references.

    For L2 both sides are augmented, `[s, 1] . [-2t, |t|^2] = |t|^2 - 2 s.t`, so one plain
    matmul per tile ranks the candidates (an `addmm` with the norms as bias is about 10% slower
    on a CPU); `t` is recovered exactly from `-2t` (a power of two) for the recomputation."""
    device, n = flat.device, len(flat)
    lhs = torch.cat([flat, torch.ones(n, 1, device=device)], 1) if l2 else flat  # (N, P[+1])
    width = -(-size // cols) * cols
    dim = flat.shape[1]
    lay = _Layout(rows, cols, width, _fine_size(dim), batch, _candidate_rows(chunk, dim),
                  largest=not l2)
    buffers = _Buffers(lay, device)
    run = Candidates.empty(n, lay.largest, device)
    bar = tqdm(total=len(store), desc=desc, disable=not progress)
    for shard, start, stop, keep, index in _slices(store, size, masks, part):
        part_slice = _read_slice(read(shard, start, stop), keep, index, cols, l2, device)
        for first in range(0, n, rows * batch):
            heights = [min(rows, n - i) for i in range(first, min(n, first + rows * batch), rows)]
            for b, r in enumerate(heights):
                i = first + b * rows
                _scan_block(lhs[i : i + r], part_slice.tiles, buffers.block(b, r), lay)
            _batch_candidates(flat, lhs, part_slice, buffers, run, first, heights, l2)
        del part_slice  # this slice is freed before the next one is read
        bar.update(stop - start)
    bar.close()
    return run


def _read_slice(ref: torch.Tensor, keep: torch.Tensor | None, index: torch.Tensor, cols: int,
                l2: bool, device: torch.device) -> _Slice:
    """The slice's kept references (L, P) on the device, augmented `[-2t, |t|^2]` (L, P + 1)
    for L2, cut into tiles of `cols` rows."""
    ref = (ref if keep is None else ref[keep]).to(device)  # (L, P), mapped
    if l2:
        dim = ref.shape[1]
        mat = torch.empty(len(ref), dim + 1, device=device)  # (L, P + 1)
        torch.mul(ref, -2.0, out=mat[:, :dim])  # -2t: exact
        mat[:, dim] = torch.linalg.vector_norm(ref, dim=1).square()
        ref = mat
    return _Slice(ref, index.to(device), [ref[j : j + cols] for j in range(0, len(ref), cols)])


def _scan_block(block: torch.Tensor, tiles: list[torch.Tensor], views: tuple[torch.Tensor, ...],
                lay: _Layout) -> None:
    """Score the samples `block` (r, K) against every tile (c_t, K) of a slice, one (c, r) tile
    at a time into `views` (`_Buffers.block`), and keep the extremes of each fine group
    (interleaved: references j, j + c/f, ... of a tile, read as f contiguous rows of c/f * r
    scores), then of each coarse group (GROUP/f consecutive fine groups), of each tile and of
    the whole slice, per sample."""
    tile, fine, coarse, tile_ext, best, *outs = views
    r = tile.shape[1]
    grouped = tile.view(lay.fine, lay.cols // lay.fine, r)  # (f, c/f, r)
    reduce = torch.amax if lay.largest else torch.amin
    left = block.T.contiguous()  # (K, r)
    for tile_ref, out in zip(tiles, outs, strict=False):
        if len(tile_ref) == lay.cols:
            torch.mm(tile_ref, left, out=tile)  # (c, r)
        else:  # the slice's ragged last tile
            torch.mm(tile_ref, left, out=tile[: len(tile_ref)])
            tile[len(tile_ref) :] = lay.worst
        reduce(grouped, 0, out=out)  # (c/f, r)
    used, per_tile = len(tiles), lay.cols // GROUP
    per = GROUP // lay.fine
    reduce(fine[: used * per_tile * per].view(used * per_tile, per, r), 1,
           out=coarse[: used * per_tile])  # (G, r)
    reduce(coarse[: used * per_tile].view(used, per_tile, r), 1, out=tile_ext[:used])  # (T, r)
    reduce(tile_ext[:used], 0, out=best)  # (r,)


def _batch_candidates(flat: torch.Tensor, lhs: torch.Tensor, part: _Slice, buffers: _Buffers,
                      run: Candidates, first: int, heights: list[int], l2: bool) -> None:
    """Merge into `run` the slice's top-2 of the batch's samples (rows first, first + 1, ...,
    in blocks of `heights`) whose best beats their running second-best (a row whose best only
    equals it would lose the stable merge): from their two best tiles, the two best coarse
    groups, from those the two best fine groups, whose 2f references are scored again."""
    lay = buffers.layout
    total = sum(heights)
    second = run.score[first : first + total, 1]  # (R,)
    best = buffers.best.view(-1)[:total]  # (R,) batch row b*rows + j
    rows = (best > second if lay.largest else best < second).nonzero().squeeze(1)  # (h,)
    if len(rows) == 0:
        return
    fines = _best_fines(buffers, len(heights), len(part.tiles))[rows]  # (h, 2)
    for i in range(0, len(rows), lay.candidates):  # bounded memory: see `_candidate_rows`
        _merge_candidates(flat, lhs, part, lay, run, first + rows[i : i + lay.candidates],
                          fines[i : i + lay.candidates], l2)


def _merge_candidates(flat: torch.Tensor, lhs: torch.Tensor, part: _Slice, lay: _Layout,
                      run: Candidates, at: torch.Tensor, fines: torch.Tensor, l2: bool) -> None:
    """Score the 2f members of the fine groups `fines` (h, 2) of the samples `at` (h,) again,
    as dot products of `lhs` (N, K), merge the best two into `run` and recompute their exact
    values from `flat` (N, P)."""
    positions = _fine_members(fines, lay)  # (h, 2f) slice positions
    count = len(part.ref)
    members = part.ref.index_select(0, positions.clamp_max(count - 1).flatten()).view(
        *positions.shape, part.ref.shape[1])  # (h, 2f, K)
    values = torch.bmm(members, lhs[at][:, :, None]).squeeze(2)  # (h, 2f)
    values.masked_fill_(positions >= count, lay.worst)
    pick = _top_two(values[:, :, None], lay.largest)[:, :, 0]  # (h, 2)
    vals = values.gather(1, pick)  # (h, 2)
    local = positions.gather(1, pick)  # (h, 2)
    valid = local < count  # (h, 2) a slice of one reference has one candidate
    exact = _exact_values(flat[at], members, pick, valid, l2, lay.worst)  # (h, 2)
    found = torch.where(valid, part.index[local.clamp_max(count - 1)], -1)  # (h, 2)
    merged = _merge([run.score[at], run.index[at], run.exact[at]], [vals, found, exact],
                    descending=lay.largest)
    run.score[at], run.index[at], run.exact[at] = merged


def _best_fines(buffers: _Buffers, blocks: int, tiles: int) -> torch.Tensor:
    """The two best fine groups (B*rows, 2) of every row of the batch's first `blocks` blocks,
    going down the levels: the two best of the slice's `tiles` tiles, the two best coarse groups
    in those, the two best fine groups in those (the top two of a set lie in its two best parts,
    at any level). Columns past a short last block are computed and not used."""
    lay = buffers.layout
    device = buffers.fine.device
    ext = buffers.tiles[:blocks, :tiles]  # (B, T, rows)
    ids = None
    for level, fan in ((buffers.coarse, lay.cols // GROUP), (buffers.fine, GROUP // lay.fine)):
        pick = _top_two(ext, lay.largest)  # (B, k, rows) best units of the level above
        ids = pick if ids is None else ids.gather(1, pick)
        ids = (ids[:, :, None] * fan + torch.arange(fan, device=device)[:, None]).flatten(1, 2)
        ext = level[:blocks].gather(1, ids)  # (B, k*fan, rows)
    best = ids.gather(1, _top_two(ext, lay.largest))  # (B, 2, rows)
    return best.transpose(1, 2).reshape(-1, 2)  # (B*rows, 2)


def _top_two(values: torch.Tensor, largest: bool) -> torch.Tensor:
    """Indices (B, k, R) along dim 1 of the best and second-best of `values` (B, m, R), best
    first, k = min(2, m); equal values to the lower index. Only vertical reductions and
    elementwise ops (an `argmax` or `topk` along dim 1 is several times slower on a CPU).

    Example:
        >>> _top_two(torch.tensor([[[0.5], [2.0], [1.0], [2.0]]]), True).flatten().tolist()
        [1, 3]
    """
    m = values.shape[1]
    rank = torch.arange(m, 0, -1, device=values.device, dtype=values.dtype)[:, None]  # (m, 1)
    reduce = torch.amax if largest else torch.amin
    first = _first_hit(values == reduce(values, 1, keepdim=True), rank)  # (B, 1, R)
    if m == 1:
        return first
    taken = torch.arange(m, device=values.device)[:, None] == first  # (B, m, R)
    rest = values.masked_fill(taken, float("-inf") if largest else float("inf"))  # (B, m, R)
    hit = (rest == reduce(rest, 1, keepdim=True)) & ~taken  # (B, m, R)
    return torch.cat([first, _first_hit(hit, rank)], 1)


def _first_hit(hit: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The first index (B, 1, R) along dim 1 where `hit` (B, m, R) is true, from `rank`
    (m, 1) = m, m - 1, ..., 1 (the last index where none is: NaN scores)."""
    m = len(rank)
    return (m - (hit * rank).amax(1, keepdim=True)).long().clamp_(0, m - 1)


def _fine_members(fine: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Slice positions (h, 2f) of the members of fine groups `fine` (h, 2): fine group
    t * c/f + j holds references t*c + j + m*c/f, m < f (interleaved in tile t).

    Example:
        >>> lay = _Layout(4, cols=64, width=128, fine=8, batch=1, candidates=4, largest=True)
        >>> _fine_members(torch.tensor([[1, 8]]), lay).tolist()[0][:10]
        [1, 9, 17, 25, 33, 41, 49, 57, 64, 72]
    """
    per_tile = lay.cols // lay.fine
    base = fine // per_tile * lay.cols + fine % per_tile  # (h, 2)
    member = torch.arange(lay.fine, device=fine.device) * per_tile  # (f,)
    return (base[:, :, None] + member).flatten(1)


def _exact_values(samples: torch.Tensor, members: torch.Tensor, pick: torch.Tensor,
                  valid: torch.Tensor, l2: bool, worst: float) -> torch.Tensor:
    """The two winners' values (h, 2) computed directly from the samples (h, P) and their
    picked members (h, 2f, K): `(s - t).norm()` (t recovered from -2t) or `(q * r).sum()`;
    `worst` where not `valid`."""
    dim = samples.shape[1]
    ar = torch.arange(len(samples), device=samples.device)  # (h,)
    exact = []
    for m in range(2):
        picked = members[ar, pick[:, m]]  # (h, K) contiguous
        if l2:
            exact.append((samples - picked[:, :dim] * -0.5).norm(dim=1))  # (h,) exactly t
        else:
            exact.append((samples * picked).sum(dim=1))  # (h,)
    return torch.where(valid, torch.stack(exact, 1), worst)  # (h, 2)


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

    batch = search_batch(len(flat), max(store.shard_rows), chunk_elements, flat.shape[1])
    return _search(flat, store, read, size, rows, cols, batch, chunk_elements, masks, True,
                   progress,
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

    batch = search_batch(len(q), max(store.shard_rows), chunk_elements, dim)
    return _search(q, store, read, size, rows, cols, batch, chunk_elements, None, False,
                   progress,
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

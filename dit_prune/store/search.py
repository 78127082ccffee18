"""Exact nearest-neighbour search over a reference store, one shard slice at a time.

`store_nearest_two` is `nearest_two` (metrics/memorization.py) with the training set streamed
from disk, and `store_nearest_cosine` is `nearest_cosine` (metrics/copydetect.py) over stored
embeddings. The algorithm is the same: one matmul block ranks candidates
(`|t|^2 - 2 s.t` for pixels, `q.r` for embeddings), a running top-2 is merged with a stable
sort (earlier references win ties), and the winners' values are recomputed directly: L2
distances as `(s - t).norm()`, similarities as `(q * r).sum()`. Recomputed values do not depend
on the block shapes, so d1, d2 and similarities are bit-identical to the in-memory search;
the nearest index is identical too, with ties between the two finalists broken towards the
lower index in both. (Only when three or more references agree to float32 rounding of the
matmul can the in-memory and the store search keep different finalists.)

Order: the outer loop reads each slice of `cols` references once; the inner loop runs every
block of `rows` samples against it, so the store is read once whatever N is.

Memory bound (bytes, beyond the samples (N*P*4) and the outputs (16*N)), with B =
`chunk_elements`, S the largest shard, `cols = max(2, min(S, B // P))` and
`rows = max(1, min(N, B // cols, B // P))`:

    peak_extra = 4 * (2*cols*P + cols + rows*cols + 2*rows*P) + rows*cols/16 + 32*N
               <=  21*B + 32*N + 4*cols

(one slice read, and a copy of it when it holds duplicates; its squared norms; one score block
and its group extremes (`top2`); the two direct recomputations; the running top-2 scores,
indices and exact values). It does not
grow with the store size M; `store_search_bound` evaluates it.

Example:
    >>> store = open_store("runs/pool-store")  # doctest: +SKIP
    >>> d1, d2, idx = store_nearest_two(samples, store, chunk_elements=1 << 20)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import DEFAULT_CHUNK_ELEMENTS
from dit_prune.store.format import ReferenceStore


def store_block_shape(num_samples: int, shard_rows: int, chunk_elements: int,
                      dim: int) -> tuple[int, int]:
    """(rows, cols): samples per block and references per slice read from a shard.

    Example:
        >>> store_block_shape(10_000, 100_000, 1 << 25, dim=3072)
        (3072, 10922)
    """
    if chunk_elements < 2:
        raise DitPruneError(f"chunk_elements must be at least 2, got {chunk_elements}")
    cols = max(2, min(shard_rows, chunk_elements // max(1, dim)))
    rows = max(1, min(num_samples, chunk_elements // cols, chunk_elements // max(1, dim)))
    return rows, cols


def store_search_bound(num_samples: int, shard_rows: int, chunk_elements: int,
                       dim: int) -> int:
    """The peak extra memory of a store search in bytes (the formula in the module docstring).

    Example:
        >>> store_search_bound(1000, 256, 1 << 16, 64) // 1024
        548
    """
    rows, cols = store_block_shape(num_samples, shard_rows, chunk_elements, dim)
    return (4 * (2 * cols * dim + cols + rows * cols + 2 * rows * dim) + rows * cols // 16
            + 32 * num_samples)


def _slices(store: ReferenceStore, cols: int, masks: list[torch.Tensor] | None
            ) -> Iterator[tuple[int, int, int, torch.Tensor | None, torch.Tensor]]:
    """(shard, start, stop, global indices of the kept rows) of each slice, in store order."""
    for shard, (first, rows) in enumerate(zip(store.shard_starts, store.shard_rows, strict=True)):
        for start in range(0, rows, cols):
            stop = min(rows, start + cols)
            keep = None if masks is None else masks[shard][start:stop]  # (c,) bool
            if keep is None or bool(keep.all()):
                yield shard, start, stop, None, torch.arange(first + start, first + stop)
            elif bool(keep.any()):
                yield shard, start, stop, keep, first + start + keep.nonzero().squeeze(1)


def top2(score: torch.Tensor, largest: bool, group: int = 64
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two best entries (r, k) of each row of `score` (r, c) and their columns, k = min(2, c).

    Same values as `score.topk(2)`, about 4x faster on wide rows: the best two entries lie in
    the two groups (of `group` columns) with the best group extremes, so one fast `amax` pass
    picks two groups and `topk` runs on their 2*group entries only.

    Example:
        >>> top2(torch.tensor([[3.0, 1.0, 2.0, 0.5]]), largest=False, group=2)
        (tensor([[0.5000, 1.0000]]), tensor([[3, 1]]))
    """
    r, c = score.shape
    k = min(2, c)
    if c < 4 * group:
        vals, idx = score.topk(k, dim=1, largest=largest)
        return vals, idx
    main = c - c % group
    grouped = score[:, :main].view(r, main // group, group)  # (r, G, g)
    extreme = grouped.amax(-1) if largest else grouped.amin(-1)  # (r, G)
    best = extreme.topk(2, dim=1, largest=largest).indices  # (r, 2)
    cols = (best[:, :, None] * group + torch.arange(group, device=score.device)).reshape(r, -1)
    if main < c:  # the ragged tail joins the candidates
        tail = torch.arange(main, c, device=score.device).expand(r, c - main)  # (r, c - main)
        cols = torch.cat([cols, tail], 1)  # (r, 2g + tail)
    vals, pick = score.gather(1, cols).topk(2, dim=1, largest=largest)  # (r, 2)
    return vals, cols.gather(1, pick)


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


def store_nearest_two(
    samples: torch.Tensor,
    store: ReferenceStore,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = False,
    distinct: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """d1 (N,), d2 (N,) and the nearest's store index (N,) of `samples` (N, C, H, W), on the CPU.

    With `distinct` (what `memorization_report` does), repeated images count once: d2 is the
    distance to the second-nearest *distinct* image and `nearest` the first occurrence.
    Equal to `nearest_two(samples, distinct_references(train))` mapped back to store indices.
    """
    if tuple(samples.shape[1:]) != store.shape:
        raise DitPruneError(f"samples are {tuple(samples.shape[1:])} but the store holds "
                            f"{store.shape} images: compare on the same scale and shape")
    masks = store.distinct_mask() if distinct else None
    distinct_count = len(store) if masks is None else int(sum(int(m.sum()) for m in masks))
    if distinct_count < 2:
        raise DitPruneError(f"the ratio test needs at least 2 training images, got "
                            f"{distinct_count} distinct in the store {store.root}")
    device = samples.device
    flat_s = samples.reshape(len(samples), -1).float()  # (N, P)
    n, dim = flat_s.shape
    rows, cols = store_block_shape(n, max(store.shard_rows), chunk_elements, dim)
    run_s = torch.full((n, 2), float("inf"), device=device)  # (N, 2) matmul scores
    run_i = torch.zeros((n, 2), dtype=torch.long, device=device)  # (N, 2) store indices
    run_e = torch.full((n, 2), float("inf"), device=device)  # (N, 2) direct distances
    bar = tqdm(total=len(store), desc="nearest neighbours (store)", disable=not progress)
    for shard, start, stop, keep, index in _slices(store, cols, masks):
        ref = store.read_images(shard, start, stop).reshape(stop - start, -1)  # (c, P)
        ref = (ref if keep is None else ref[keep]).to(device)  # (c', P)
        index = index.to(device)  # (c',)
        ref_sq = torch.linalg.vector_norm(ref, dim=1).square()  # (c',)
        k = min(2, len(ref))
        for i in range(0, n, rows):
            block = flat_s[i : i + rows]  # (r, P)
            score = torch.addmm(ref_sq, block, ref.T, alpha=-2.0)  # (r, c')
            vals, idx = top2(score, largest=False)  # (r, k)
            del score  # one block at a time
            exact = torch.stack([(block - ref[idx[:, j]]).norm(dim=1) for j in range(k)], 1)
            new = [vals, index[idx], exact]  # (r, k) each
            run = [run_s[i : i + rows], run_i[i : i + rows], run_e[i : i + rows]]
            run_s[i : i + rows], run_i[i : i + rows], run_e[i : i + rows] = _merge(
                run, new, descending=False)
        bar.update(stop - start)
    bar.close()
    dist, nearest = _finalists(run_e, run_i, descending=False)  # (N, 2), (N, 2)
    return dist[:, 0].cpu(), dist[:, 1].cpu(), nearest[:, 0].cpu()


def store_nearest_cosine(
    queries: torch.Tensor,
    store: ReferenceStore,
    fingerprint: str,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest cosine similarity (N,) of unit vectors `queries` (N, E) to the store's
    embeddings by detector `fingerprint`, and its store index (N,); equal to
    `nearest_cosine(queries, all_embeddings)`. Memory: the module formula with P = E.
    """
    dim = store.embedding_dim(fingerprint)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise DitPruneError(f"queries are {tuple(queries.shape)}, expected (N, {dim}) "
                            f"embeddings of detector {fingerprint}")
    device = queries.device
    q = queries.float()  # (N, E)
    n = len(q)
    rows, cols = store_block_shape(n, max(store.shard_rows), chunk_elements, dim)
    run_s = torch.full((n, 2), float("-inf"), device=device)  # (N, 2) matmul scores
    run_i = torch.zeros((n, 2), dtype=torch.long, device=device)  # (N, 2)
    run_e = torch.full((n, 2), float("-inf"), device=device)  # (N, 2) direct similarities
    bar = tqdm(total=len(store), desc="nearest embeddings (store)", disable=not progress)
    for shard, start, stop, _, index in _slices(store, cols, None):
        ref = store.read_embeddings(fingerprint, shard, start, stop).float().to(device)  # (c, E)
        index = index.to(device)  # (c,)
        k = min(2, len(ref))
        for i in range(0, n, rows):
            block = q[i : i + rows]  # (r, E)
            vals, idx = top2(block @ ref.T, largest=True)  # (r, k)
            exact = torch.stack([(block * ref[idx[:, j]]).sum(dim=1) for j in range(k)], 1)
            run = [run_s[i : i + rows], run_i[i : i + rows], run_e[i : i + rows]]
            run_s[i : i + rows], run_i[i : i + rows], run_e[i : i + rows] = _merge(
                run, [vals, index[idx], exact], descending=True)
        bar.update(stop - start)
    bar.close()
    sims, nearest = _finalists(run_e, run_i, descending=True)  # (N, 2), (N, 2)
    return sims[:, 0].cpu(), nearest[:, 0].cpu()

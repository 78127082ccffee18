"""Benchmark: exact search over a reference store vs the machine's matmul rate, peak memory vs
the stated bound, and faiss (approximate) recall@1 and speed.

For each size M the script builds a store on the fly (seeded, clustered unit vectors in E
dimensions: K = M/100 cluster centres, each reference a centre plus noise, renormalised; stored
both as (E, 1, 1) "images" and as embeddings of an identity detector), then measures, in turns
(matmul, search, matmul; 3 turns, 1 for products above 3e11 flops), on this possibly shared
machine:
  * the exact embedding search `store_nearest_cosine` (2*N*M*E flops) and, for E = 64 and
    M <= 10^5, the ratio-test search `store_nearest_two` on the same vectors as pixels;
    optionally pixel stores (`--pixels`, uniform random CxHxW images);
  * the plain float32 matmul of the same (N, P) x (P, M) product into one preallocated block,
    references in memory, in the search's tile shape (samples x references, and references x
    samples as the search computes it), in the in-memory search's block shape and in 128 x 2048
    blocks (the fastest is the reference): the machine's matmul rate for this product;
  * ratio = median over the turns of (mean matmul time around the turn) / (search time);
  * peak extra resident memory during the search (sampled every 2 ms) next to
    `store_search_bound` (inputs, i.e. the queries, excluded), plus for the ratio test the
    samples' augmented copy [s, 1] that the search makes (4*N*(P + 1) bytes);
  * faiss IVF-Flat (nlist = sqrt(M), k-means on 32*nlist rows): build time, search time and
    recall@1 against exact search at a few nprobe values.
Queries: N/2 noisy copies of random references (the copies a memorization test looks for) and
N/2 fresh points from the same clusters.

Usage (one thread; results in docs/scale.md):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_store_search.py --threads 1 \\
        --dims 64,512 --pixels 3x32x32:10000,3x32x32:100000
    .venv/bin/python benchmarks/bench_store_search.py --sizes 10000 --pixels 3x32x32:10000
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nn_search import PeakRss, rss_bytes  # noqa: E402

from dit_prune.metrics.memorization import DEFAULT_CHUNK_ELEMENTS, chunk_shape  # noqa: E402
from dit_prune.store import (  # noqa: E402
    build_store,
    store_block_shape,
    store_nearest_cosine,
    store_nearest_two,
    store_search_bound,
)

MIB = 1 << 20
DIM = 64


@dataclass(frozen=True)
class ClusteredSource:
    """Seeded clustered unit vectors (count, dim, 1, 1) generated shard by shard."""

    count: int
    dim: int = DIM
    seed: int = 0
    spread: float = 0.35

    @property
    def key(self) -> str:
        return f"clustered:{self.count}:{self.dim}:{self.seed}:{self.spread}"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim, 1, 1)

    def centres(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        k = max(1, self.count // 100)
        return F.normalize(torch.randn(k, self.dim, generator=gen), dim=1)  # (K, E)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        centres = self.centres()
        which = torch.randint(len(centres), (stop - start,), generator=gen)  # (n,)
        noise = torch.randn(stop - start, self.dim, generator=gen) * self.spread / math.sqrt(
            self.dim)  # (n, E)
        return F.normalize(centres[which] + noise, dim=1)  # (n, E)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, None]:
        return self.rows(start, stop).view(-1, self.dim, 1, 1), None  # (n, E, 1, 1)


@dataclass(frozen=True)
class RandomPixels:
    """Seeded uniform images in [-1, 1] of one shape, generated shard by shard."""

    count: int
    image: tuple[int, int, int]
    seed: int = 0

    @property
    def key(self) -> str:
        return f"pixels:{self.count}:{self.image}:{self.seed}"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, None]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        return torch.rand(stop - start, *self.image, generator=gen) * 2 - 1, None


class IdentityDetector:
    """Embeds (n, E, 1, 1) "images" as the unit vectors they already are."""

    name = "identity"
    fingerprint = "identity0000000"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1).float(), dim=1)  # (n, E)


def make_queries(source: ClusteredSource, n: int, seed: int = 1) -> torch.Tensor:
    """n/2 noisy copies of random references, n/2 fresh points from the clusters: (n, E)."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(source.count, (n // 2,), generator=gen).tolist()
    copies = torch.stack([source.rows(p, p + 1)[0] for p in picks])  # (n/2, E)
    copies = F.normalize(copies + 0.02 * torch.randn(copies.shape, generator=gen), dim=1)
    fresh = ClusteredSource(source.count, source.dim, source.seed, source.spread)
    fresh_rows = fresh.rows(source.count + 7, source.count + 7 + n - n // 2)  # (n/2, E)
    return torch.cat([copies, fresh_rows])


def gemm_seconds(n: int, m: int, dim: int, rows: int, cols: int, span: int,
                 refs_first: bool = False) -> float:
    """Seconds of the plain float32 matmuls of the same (n, dim) x (dim, m) product, in blocks
    of (rows, cols) written into one preallocated output, against `span` distinct references
    held in memory (the search's slice; cycled to cover m): the matmul alone, no reading,
    no top-2, no merging. `refs_first` computes each block transposed, references x samples
    (cols, rows), as the store search's tiles are."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, dim, generator=gen)  # (N, P)
    b = torch.randn(-(-min(m, span) // cols) * cols, dim, generator=gen)  # (S', P) whole tiles
    out = torch.empty(rows * cols)
    blocks = [a[i : i + rows].T.contiguous() if refs_first else a[i : i + rows]
              for i in range(0, n, rows)]  # (P, r) or (r, P) each
    start = time.perf_counter()
    for j in range(0, m, cols):
        first = j % len(b)
        ref = b[first : first + min(cols, m - j)]  # (c, P)
        for block in blocks:
            if refs_first:
                torch.mm(ref, block, out=out[: len(ref) * block.shape[1]].view(len(ref), -1))
            else:
                torch.mm(block, ref.T, out=out[: len(block) * len(ref)].view(len(block), -1))
    return time.perf_counter() - start


def timed_search(fn, dim: int, num: int, shard: int, chunk: int, count: int, flops: float,
                 repeats: int = 3, l2: bool = False):
    """The search `fn` and the plain matmul of the same product, measured in turns (matmul,
    search, matmul) `repeats` times on this shared machine: ratio = median over the turns of
    (mean of the two matmul times) / (search time), so slow drifts in the load cancel. The
    matmul runs in the search's tile shape, both as samples x references and as the search
    computes it (references x samples), in the in-memory search's block shape (`chunk_shape`)
    and in 128 x 2048 blocks (both ways); the fastest (picked in the first turn) is the
    reference."""
    rows, cols, span = store_block_shape(num, shard, chunk, dim)
    block_rows, block_cols = chunk_shape(num, shard, chunk, dim)
    narrow = min(rows, 128)  # 128 x 2048 blocks: often the fastest plain matmul on a CPU
    narrow_cols = min(-(-span // 64) * 64, max(64, (1 << 18) // narrow // 64 * 64))
    shapes = [(rows, cols, False), (rows, cols, True), (block_rows, block_cols, False),
              (narrow, narrow_cols, False), (narrow, narrow_cols, True)]

    def gemm() -> float:
        times = [gemm_seconds(num, count, dim, r, c, span, t) for r, c, t in shapes]
        shapes[:] = [shapes[times.index(min(times))]]  # keep the fastest shape
        return min(times)

    ratios, searches, peak_extra, result = [], [], 0.0, None
    for _ in range(repeats if flops < 3e11 else 1):  # the largest cases: one turn
        before = gemm()
        base = rss_bytes()
        with PeakRss() as peak:
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
        peak_extra = max(peak_extra, peak.peak - base)
        after = gemm()
        ratios.append((before + after) / 2 / seconds)
        searches.append(seconds)
    ratio, seconds = statistics.median(ratios), statistics.median(searches)
    return result, {
        "block": f"{rows}x{cols}", "s": seconds, "search_gf": flops / seconds / 1e9,
        "gemm_gf": flops / seconds / ratio / 1e9, "ratio": ratio,
        "peak_mib": peak_extra / MIB,
        "bound_mib": (store_search_bound(num, shard, chunk, dim)
                      + (4 * num * (dim + 1) if l2 else 0)) / MIB,  # + the samples' [s, 1]
    }


def row(case: str, n: int, m: int, p: int, r: dict) -> str:
    return (f"| {case} | {n:,} | {m:,} | {p} | {r['block']} | {r['s']:.2f} s | "
            f"{r['search_gf']:.1f} | {r['gemm_gf']:.1f} | **{r['ratio']:.2f}** | "
            f"{r['peak_mib']:.0f} MiB | {r['bound_mib']:.0f} MiB |")


def bench_embeddings(m: int, n: int, shard: int, chunk: int, root: Path, nprobes: list[int],
                     pixels_too: bool, dim: int = DIM) -> list[str]:
    source = ClusteredSource(m, dim)
    start = time.perf_counter()
    store = build_store(source, root / f"emb{m}-{dim}", shard, IdentityDetector(), progress=False)
    build_s = time.perf_counter() - start
    q = make_queries(source, n)  # (N, E)
    flops, shard = 2.0 * n * m * dim, max(store.shard_rows)
    (sims, exact_idx), r = timed_search(
        lambda: store_nearest_cosine(q, store, IdentityDetector.fingerprint, chunk),
        dim, n, shard, chunk, m, flops)
    lines = [row("embeddings, cosine", n, m, dim, r)]
    if pixels_too:
        _, r_pix = timed_search(lambda: store_nearest_two(q.view(n, dim, 1, 1), store, chunk),
                                dim, n, shard, chunk, m, flops, l2=True)
        lines.append(row("same vectors as pixels, ratio test", n, m, dim, r_pix))
    print(f"# M={m:,}: store built in {build_s:.1f} s ({store.num_shards} shards)", flush=True)
    try:
        import faiss
    except ImportError:
        print("# faiss not installed: approximate search skipped", flush=True)
        return lines
    from dit_prune.store.approx import build_ivf_index, recall_at_1

    faiss.omp_set_num_threads(torch.get_num_threads())
    nlist = max(1, int(math.sqrt(m)))
    start = time.perf_counter()
    index = build_ivf_index(store, IdentityDetector.fingerprint, nlist=nlist,
                            train_size=32 * nlist)
    ivf_build = time.perf_counter() - start
    for nprobe in nprobes:
        start = time.perf_counter()
        _, idx = index.search(q, nprobe)
        seconds = time.perf_counter() - start
        lines.append(f"| faiss IVF-Flat nlist={nlist} nprobe={nprobe} | {n:,} | {m:,} | {dim} | "
                     f"build {ivf_build:.1f} s | {seconds:.3f} s | recall@1 "
                     f"**{recall_at_1(idx, exact_idx):.3f}** | exact {r['s']:.2f} s | "
                     f"speed-up {r['s'] / seconds:.0f}x | | |")
    shutil.rmtree(root / f"emb{m}-{dim}", ignore_errors=True)
    return lines


def bench_pixels(spec: str, n: int, shard: int, chunk: int, root: Path) -> str:
    shape_text, count_text = spec.split(":")
    image = tuple(int(v) for v in shape_text.split("x"))
    m = int(count_text)
    source = RandomPixels(m, image)  # type: ignore[arg-type]
    store = build_store(source, root / f"pix{m}", shard, progress=False)
    samples = RandomPixels(n, image, seed=1).read(0, n)[0]  # (N, C, H, W)
    dim = math.prod(image)
    _, r = timed_search(lambda: store_nearest_two(samples, store, chunk), dim, n,
                        max(store.shard_rows), chunk, m, 2.0 * n * m * dim, l2=True)
    shutil.rmtree(root / f"pix{m}", ignore_errors=True)
    return row(f"pixels {shape_text}, ratio test", n, m, dim, r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dims", default="64",
                        help="embedding dimensions (64: digits-copydetect, 512: SSCD)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=65536)
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS)
    parser.add_argument("--nprobe", default="4,16")
    parser.add_argument("--pixels", default="3x32x32:10000",
                        help="comma-separated CxHxW:M pixel stores ('' for none)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store."))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk_elements "
          f"{args.chunk_elements}, shard size {args.shard_size}, stores in {root}")
    print("| case | N | M | P or E | block | time | search GFLOP/s | GEMM GFLOP/s | ratio | "
          "peak extra | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    nprobes = [int(v) for v in args.nprobe.split(",") if v]
    try:
        for dim in (int(v) for v in args.dims.split(",") if v):
            for size in (int(v) for v in args.sizes.split(",") if v):
                for line in bench_embeddings(size, args.queries, args.shard_size,
                                             args.chunk_elements, root, nprobes,
                                             size <= 100_000 and dim == DIM, dim):
                    print(line, flush=True)
        for spec in (s for s in args.pixels.split(",") if s):
            print(bench_pixels(spec, args.queries, args.shard_size, args.chunk_elements, root),
                  flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

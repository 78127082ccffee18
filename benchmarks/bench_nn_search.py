"""Benchmark: nearest-neighbour search throughput vs the machine's own matmul rate, and memory.

The ratio test's search (`nearest_two`) is a matrix multiply in disguise: for N samples and M
training images of P pixels it does 2*N*M*P flops. This script measures, in the same run,
  * the matmul rate of one (rows, P) x (P, cols) float32 product, the shape of a search block;
  * the search's effective rate 2*N*M*P / seconds, and its ratio to the matmul rate;
  * the search's peak extra memory (resident set size sampled every 2 ms above the level
    before the search, inputs excluded) next to the analytic chunk bound.

Usage:
    .venv/bin/python benchmarks/bench_nn_search.py            # 10,000 x 50,000 x 3x32x32
    .venv/bin/python benchmarks/bench_nn_search.py --samples 2000 --device cuda
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from dit_prune.metrics.memorization import DEFAULT_CHUNK_ELEMENTS, chunk_shape, nearest_two

MIB = 1 << 20


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples RSS in a background thread; `peak` is the highest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(rows: int, cols: int, dim: int, device: torch.device, repeats: int = 3) -> float:
    """Best-of-`repeats` flop rate of a (rows, dim) x (dim, cols) float32 matmul."""
    a = torch.randn(rows, dim, device=device)
    b = torch.randn(cols, dim, device=device)
    out = torch.empty(rows, cols, device=device)
    torch.matmul(a, b.T, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b.T, out=out)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * cols * dim / best


def bench(samples: int, train: int, shape: tuple[int, int, int], device: torch.device,
          chunk_elements: int) -> dict[str, float]:
    dim = shape[0] * shape[1] * shape[2]
    rows, cols = chunk_shape(samples, train, chunk_elements, dim)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(samples, *shape, generator=gen).mul_(2).sub_(1).to(device)
    t = torch.rand(train, *shape, generator=gen).mul_(2).sub_(1).to(device)
    rate_before = matmul_rate(rows, cols, dim, device)
    nearest_two(x[: min(samples, rows)], t[: min(train, 4 * rows)], chunk_elements)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    base = rss_bytes()
    with PeakRss() as peak:
        sync(device)
        start = time.perf_counter()
        nearest_two(x, t, chunk_elements)
        sync(device)
        seconds = time.perf_counter() - start
    rate_after = matmul_rate(rows, cols, dim, device)
    matmul = max(rate_before, rate_after)
    search = 2 * samples * train * dim / seconds
    result = {
        "samples": samples, "train": train, "dim": dim, "rows": rows, "cols": cols,
        "seconds": seconds, "search_gflops": search / 1e9, "matmul_gflops": matmul / 1e9,
        "ratio": search / matmul,
        "peak_extra_mib": (peak.peak - base) / MIB,
        "bound_mib": (rows * cols + 2 * rows * dim + train) * 4 / MIB,
        "inputs_mib": (samples + train) * dim * 4 / MIB,
    }
    if device.type == "cuda":
        result["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base_gpu) / MIB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = [
        ("3x32x32", args.samples, args.train, (3, 32, 32)),
        ("1x8x8 digits", 1000, 1000, (1, 8, 8)),
    ]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"chunk_elements {args.chunk_elements}")
    header = ("case", "N", "M", "P", "block", "s", "search GF/s", "matmul GF/s", "ratio",
              "peak extra MiB", "bound MiB", "inputs MiB")
    print(" | ".join(header))
    for name, n, m, shape in cases:
        r = bench(n, m, shape, device, args.chunk_elements)
        print(" | ".join([
            name, str(n), str(m), str(r["dim"]), f"{r['rows']}x{r['cols']}", f"{r['seconds']:.2f}",
            f"{r['search_gflops']:.1f}", f"{r['matmul_gflops']:.1f}", f"{r['ratio']:.2f}",
            f"{r['peak_extra_mib']:.0f}", f"{r['bound_mib']:.0f}", f"{r['inputs_mib']:.0f}",
        ]), flush=True)


if __name__ == "__main__":
    main()

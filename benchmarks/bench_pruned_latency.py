"""Sampling latency of structurally pruned DiTs against the attention+MLP FLOPs they shed.

For each model size and budget: random weights and random scores (seeded), `select_units`
at the budget, `prune_units` on a copy, then DDIM sampling of the unpruned and the pruned
model, interleaved in the same run (A B A B ...). Reports the ratio of median wall times, of
minimum wall times, and of median process CPU times (the steadiest on a shared machine, where
wall time includes waiting for a core). Prints one JSON line
per budget and, with --out, writes all rows to a JSON file.

Example:
    $ python benchmarks/bench_pruned_latency.py --models tiny --budgets 0.1,0.2,0.3
    $ python benchmarks/bench_pruned_latency.py --models xl --xl-steps 2 --xl-batch 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from dit_prune.models import new_dit
from dit_prune.pruning import prune_units, select_units
from dit_prune.sampling import sample_images
from dit_prune.units import adapter_for, enumerate_units

# name -> (size, classes, sample side, channels)
MODELS = {"tiny": ("tiny", 10, 8, 1), "xl": ("xl", 1000, 32, 4)}


def block_flops(model: nn.Module) -> int:
    """Multiply-accumulates of all attention + MLP parts of all blocks, per image per step."""
    adapter = adapter_for(model)
    cfg = model.config
    tokens = (int(cfg.sample_size) // int(cfg.patch_size)) ** 2
    total = 0
    for block in adapter.blocks(model):
        attn = block.attn1
        inner, hidden = attn.to_q.out_features, attn.to_q.in_features
        total += tokens * hidden * inner * 4  # q, k, v, out projections
        total += 2 * tokens * tokens * inner  # Q K^T and A V over all heads
        ff = block.ff.net[0].proj.out_features
        total += 2 * tokens * hidden * ff  # MLP up and down
    return total


def time_sampling(model: nn.Module, scheduler: Any, batch: int, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one sampling run."""
    labels = torch.arange(batch) % int(model.config.num_embeds_ada_norm)  # (B,)
    wall, cpu = time.perf_counter(), time.process_time()
    sample_images(model, scheduler, labels, list(range(batch)), steps=steps, batch_size=batch,
                  progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_model(name: str, budgets: list[float], steps: int, batch: int, repeats: int,
                mode: str) -> list[dict[str, Any]]:
    size, classes, side, channels = MODELS[name]
    torch.manual_seed(0)
    base = new_dit(size, classes, side, channels).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    units = enumerate_units(base)
    scores = torch.rand(len(units), generator=torch.Generator().manual_seed(0))  # (U,)
    base_flops = block_flops(base)
    time_sampling(base, scheduler, batch, 1)  # warm-up
    rows = []
    for budget in budgets:
        pruned = copy.deepcopy(base)
        started = time.perf_counter()
        plan = prune_units(pruned, select_units(units, scores, budget, mode=mode, model=base))
        prune_seconds = time.perf_counter() - started
        time_sampling(pruned, scheduler, batch, 1)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {"base": [], "pruned": []}
        for _ in range(repeats):
            runs["base"].append(time_sampling(base, scheduler, batch, steps))
            runs["pruned"].append(time_sampling(pruned, scheduler, batch, steps))
        wall = {k: [w for w, _ in v] for k, v in runs.items()}
        cpu = {k: [c for _, c in v] for k, v in runs.items()}
        base_s, pruned_s = statistics.median(wall["base"]), statistics.median(wall["pruned"])
        row = {
            "model": name, "budget": budget, "mode": mode, "steps": steps, "batch": batch,
            "repeats": repeats, "units_removed": plan.counts,
            "params_ratio": round(plan.params_after / plan.params_before, 4),
            "block_flops_removed": round(1 - block_flops(pruned) / base_flops, 4),
            "base_seconds": round(base_s, 3), "pruned_seconds": round(pruned_s, 3),
            "latency_ratio": round(pruned_s / base_s, 4),
            "latency_ratio_min": round(min(wall["pruned"]) / min(wall["base"]), 4),
            "cpu_time_ratio": round(statistics.median(cpu["pruned"])
                                    / statistics.median(cpu["base"]), 4),
            "prune_seconds": round(prune_seconds, 1),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del pruned
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,xl")
    p.add_argument("--budgets", default="0.1,0.2,0.3")
    p.add_argument("--mode", default="both", help="budget mode (heads, neurons, both, params)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--xl-steps", type=int, default=50, help="steps for xl (lower on CPU)")
    p.add_argument("--xl-batch", type=int, default=64, help="batch for xl (lower on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=None, help="write all rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for name in args.models.split(","):
        steps, batch = (args.xl_steps, args.xl_batch) if name == "xl" else (args.steps, args.batch)
        rows += bench_model(name, budgets, steps, batch, args.repeats, args.mode)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of `taylor-gap` scoring as a ratio to one forward+backward over the same data.

Both sides see the same calibration examples (train + held-out, `--batches` noise draws, chunks
of `--batch-size`): the reference runs forward + `loss.backward()` (parameter gradients) once per
chunk; `taylor-gap` runs forward + an input-only backward to the unit gates once per chunk,
then normalizes. Random weights are fine: this is about time. Target: ratio <= 3.

Example:
    $ .venv/bin/python benchmarks/bench_scoring.py --models tiny
    $ .venv/bin/python benchmarks/bench_scoring.py --models xl --images 2 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dit_prune.models import new_dit
from dit_prune.scorers import CalibrationData, get_scorer
from dit_prune.scorers.base import ScoringContext, default_scheduler
from dit_prune.scorers.calibration import HELDOUT, TRAIN, per_example_loss
from dit_prune.units import enumerate_units

CONFIGS = {  # name -> (size, classes, sample size, channels)
    "tiny": ("tiny", 10, 8, 1),
    "xl": ("xl", 1000, 32, 4),  # DiT-XL/2 on 256x256 latents
}


def calibration(spec: tuple[str, int, int, int], images: int, seed: int) -> CalibrationData:
    _, classes, size, channels = spec
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * images, channels, size, size, generator=gen) * 2 - 1  # (2N, C, H, W)
    y = torch.randint(classes, (2 * images,), generator=gen)  # (2N,)
    return CalibrationData(x[:images], y[:images], x[images:], y[images:])


def reference_seconds(model, data, options, scheduler) -> float:
    """Forward + full backward (parameter gradients) over the same calibration chunks."""
    ctx = ScoringContext(model, data, scheduler, options,
                         options.timestep_distribution("uniform"), torch.device("cpu"))
    started = time.perf_counter()
    for split in (TRAIN, HELDOUT):
        for chunk in ctx.examples(split):
            per_example_loss(model, chunk, ctx.alphas_cumprod).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def bench(name: str, images: int, batches: int, batch_size: int, repeats: int) -> dict:
    spec = CONFIGS[name]
    torch.manual_seed(0)
    model = new_dit(*spec).eval()
    data = calibration(spec, images, seed=1)
    scheduler = default_scheduler()
    scorer = get_scorer("taylor-gap", batches=batches, batch_size=batch_size, progress=False)
    units = enumerate_units(model)
    reference_seconds(model, data, scorer.options, scheduler)  # warm-up
    ref, taylor = [], []
    for _ in range(repeats):
        ref.append(reference_seconds(model, data, scorer.options, scheduler))
        started = time.perf_counter()
        scorer.score(model, units, data, scheduler)
        taylor.append(time.perf_counter() - started)
    return {
        "model": name, "params": sum(p.numel() for p in model.parameters()),
        "units": len(units), "examples": 2 * images * batches, "batch_size": batch_size,
        "threads": torch.get_num_threads(), "forward_backward_s": round(min(ref), 3),
        "taylor_gap_s": round(min(taylor), 3), "ratio": round(min(taylor) / min(ref), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,xl")
    parser.add_argument("--images", type=int, default=None, help="images per split")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {"tiny": (64, 2, 64), "xl": (2, 1, 2)}  # images per split, batches, batch size
    for name in args.models.split(","):
        images, batches, batch_size = defaults[name]
        result = bench(name, args.images or images, args.batches or batches,
                       args.batch_size or batch_size, 1 if name == "xl" else args.repeats)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Overhead of the diffusers wrapper's generation over the plain diffusers pipeline call.

For each case the same pipeline, labels/prompts and seeds go through (A) the plain call
`pipe(..., generator=[one per image], output_type="pt")` with a DDIM scheduler, and (B)
`dit_prune.pipelines.generate_decoded` (which swaps in the same DDIM, silences the progress bar,
fixes the null class when guided and moves images to the CPU). Calls alternate A B B A ...;
the ratio is median(B) / median(A) (target 1.0). Images must agree (max |A - B| is printed).
On a shared CPU, one torch thread (the default here) gives far steadier timings than two.

Cases: a latent DiT (10 classes, unguided: the plain DiTPipeline cannot guide a model with
other than 1000 classes), a latent DiT with 1000 classes (guided), the same models pruned by
25% of heads and neurons, and a tiny PixArt-α (guided).

Example:
    $ python benchmarks/bench_pipeline_overhead.py --steps 10 --batch 8 --repeats 8
    $ python benchmarks/bench_pipeline_overhead.py --device cuda --out runs/overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DiTPipeline

from dit_prune.pipelines import generate_decoded, prune_pipeline
from dit_prune.pipelines.tiny import tiny_dit, tiny_pixart_pipeline, tiny_vae
from dit_prune.pruning import select_units
from dit_prune.units import enumerate_units


def latent_dit_pipeline(num_classes: int, sample_size: int) -> DiTPipeline:
    """A DiT-S-like width on 4 blocks (6 heads x 64) over 4-channel latents, tiny VAE."""
    model = tiny_dit(0, num_classes=num_classes, layers=4, heads=6, head_dim=64,
                     sample_size=sample_size)
    return DiTPipeline(transformer=model, vae=tiny_vae(0), scheduler=DDIMScheduler())


def pruned(pipe: Any, budget: float = 0.25) -> Any:
    units = enumerate_units(pipe.transformer)
    scores = torch.rand(len(units), generator=torch.Generator().manual_seed(0))  # (U,)
    chosen = select_units(units, scores, budget, mode="both", model=pipe.transformer)
    return prune_pipeline(pipe, chosen)


def plain_call(pipe: Any, conditions: list[Any], seeds: list[int], steps: int,
               guidance: float) -> torch.Tensor:
    """The plain diffusers call, as a user would write it (DDIM, one generator per image)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if isinstance(conditions[0], str):
        out = pipe(prompt=conditions, guidance_scale=guidance, generator=gens,
                   num_inference_steps=steps, output_type="pt", clean_caption=False,
                   use_resolution_binning=False)
    else:
        out = pipe(class_labels=conditions, guidance_scale=guidance, generator=gens,
                   num_inference_steps=steps, output_type="pt")
    return out.images.float().cpu()  # (B, C, H, W) in [0, 1]


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    images = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, images


def measure(name: str, pipe: Any, conditions: list[Any], steps: int, guidance: float,
            repeats: int, device: torch.device) -> dict[str, Any]:
    pipe.to(device)
    seeds = list(range(len(conditions)))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def plain() -> torch.Tensor:
        return plain_call(pipe, conditions, seeds, steps, guidance)

    def wrapped() -> torch.Tensor:
        return generate_decoded(pipe, conditions, seeds, steps, guidance,
                                batch_size=len(conditions))

    plain(), wrapped()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "wrapper": []}
    for r in range(repeats):
        order = [("plain", plain), ("wrapper", wrapped)]
        for key, fn in order if r % 2 == 0 else order[::-1]:  # A B, then B A: cancels drift
            seconds, images = timed(fn, device)
            times[key].append(seconds)
            if key == "plain":
                a = images
            else:
                b = images
    plain_s, wrap_s = statistics.median(times["plain"]), statistics.median(times["wrapper"])
    return {
        "case": name, "device": str(device), "batch": len(conditions), "steps": steps,
        "guidance": guidance, "params": sum(p.numel() for p in pipe.transformer.parameters()),
        "plain_s": round(plain_s, 4), "wrapper_s": round(wrap_s, 4),
        "ratio": round(wrap_s / plain_s, 3), "max_abs_diff": float((a - b).abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (0: default)")
    parser.add_argument("--sample-size", type=int, default=16, help="latent side of the DiTs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write all rows as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    labels10 = [i % 10 for i in range(args.batch)]
    labels1000 = [(37 * i) % 1000 for i in range(args.batch)]
    prompts = [["a red cat", "a photo of the digit seven", "a small blue dog"][i % 3]
               for i in range(args.batch)]
    dit10 = latent_dit_pipeline(10, args.sample_size)
    dit1000 = latent_dit_pipeline(1000, args.sample_size)
    cases = [
        ("latent-dit-10cls", dit10, labels10, 1.0),
        ("latent-dit-1000cls-guided", dit1000, labels1000, 4.0),
        ("latent-dit-10cls-pruned25", pruned(dit10), labels10, 1.0),
        ("latent-dit-1000cls-guided-pruned25", pruned(dit1000), labels1000, 4.0),
        ("pixart-tiny-guided", tiny_pixart_pipeline(0), prompts, 4.5),
    ]
    rows = []
    for name, pipe, conditions, guidance in cases:
        row = measure(name, pipe, conditions, args.steps, guidance, args.repeats, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"median_ratio": statistics.median(ratios), "max_ratio": max(ratios)}))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

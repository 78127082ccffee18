"""Cost of a model: parameters and MACs (torch-pruning's counter) and sampling latency.

Example:
    >>> from dit_prune.models import new_dit
    >>> macs_and_params(new_dit("tiny", 10, 8, 1))["params"]
    1424772
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any

import torch
from torch import nn

from dit_prune.pruning.inputs import example_inputs
from dit_prune.sampling import sample_images

LATENCY_BATCH = 32  # images per timed draw (64 until 2026-11-30: half the cost, see scale.md)
LATENCY_REPEATS = 3  # timed draws per model; the median is reported


def macs_and_params(model: nn.Module) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass at batch 1."""
    import torch_pruning as tp

    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the counter prints
        macs, params = tp.utils.count_ops_and_params(model, example_inputs(model))
    return {"macs": int(macs), "params": int(params)}


def latency_seconds(model: nn.Module, scheduler: Any, cfg: Any, labels: torch.Tensor | None = None,
                    repeats: int = LATENCY_REPEATS, shape: tuple[int, int, int] | None = None
                    ) -> float:
    """Median wall time (seconds) of `repeats` draws of one batch of `LATENCY_BATCH` (32)
    images, seeds 0-31, with the run's sampler, steps and guidance.

    `labels` (N,): the run's labels, cycled to 32 (default: classes 0, 1, ... of the model);
    `shape`: the (C, H, W) of one model input when the model has no sample size (Flux)."""
    if labels is None or not len(labels):
        labels = torch.arange(LATENCY_BATCH) % int(model.config.num_embeds_ada_norm)  # (32,)
    else:
        labels = torch.as_tensor(labels)[torch.arange(LATENCY_BATCH) % len(labels)]  # (32,)
    seeds = list(range(LATENCY_BATCH))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sample_images(model, scheduler, labels, seeds, steps=cfg.steps,
                      guidance_scale=cfg.guidance_scale, sampler=cfg.sampler,
                      batch_size=LATENCY_BATCH, progress=False, shape=shape)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]

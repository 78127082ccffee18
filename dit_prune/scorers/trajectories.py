"""Deterministic DDIM sampling trajectories for the sampling-based scorers.

Image i of a trajectory set depends only on (model, label i, seed i), as in `sample_images`
(same initial noise, same DDIM schedule), so its memorized/not split matches what the evaluator
sees for the same seeds. A trajectory may also start from real images noised to a middle time
(`start_images` + `start_t`): the held-out reference of `activation-contrast`.

Example:
    >>> import diffusers, torch
    >>> from dit_prune.models import new_dit
    >>> model = new_dit("tiny", 10, 8, 1).eval()
    >>> sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    >>> run = run_trajectories(model, sched, torch.tensor([1, 2]), [0, 1], steps=4,
    ...                        keep_states=True)
    >>> run.samples.shape, run.states.shape, run.timesteps.tolist()
    (torch.Size([2, 1, 8, 8]), torch.Size([2, 4, 1, 8, 8]), [750, 500, 250, 0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dit_prune.sampling import (
    initial_noise,
    labels_for_seeds,
    make_sampling_scheduler,
    predict_noise,
)
from dit_prune.scorers.calibration import null_label

# called before each model call with (indices of the batch's images, step index, timestep)
StepCallback = Callable[[torch.Tensor, int, int], None]


@dataclass(frozen=True)
class Trajectories:
    samples: torch.Tensor  # (N, C, H, W) final images in [-1, 1]
    states: torch.Tensor | None  # (N, S, C, H, W) the model input x_t at every step
    timesteps: torch.Tensor  # (S,) the timesteps run
    labels: torch.Tensor  # (N,)


@torch.no_grad()
def run_trajectories(
    model: nn.Module,
    scheduler: Any,
    labels: torch.Tensor,
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float = 1.0,
    batch_size: int = 128,
    keep_states: bool = False,
    before_step: StepCallback | None = None,
    start_images: torch.Tensor | None = None,
    start_t: int | None = None,
    progress: bool = False,
) -> Trajectories:
    """DDIM trajectories, one per (label, seed); see module docstring.

    With `start_images` (N, C, H, W), image i is noised with seed i's noise to the first DDIM
    timestep <= `start_t`, and only the remaining steps are run.
    """
    device = next(model.parameters()).device
    null = null_label(model)
    channels, size = int(model.config.in_channels), int(model.config.sample_size)
    sched = make_sampling_scheduler(scheduler, "ddim", steps)  # flow matching: its own Euler
    timesteps = sched.timesteps.clone()  # (S_all,)
    if start_t is not None:
        timesteps = timesteps[timesteps <= start_t]  # (S,)
    guided = guidance_scale != 1.0
    samples, states = [], []
    bar = tqdm(total=len(seeds), desc="trajectories", disable=not progress, leave=False)
    for begin in range(0, len(seeds), batch_size):
        rows = torch.arange(begin, min(begin + batch_size, len(seeds)))  # (B,)
        y = labels[rows].to(device)  # (B,)
        noise = initial_noise([seeds[i] for i in rows], (channels, size, size)).to(device)
        sched = make_sampling_scheduler(scheduler, "ddim", steps)  # fresh step counter
        if start_images is None:
            x = noise * getattr(sched, "init_noise_sigma", 1.0)  # (B, C, H, W)
        else:
            x = start_noised(sched, start_images[rows].to(device), noise, timesteps[0])
        kept = []
        for step, t in enumerate(timesteps):
            if keep_states:
                kept.append(x.cpu())
            if before_step is not None:
                before_step(rows, step, int(t))
            eps = predict_noise(model, x, t, y, guidance_scale if guided else None, null)
            x = sched.step(eps, t, x, return_dict=False)[0]  # (B, C, H, W)
        samples.append(x.clamp(-1, 1).cpu())
        if keep_states:
            states.append(torch.stack(kept, 1))  # (B, S, C, H, W)
        bar.update(len(rows))
    bar.close()
    return Trajectories(
        samples=torch.cat(samples),
        states=torch.cat(states) if keep_states else None,
        timesteps=timesteps.cpu(),
        labels=labels.cpu(),
    )


def start_noised(sched: Any, images: torch.Tensor, noise: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) noised to sampler timestep `t` the way `sched` would see them:
    sqrt(ā) x0 + sqrt(1 - ā) ε for DDPM-style schedules, (1 - σ) x0 + σ ε for flow matching."""
    if hasattr(sched, "scale_noise"):  # flow matching: t is σ·T
        return sched.scale_noise(images, t.reshape(1), noise)  # (B, C, H, W)
    a = sched.alphas_cumprod[int(t)].to(images.device)
    return a.sqrt() * images + (1 - a).sqrt() * noise  # (B, C, H, W)


def sample_plan(train_labels: torch.Tensor | None, null: int, count: int,
                seed: int) -> tuple[torch.Tensor, list[int]]:
    """(labels, seeds) of the scorer's samples: seeds from `seed * 1_000_000`, and seed s gets
    the (s mod k)-th of the k training classes (`labels_for_seeds`: with every class trained,
    class s mod num_classes, as in eval and run); unlabelled data samples the null class."""
    classes = torch.unique(train_labels) if train_labels is not None else torch.tensor([null])
    seeds = [seed * 1_000_000 + i for i in range(count)]
    return classes[labels_for_seeds(seeds, len(classes))], seeds  # (count,), count seeds


def heldout_subset(images: torch.Tensor, labels: torch.Tensor | None, null: int, count: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of at most `count` held-out images and their labels."""
    rng = np.random.default_rng([seed, 7, 1_000_003])
    keep = np.sort(rng.choice(len(images), min(count, len(images)), replace=False))
    keep_t = torch.from_numpy(keep)
    if labels is None:
        return images[keep_t], torch.full((len(keep),), null, dtype=torch.long)
    return images[keep_t], labels[keep_t].to(torch.long)

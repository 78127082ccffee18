"""Deterministic DDIM sampling trajectories for the sampling-based scorers.

Image i of a trajectory set depends only on (model, label i, seed i), as in `sample_images`
(same initial noise, same DDIM schedule), so its memorized/not split matches what the evaluator
sees for the same seeds. A trajectory may also start from real images noised to a middle time
(`start_images` + `start_t`): the held-out reference of `activation-contrast`.

The sampler is the one `sample_images` uses: DDIM from an ε / v schedule, or the scheduler's own
Euler steps for flow matching (with its shift, and for dynamic shifting the μ of the image's
token count). Trajectories run in the transformer's input space, whatever it is: pixels,
latents, or Flux's 2×2-packed latents (`flux_model_space`), given by `shape` (C, H, W) when the
model has no `sample_size`.

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

from dit_prune.errors import DitPruneError
from dit_prune.sampling import (
    image_token_count,
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
    samples: torch.Tensor  # (N, C, H, W) final model inputs ([-1, 1] when clamped)
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
    shape: Sequence[int] | None = None,
    clamp: bool = True,
) -> Trajectories:
    """DDIM trajectories, one per (label, seed); see module docstring.

    With `start_images` (N, C, H, W), image i is noised with seed i's noise to the first DDIM
    timestep <= `start_t`, and only the remaining steps are run. `shape` is the (C, H, W) of
    one model input (default: the model's `in_channels` and `sample_size`; required for models
    without a sample size, such as Flux). `clamp`: clip the final samples to [-1, 1] (pixel
    space; latents are kept as they are). Raises DitPruneError when no step lies at or below
    `start_t`.
    """
    device = next(model.parameters()).device
    null = null_label(model)
    shape = model_input_shape(model, shape)  # (C, H, W)
    tokens = image_token_count(model, shape)
    sched = make_sampling_scheduler(scheduler, "ddim", steps, tokens)  # flow: its own Euler
    timesteps = sched.timesteps.clone()  # (S_all,)
    if start_t is not None:
        timesteps = timesteps[timesteps <= start_t]  # (S,)
        if len(timesteps) == 0:
            raise DitPruneError(f"none of the {steps} sampling steps lies at or below t = "
                                f"{start_t}: raise the sampling steps or the start time")
    guided = guidance_scale != 1.0
    samples, states = [], []
    bar = tqdm(total=len(seeds), desc="trajectories", disable=not progress, leave=False)
    for begin in range(0, len(seeds), batch_size):
        rows = torch.arange(begin, min(begin + batch_size, len(seeds)))  # (B,)
        y = labels[rows].to(device)  # (B,)
        noise = initial_noise([seeds[i] for i in rows], shape).to(device)  # (B, C, H, W)
        sched = make_sampling_scheduler(scheduler, "ddim", steps, tokens)  # fresh step counter
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
        samples.append((x.clamp(-1, 1) if clamp else x).cpu())
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


def model_input_shape(model: nn.Module, shape: Sequence[int] | None) -> tuple[int, int, int]:
    """(C, H, W) of one model input: `shape`, else the model's `in_channels` and `sample_size`;
    a one-line DitPruneError when neither is known."""
    if shape is not None:
        if len(shape) != 3:
            raise DitPruneError(f"a model input shape is (C, H, W), got {tuple(shape)}")
        return tuple(int(v) for v in shape)  # type: ignore[return-value]
    size = getattr(model.config, "sample_size", None)
    if not size:
        raise DitPruneError(f"{type(model).__name__} has no sample_size: pass the (C, H, W) "
                            "of its inputs")
    return int(model.config.in_channels), int(size), int(size)


def trajectory_space(data: Any) -> tuple[tuple[int, int, int], bool]:
    """(C, H, W) of the scorers' trajectories and whether to clamp their samples, from the
    calibration data (`CalibrationData`): the training images' shape (the transformer's input
    space: pixels, latents, Flux's packed latents), clamped to [-1, 1] only when the training
    images lie in [-1, 1] (pixel space; latents are compared as they are)."""
    images = data.train_images  # (N, C, H, W)
    inside = bool(images.min() >= -1 and images.max() <= 1)
    return tuple(int(v) for v in images.shape[1:]), inside  # type: ignore[return-value]


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

"""`cond-gap`: units that widen the conditional/unconditional gap on memorized trajectories.

In the spirit of Wen et al. (ICLR 2024): memorized generations show a large gap
G(x_t) = ||eps(x_t, c) - eps(x_t, null)|| (null = the model's null class, or the empty caption
inside `caption_conditioning`), visible from the first sampling step. eps is the noise the model's
output implies under its scheduler's prediction type (`Prediction.epsilon_at_time`: the output
itself for ε-prediction, converted from v or from the flow-matching velocity), so the gap is in
the same unit for every family. We generate `num_samples` images with fixed seeds (in the
transformer's input space, `run_trajectories`), keep those the ratio test calls memorized, and
score each unit by its first-order contribution to G averaged over every step
of those trajectories: dG/dg_u with a ones-gate g on the unit's channels (removing the unit
lowers G by about that much). Both branches are gated, as removal would remove the unit from both.

Example:
    >>> from dit_prune.scorers import get_scorer
    >>> get_scorer("cond-gap", num_samples=20, sampling_steps=10).sampling_steps
    10
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import memorization_report
from dit_prune.scorers.base import Scorer, ScoringContext, gate_gradient_sum
from dit_prune.scorers.calibration import predict_eps
from dit_prune.scorers.contrast import SamplingOptions
from dit_prune.scorers.trajectories import run_trajectories, sample_plan, trajectory_space
from dit_prune.units import Unit


@dataclass(frozen=True)
class CondGap(Scorer, SamplingOptions):
    """First-order contribution to ||eps(x_t, c) - eps(x_t, null)|| on memorized trajectories."""

    name: ClassVar[str] = "cond-gap"

    def __post_init__(self) -> None:
        self._check_sampling()

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        labels, seeds = sample_plan(ctx.data.train_labels, ctx.null_label, self.num_samples,
                                    ctx.options.seed)
        shape, clamp = trajectory_space(ctx.data)
        run = run_trajectories(ctx.model, ctx.scheduler, labels, seeds, self.sampling_steps,
                               self.guidance_scale, ctx.options.batch_size, keep_states=True,
                               progress=ctx.options.progress, shape=shape, clamp=clamp)
        prediction = ctx.prediction
        memorized = memorization_report(run.samples, ctx.data.train_images,
                                        value_range=None).memorized  # (N,) latents too
        if not memorized.any():
            raise DitPruneError(
                f"none of {len(seeds)} samples is memorized (ratio test): cond-gap needs "
                "memorized generations"
            )
        states = run.states[memorized]  # (M, S, C, H, W)
        steps = len(run.timesteps)
        x_all = states.flatten(0, 1)  # (M*S, C, H, W), sample-major
        t_all = run.timesteps.repeat(len(states))  # (M*S,)
        y_all = run.labels[memorized].repeat_interleave(steps)  # (M*S,)
        total = len(x_all)
        chunks = [(x_all[i : i + ctx.options.batch_size], t_all[i : i + ctx.options.batch_size],
                   y_all[i : i + ctx.options.batch_size])
                  for i in range(0, total, ctx.options.batch_size)]

        def objective(chunk: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, t, y = (v.to(ctx.device) for v in chunk)
            null = torch.full_like(y, ctx.null_label)  # (B,)
            out = predict_eps(ctx.model, torch.cat([x, x]), torch.cat([t, t]),
                              torch.cat([y, null]))  # (2B, C, H, W): ε, v or velocity
            eps = prediction.epsilon_at_time(out, torch.cat([x, x]).float(),
                                             torch.cat([t, t]))  # (2B, C, H, W)
            eps_c, eps_u = eps.float().chunk(2)  # (B, C, H, W) each
            return (eps_c - eps_u).flatten(1).norm(dim=1).sum() / total

        return gate_gradient_sum(ctx, units, iter(chunks), objective)  # (U,)

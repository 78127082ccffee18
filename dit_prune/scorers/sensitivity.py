"""`sensitivity`: units that make the denoiser hypersensitive to its input on training images.

From the theory of Ye et al. 2025: a memorizing denoiser (the empirical score) has a huge
Lipschitz constant at small diffusion times, while the generalizing one does not. For each
calibration example at small t we measure the input sensitivity along a random direction v
(unit RMS, its own random stream):

    S = RMS(J v),  J v = [eps(x_t + h v) - eps(x_t - h v)] / (2 h),  h = fd_scale * sigma_t

a central finite-difference Jacobian-vector product (PyTorch's fused CPU attention has no
forward-mode AD). The score of unit u is its first-order contribution to mean log S on training
images minus the same on held-out images: d(mean log S)/dg_u with a ones-gate g. The log makes
every timestep count alike (S grows like 1/sigma_t). Default timesteps: uniform over [0, 100).
Under v-prediction or flow matching, eps is the noise the model's output implies
(`Prediction.to_epsilon`) and sigma_t the noise coefficient of x_t (sqrt(1 - ā_t), or σ_t).

Example:
    >>> from dit_prune.scorers import get_scorer
    >>> get_scorer("sensitivity").default_timesteps
    'uniform:0,100'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_prune.errors import DitPruneError
from dit_prune.scorers.base import Scorer, ScoringContext, gate_gradient_sum
from dit_prune.scorers.calibration import HELDOUT, TRAIN, ExampleChunk, noised, predict_eps
from dit_prune.units import Unit


@dataclass(frozen=True)
class Sensitivity(Scorer):
    """Train-minus-held-out first-order contribution to log input sensitivity at small t."""

    name: ClassVar[str] = "sensitivity"
    default_timesteps: ClassVar[str] = "uniform:0,100"
    fd_scale: float = 0.01  # finite-difference step as a fraction of sigma_t

    def __post_init__(self) -> None:
        if not 0 < self.fd_scale <= 1:
            raise DitPruneError(f"fd_scale must lie in (0, 1], got {self.fd_scale!r}")

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        return (self._contribution(ctx, units, TRAIN)
                - self._contribution(ctx, units, HELDOUT))  # (U,)

    def _contribution(self, ctx: ScoringContext, units: list[Unit], split: str) -> torch.Tensor:
        total = ctx.count(split)
        prediction = ctx.prediction  # ε, v or flow matching

        def objective(chunk: ExampleChunk) -> torch.Tensor:
            x_t = noised(chunk, prediction)  # (B, C, H, W)
            _, sigma = prediction.coefficients(chunk.timesteps, x_t)  # (B, 1, 1, 1) noise scale
            v = chunk.direction  # (B, C, H, W)
            v = v / v.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)  # unit RMS
            h = self.fd_scale * sigma  # (B, 1, 1, 1)
            x_in = torch.cat([x_t + h * v, x_t - h * v])  # (2B, C, H, W)
            index = chunk.timesteps.repeat(2)  # (2B,)
            out = predict_eps(ctx.model, x_in, prediction.model_time(index),
                              chunk.labels.repeat(2))  # (2B, C, H, W): ε, v or velocity
            eps = prediction.to_epsilon(out, x_in.float(), index)  # (2B, C, H, W) ε
            plus, minus = eps.float().chunk(2)  # (B, C, H, W) each
            jvp = (plus - minus) / (2 * h)  # (B, C, H, W)
            rms = jvp.flatten(1).pow(2).mean(1).clamp_min(1e-20).sqrt()  # (B,)
            return rms.log().sum() / total

        return gate_gradient_sum(ctx, units, ctx.examples(split, with_direction=True), objective)

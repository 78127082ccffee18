"""First-order (Taylor) scorers on the denoising loss: `taylor-gap` and `ye2025`.

With a ones-gate g on each down-projection input, dL/dg_c = <a_c, dL/da_c> (summed over batch
and tokens), so removing unit u changes the loss by about dL_u = -sum_{c in u} dL/dg_c. One
forward and one (input-only) backward per chunk scores every unit at once.

Example:
    >>> import torch
    >>> from dit_prune.data import digits_split
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.scorers import CalibrationData, get_scorer
    >>> from dit_prune.units import enumerate_units
    >>> s = digits_split()
    >>> data = CalibrationData(s.pool_images[:8], s.pool_labels[:8],
    ...                        s.heldout_images[:8], s.heldout_labels[:8])
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> units = enumerate_units(model)
    >>> get_scorer("taylor-gap", batches=1, progress=False).score(model, units, data).shape
    torch.Size([2064])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_prune.errors import DitPruneError
from dit_prune.hooks import gates
from dit_prune.scorers.base import Scorer, ScoringContext, gate_gradient_sum
from dit_prune.scorers.calibration import (
    HELDOUT,
    TRAIN,
    ExampleChunk,
    noised,
    per_example_loss,
    predict_eps,
)
from dit_prune.units import DUAL_HEAD, HEAD, JOINT_HEAD, SINGLE_HEAD, Unit


def loss_rise(ctx: ScoringContext, units: list[Unit], split: str, order: int = 1) -> torch.Tensor:
    """Estimated rise of the mean denoising loss on `split` when each unit is removed: (U,).

    order 1: -dL/dg_u. order 2 adds the Gauss-Newton curvature term (1/P) E||d eps/dg_u||^2
    (the loss is quadratic in the output), estimated per example with a Rademacher projection:
    E_r[(r . d eps/dg_u)^2] = ||d eps/dg_u||^2. It costs one more input-only backward.
    """
    total = ctx.count(split)
    if order == 1:
        def objective(chunk: ExampleChunk) -> torch.Tensor:
            return per_example_loss(ctx.model, chunk, ctx.prediction).sum() / total

        return -gate_gradient_sum(ctx, units, ctx.examples(split), objective)  # (U,)
    rise = torch.zeros(len(units), dtype=torch.float64)  # (U,)
    prediction = ctx.prediction
    for chunk in ctx.examples(split, with_direction=True):
        with gates(ctx.model, units, batch=len(chunk.x0)) as g:
            pred = predict_eps(ctx.model, noised(chunk, prediction),
                               prediction.model_time(chunk.timesteps),
                               chunk.labels).float()  # (B, C, H, W)
            pixels = pred[0].numel()
            target = prediction.target(chunk.x0, chunk.noise, chunk.timesteps)  # (B, C, H, W)
            loss = (pred - target.float()).pow(2).flatten(1).mean(1).sum() / total  # ()
            first = torch.autograd.grad(loss, g.tensors, retain_graph=True)  # [(B, D_in)]
            signs = torch.sign(chunk.direction)  # (B, C, H, W) Rademacher
            projected = torch.autograd.grad((pred * signs).sum(), g.tensors)  # [(B, D_in)]
        curvature = g.unit_sums(projected).double().pow(2).sum(0) / (pixels * total)  # (U,)
        rise += (curvature - g.unit_sums(first).double().sum(0)).cpu()
    return rise


@dataclass(frozen=True)
class TaylorGap(Scorer):
    """dL_train(u) - dL_heldout(u): high when removing u hurts only the training fit."""

    name: ClassVar[str] = "taylor-gap"
    order: int = 1  # 1: first order (default); 2: plus the Gauss-Newton curvature term

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise DitPruneError(f"order must be 1 or 2, got {self.order!r}")

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        return (loss_rise(ctx, units, TRAIN, self.order)
                - loss_rise(ctx, units, HELDOUT, self.order))  # (U,)


@dataclass(frozen=True)
class Ye2025(Scorer):
    """Our reading of Ye, Zhu, Tao, Chen 2025: self-attention heads only (a family's own:
    SD3's and Flux's joint heads, SD3.5's dual heads, Flux's single-block heads);
    importance = |first-order change of the training denoising loss| at t ~ Beta(0.8, 2) * T;
    score = -importance, so the *least* important heads are pruned first (see
    docs/scorers.md for why)."""

    name: ClassVar[str] = "ye2025"
    kinds: ClassVar[tuple[str, ...]] = (HEAD, JOINT_HEAD, DUAL_HEAD, SINGLE_HEAD)
    default_timesteps: ClassVar[str] = "beta:0.8,2"

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        return -loss_rise(ctx, units, TRAIN).abs()  # (U,)

"""`learned-gates`: choose units jointly by optimizing one relaxed gate per unit.

Every unit u gets a gate z_u multiplied into its down-projection input channels
(`hooks.gates`). The gates' logits are optimized with Adam for `steps` steps to

    minimize  -L_train(z) / s  +  distill_weight * D_held(z) / s  +  sparsity_weight * E[#closed]

L_train(z): mean denoising loss (eps-MSE, mean over pixels) of the gated model on the
calibration *training* images (the images being copied). D_held(z): mean squared difference
between the gated and the ungated model's eps-prediction on the *held-out* images (distillation
to the frozen output). s: the ungated model's mean held-out denoising loss, so both terms are
dimensionless and the weights carry over between models. E[#closed]: the expected number of
closed gates, so only a few units close. Step i uses calibration batch i mod `batches` of both
splits (every image once, at that batch's timesteps and noise; default timesteps Beta(0.8, 2),
where copying is decided, docs/results.md section 3); gradients are accumulated over chunks of
`batch_size`, so the scores do not depend on it (up to float rounding).

Relaxation (`relaxation`):
  * ``hard-concrete`` (default; Louizos, Welling, Kingma 2018, "Learning Sparse Neural Networks
    through L0 Regularization"): z = clip(sigmoid((log u - log(1-u) + log_alpha) / beta)
    * (zeta - gamma) + gamma, 0, 1), u ~ U(0, 1), beta = 2/3, gamma = -0.1, zeta = 1.1; P(z = 0)
    has a closed form, so E[#closed] is exact and differentiable. Chosen because the sampled
    gates are *exactly* 0 with a positive probability: the optimizer sees what removing units
    (alone and together) does, not only the slope at z = 1, which is what misses units that
    stand in for each other, and what vanishes at a training optimum (docs/scorers.md).
  * ``sigmoid``: z = sigmoid(logit), deterministic; penalty sum(1 - z). Cheaper signal, but a
    gate can settle at a partial value that removal does not reproduce.

Score (raw) = -log_alpha (hard-concrete) or -logit (sigmoid) at the end: how closed the gate
ended, higher = prune first; `select_units` then removes the budget's most-closed units and the
pipeline removes them structurally. Gates start equal (`init_open` = P(z > 0) or the sigmoid
value); one uniform draw per step from a generator seeded with `seed` makes the scores
deterministic. Sources for learned masks on diffusion models: EcoDiff (Zhang, Jin et al. 2024,
"Effortless Efficiency: Low-Cost Pruning of Diffusion Models", arXiv 2412.02852: an L0-relaxed
mask on SDXL / FLUX units, kept close to the unpruned output) and UniForget (2025, learned masks
on FLUX units to forget), as issue 13 names them; here the mask is pushed *away* from the
copied images and kept close to the unpruned model only on held-out images.

Example:
    >>> from dit_prune.data import digits_split
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.scorers import CalibrationData, get_scorer
    >>> from dit_prune.units import enumerate_units
    >>> s = digits_split()
    >>> data = CalibrationData(s.pool_images[:4], s.pool_labels[:4],
    ...                        s.heldout_images[:4], s.heldout_labels[:4])
    >>> model = new_dit("tiny", 10, 8, 1)
    >>> scorer = get_scorer("learned-gates", steps=2, batches=1, progress=False)
    >>> scorer.score(model, enumerate_units(model, ["head"]), data).shape
    torch.Size([16])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.hooks import Gates, gates, slot_column_index
from dit_prune.scorers.base import Scorer, ScoringContext
from dit_prune.scorers.calibration import (
    HELDOUT,
    TRAIN,
    ExampleChunk,
    noised,
    per_example_loss,
    predict_eps,
)
from dit_prune.units import Unit

RELAXATIONS = ("hard-concrete", "sigmoid")
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # Louizos et al. 2018's hard-concrete constants
LOG_RATIO = math.log(-GAMMA / ZETA)  # log(-gamma / zeta), < 0


@dataclass(frozen=True)
class LearnedGates(Scorer):
    """Gates optimized jointly to raise the training loss, keep held-out output, close few."""

    name: ClassVar[str] = "learned-gates"
    default_timesteps: ClassVar[str] = "beta:0.8,2"
    steps: int = 100  # Adam steps
    lr: float = 0.05  # Adam learning rate on the logits
    distill_weight: float = 1.0  # weight of the held-out distillation term
    sparsity_weight: float = 0.05  # cost of one expected closed gate
    init_open: float = 0.95  # initial P(z > 0) (hard-concrete) or gate value (sigmoid)
    relaxation: str = "hard-concrete"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise DitPruneError(f"steps must be a positive integer, got {self.steps!r}")
        for key in ("lr", "distill_weight", "sparsity_weight", "init_open"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value) or value < 0:
                raise DitPruneError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise DitPruneError(f"lr must be > 0, got {self.lr!r}")
        if not 0 < self.init_open < 1:
            raise DitPruneError(f"init_open must lie strictly between 0 and 1, got "
                                f"{self.init_open!r}")
        if self.relaxation not in RELAXATIONS:
            raise DitPruneError(f"unknown relaxation {self.relaxation!r}; choose one of "
                                f"{', '.join(RELAXATIONS)}")

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        unique = sorted(set(units))
        logits = self.optimize(ctx, unique)  # (U',)
        position = {unit: i for i, unit in enumerate(unique)}
        return -logits[[position[u] for u in units]].double()  # (U,)

    def optimize(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        """The gates' final logits (log_alpha or sigmoid logit), (U,) float32 on the CPU."""
        train = _by_batch(ctx, TRAIN)
        held = _by_batch(ctx, HELDOUT)
        prediction = ctx.prediction  # ε, v or flow matching: noising, target, model time
        with torch.no_grad():
            frozen = [[predict_eps(ctx.model, noised(c, prediction),
                                   prediction.model_time(c.timesteps), c.labels)
                       for c in batch] for batch in held]  # (B, C, H, W)
            scale = sum(float(per_example_loss(ctx.model, c, prediction).sum())
                        for batch in held for c in batch) / ctx.count(HELDOUT)
        scale = max(scale, 1e-12)
        start = math.log(self.init_open / (1 - self.init_open))
        if self.relaxation == "hard-concrete":
            start += BETA * LOG_RATIO  # P(z > 0) = sigmoid(log_alpha - beta log(-gamma/zeta))
        logits = torch.full((len(units),), start, requires_grad=True)  # (U,) on the CPU
        optimizer = torch.optim.Adam([logits], lr=self.lr)
        generator = torch.Generator().manual_seed(self.options.seed)
        with gates(ctx.model, units) as g:
            index = _gate_index(g, units)
            for step in tqdm(range(self.steps), desc="learned gates",
                             disable=not self.options.progress, leave=False):
                noise = torch.rand(len(units), generator=generator)  # (U,) one draw per step
                z = self.gate_values(logits, noise)  # (U,)
                _set_gates(g, index, z.detach().to(ctx.device))
                k = step % len(train)
                grad = _objective_grad(ctx, g, train[k], held[k], frozen[k], scale,
                                       self.distill_weight)  # (U,) d objective / d z
                penalty = self.sparsity_weight * self.closed_probability(logits).sum()  # ()
                optimizer.zero_grad()
                ((z * grad).sum() + penalty).backward()
                optimizer.step()
        return logits.detach()

    def gate_values(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z in [0, 1] per unit, differentiable in `logits` (noise ~ U(0, 1), (U,))."""
        if self.relaxation == "sigmoid":
            return torch.sigmoid(logits)  # (U,)
        u = noise.clamp(1e-6, 1 - 1e-6)  # (U,)
        s = torch.sigmoid((u.log() - (-u).log1p() + logits) / BETA)  # (U,)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)  # (U,)

    def closed_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """P(z = 0) per unit (hard-concrete), or 1 - z (sigmoid): (U,)."""
        if self.relaxation == "sigmoid":
            return 1 - torch.sigmoid(logits)  # (U,)
        return 1 - torch.sigmoid(logits - BETA * LOG_RATIO)  # (U,)


def _by_batch(ctx: ScoringContext, split: str) -> list[list[ExampleChunk]]:
    """The split's example chunks grouped by calibration batch: [batch][chunk]."""
    per_batch = ctx.count(split) // ctx.options.batches
    chunks_per_batch = -(-per_batch // ctx.options.batch_size)
    chunks = list(ctx.examples(split))
    return [chunks[i:i + chunks_per_batch] for i in range(0, len(chunks), chunks_per_batch)]


def _gate_index(g: Gates, units: list[Unit]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per slot: (U_s, width) channel indices and (U_s,) positions of its units in `units`."""
    position = {unit: i for i, unit in enumerate(units)}
    return [(slot_column_index(slot), torch.tensor([position[u] for u in slot.units]))
            for slot in g.slots]


def _set_gates(g: Gates, index: list[tuple[torch.Tensor, torch.Tensor]],
               z: torch.Tensor) -> None:
    """Write unit gate values z (U,) into every unit's channels of the gate tensors."""
    with torch.no_grad():
        for tensor, (columns, members) in zip(g.tensors, index, strict=True):
            values = z[members.to(z.device)].to(tensor.dtype)  # (U_s,)
            tensor[columns.to(tensor.device)] = values[:, None].expand(columns.shape)


def _objective_grad(ctx: ScoringContext, g: Gates, train: list[ExampleChunk],
                    held: list[ExampleChunk], frozen: list[torch.Tensor], scale: float,
                    distill_weight: float) -> torch.Tensor:
    """d(-L_train / s + w D_held / s) / d z_u at the current gates, (U,) float32 on the CPU."""
    n_train = sum(len(c.x0) for c in train)
    n_held = sum(len(c.x0) for c in held)
    total = torch.zeros(len(g.units))  # (U,)
    prediction = ctx.prediction
    for chunk in train:
        value = -per_example_loss(ctx.model, chunk, prediction).sum() / (
            n_train * scale)  # ()
        total += g.unit_sums(torch.autograd.grad(value, g.tensors)).float().cpu()  # (U,)
    if distill_weight == 0:
        return total
    for chunk, target in zip(held, frozen, strict=True):
        pred = predict_eps(ctx.model, noised(chunk, prediction),
                           prediction.model_time(chunk.timesteps), chunk.labels)  # (B, C, H, W)
        value = (pred - target).pow(2).flatten(1).mean(1).sum() * distill_weight / (
            n_held * scale)  # ()
        total += g.unit_sums(torch.autograd.grad(value, g.tensors)).float().cpu()  # (U,)
    return total

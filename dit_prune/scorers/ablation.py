"""`ablation-gap`: the exact counterpart of `taylor-gap`, by zeroing each unit in turn.

score(u) = [L_train(u removed) - L_train] - [L_heldout(u removed) - L_heldout], on the same
calibration examples as `taylor-gap`. Units are ablated `replicas` at a time: the batch holds
`replicas` copies of `batch_size // replicas` examples, copy r with unit r zeroed
(`hooks.ablate_each`), so every forward pass has at most `batch_size` examples. It costs about
(#units / replicas) forward passes per chunk: a reference, not a production scorer.

Example:
    >>> from dit_prune.scorers import get_scorer
    >>> get_scorer("ablation-gap", replicas=8).replicas
    8
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.hooks import ablate_each
from dit_prune.scorers.base import Scorer, ScoringContext
from dit_prune.scorers.calibration import HELDOUT, TRAIN, ExampleChunk, per_example_loss
from dit_prune.units import Unit


@dataclass(frozen=True)
class AblationGap(Scorer):
    """Exact train-minus-held-out loss rise of removing each unit (slow reference)."""

    name: ClassVar[str] = "ablation-gap"
    replicas: int = 16  # units ablated side by side in one forward pass

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise DitPruneError(f"replicas must be a positive integer, got {self.replicas!r}")

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        return exact_loss_rise(ctx, units, TRAIN, self.replicas) - exact_loss_rise(
            ctx, units, HELDOUT, self.replicas)  # (U,)


@torch.no_grad()
def exact_loss_rise(ctx: ScoringContext, units: list[Unit], split: str,
                    replicas: int) -> torch.Tensor:
    """Exact rise of the mean denoising loss on `split` when each unit alone is removed: (U,)."""
    total = ctx.count(split)
    replicas = min(replicas, len(units))
    piece = max(1, ctx.options.batch_size // replicas)  # examples per forward
    rise = torch.zeros(len(units), dtype=torch.float64)  # (U,)
    groups = [list(range(i, min(i + replicas, len(units))))
              for i in range(0, len(units), replicas)]
    bar = tqdm(total=total * len(groups), desc=f"ablating ({split})",
               disable=not ctx.options.progress, leave=False)
    for chunk in ctx.examples(split):
        for start in range(0, len(chunk.x0), piece):
            part = _slice(chunk, start, start + piece)
            base = per_example_loss(ctx.model, part, ctx.prediction)  # (B,)
            for group in groups:
                copies = _repeat(part, len(group))
                with ablate_each(ctx.model, [units[i] for i in group]):
                    losses = per_example_loss(ctx.model, copies, ctx.prediction)  # (R*B,)
                delta = losses.view(len(group), -1).double() - base.double()  # (R, B)
                rise[group] += delta.sum(1).cpu() / total
                bar.update(len(base))
    bar.close()
    return rise


def _slice(chunk: ExampleChunk, start: int, stop: int) -> ExampleChunk:
    return ExampleChunk(chunk.x0[start:stop], chunk.labels[start:stop],
                        chunk.timesteps[start:stop], chunk.noise[start:stop], None)


def _repeat(chunk: ExampleChunk, copies: int) -> ExampleChunk:
    return ExampleChunk(
        chunk.x0.repeat(copies, 1, 1, 1),  # (R*B, C, H, W)
        chunk.labels.repeat(copies),  # (R*B,)
        chunk.timesteps.repeat(copies),  # (R*B,)
        chunk.noise.repeat(copies, 1, 1, 1),  # (R*B, C, H, W)
        None,
    )

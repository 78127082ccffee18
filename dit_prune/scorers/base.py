"""The scorer interface, the scoring context, and the one-backward gate-gradient pass.

A scorer maps (model, units, calibration data) to one score per unit, higher = contributes more
to memorization = prune first. `compute` also returns the raw (un-normalized) scores. Scorers
call ``model(x_t, timestep=t, class_labels=y)``; a text-conditioned model (PixArt) is scored
inside `dit_prune.pipelines.text_conditioning`, which turns those labels into captions.

Example:
    >>> from dit_prune.scorers import get_scorer
    >>> scorer = get_scorer("random", seed=1)
    >>> scorer.name, scorer.options.seed
    ('random', 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import diffusers
import torch
from torch import nn
from tqdm.auto import tqdm

from dit_prune.data import check_fits_model
from dit_prune.errors import DitPruneError
from dit_prune.hooks import gates
from dit_prune.prediction import Prediction
from dit_prune.scorers.calibration import (
    CalibrationData,
    ExampleChunk,
    count_examples,
    iterate_examples,
    null_label,
)
from dit_prune.scorers.normalize import normalize_scores
from dit_prune.scorers.options import ScorerOptions, TimestepDistribution
from dit_prune.units import UNIT_KINDS, Unit, adapter_for, group_units


@dataclass(frozen=True)
class ScoreResult:
    """Final scores (normalized, quality penalty applied) and what they were made from."""

    units: list[Unit]
    scores: torch.Tensor  # (U,) float64, higher = prune first
    raw: torch.Tensor  # (U,) float64, the scorer's own quantity
    harm: torch.Tensor | None = None  # (U,) first-order held-out loss rise, when penalized


@dataclass
class ScoringContext:
    """Everything a scorer's `raw_scores` needs, on the scoring device."""

    model: nn.Module
    data: CalibrationData
    scheduler: Any
    options: ScorerOptions
    timesteps: TimestepDistribution
    device: torch.device

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction(self) -> Prediction:
        """The scheduler's noising, target and model time (ε, v or flow matching)."""
        return Prediction.from_scheduler(self.scheduler)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ā (T,) of a DDPM-style schedule (scorers that take it noise with ε / v only)."""
        if getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise DitPruneError(f"{type(self.scheduler).__name__} has no alphas_cumprod: this "
                                "scorer supports ε / v-prediction schedules only")
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)  # (T,)

    @property
    def null_label(self) -> int:
        return null_label(self.model)

    def examples(self, split: str, with_direction: bool = False) -> Iterator[ExampleChunk]:
        total = count_examples(self.data, split, self.options, self.timesteps)
        chunks = iterate_examples(self.data, split, self.options, self.timesteps,
                                  self.num_train_timesteps, self.null_label, self.device,
                                  with_direction)
        bar = tqdm(total=total, desc=f"scoring ({split})", disable=not self.options.progress,
                   leave=False)
        try:
            for chunk in chunks:
                yield chunk
                bar.update(len(chunk.x0))
        finally:
            bar.close()

    def count(self, split: str) -> int:
        return count_examples(self.data, split, self.options, self.timesteps)


@dataclass(frozen=True)
class Scorer:
    """Base class: subclasses set `name` and implement `raw_scores(ctx, units)`."""

    name: ClassVar[str] = ""
    # every family's kinds (docs/families.md): gates, ablate_each and observe act on every site
    kinds: ClassVar[tuple[str, ...]] = UNIT_KINDS
    default_timesteps: ClassVar[str] = "uniform"
    options: ScorerOptions = field(default_factory=ScorerOptions)

    def score(self, model: nn.Module, units: Sequence[Unit], data: CalibrationData,
              scheduler: Any = None) -> torch.Tensor:
        """(U,) float64 scores aligned with `units`; higher = prune first."""
        return self.compute(model, units, data, scheduler).scores

    def compute(self, model: nn.Module, units: Sequence[Unit], data: CalibrationData,
                scheduler: Any = None) -> ScoreResult:
        """Raw scores, normalized across unit kinds, minus the optional quality penalty."""
        units = self._check(model, units, data)
        with scoring_mode(model, self.options.device) as device:
            ctx = ScoringContext(
                model=model, data=data, scheduler=scheduler or default_scheduler(),
                options=self.options, timesteps=self.options.timestep_distribution(
                    self.default_timesteps), device=device)
            raw = self.raw_scores(ctx, units).detach().to(torch.float64).cpu()  # (U,)
            scores = normalize_scores(raw, units, self.options.normalize, model)  # (U,)
            harm = None
            if self.options.quality_weight > 0:
                from dit_prune.scorers.quality import quality_harm

                harm = quality_harm(ctx, units)  # (U,)
                penalty = normalize_scores(harm, units, self.options.normalize, model)
                scores = scores - self.options.quality_weight * penalty
        return ScoreResult(list(units), scores, raw, harm)

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        raise NotImplementedError

    def check_budgets(self, budgets: Sequence[float], budget_mode: str) -> None:
        """Refuse (DitPruneError) budgets this scorer cannot rank; every budget by default."""

    def check_units(self, units: Sequence[Unit]) -> None:
        """Refuse (DitPruneError) a run whose scored units this scorer cannot rank, before any
        sampling; every unit list by default."""

    def config(self) -> dict[str, Any]:
        """Scorer name, shared options and scorer-specific options (JSON-ready)."""
        specific = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {"scorer": self.name, "options": self.options.to_json(), "specific": specific}

    def _check(self, model: nn.Module, units: Sequence[Unit],
               data: CalibrationData | None) -> list[Unit]:
        adapter_for(model)  # "unsupported model: <class>" for anything else
        units = list(units)
        if not units:
            raise DitPruneError("no units to score")
        if not all(isinstance(u, Unit) for u in units):
            raise DitPruneError("units must be dit_prune.Unit instances")
        wrong = sorted({u.kind for u in units} - set(self.kinds))
        if wrong:
            raise DitPruneError(
                f"scorer {self.name!r} scores only {', '.join(self.kinds)} units, got {wrong}"
            )
        group_units(model, units)  # "<unit> does not exist in the model" for unknown units
        if data is not None and not isinstance(data, CalibrationData):
            raise DitPruneError("data must be a dit_prune.scorers.CalibrationData")
        if data is not None:
            check_fits_model(data.train_images, data.train_labels, model, "training images")
            check_fits_model(data.heldout_images, data.heldout_labels, model, "held-out images")
        return units


def default_scheduler() -> Any:
    """The noise schedule the trainer uses (DDPM, 1000 linear-beta steps)."""
    return diffusers.DDPMScheduler(num_train_timesteps=1000)


@contextmanager
def scoring_mode(model: nn.Module, device: str | None) -> Iterator[torch.device]:
    """Eval mode (and `device`, if given) while scoring; the model's mode and device are
    restored afterwards."""
    was_training = model.training
    original = next(model.parameters()).device
    target = original if device is None else _resolve_device(device)
    try:
        model.eval().to(target)
        yield target
    finally:
        model.train(was_training).to(original)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def gate_gradient_sum(
    ctx: ScoringContext,
    units: list[Unit],
    chunks: Iterator[Any],
    objective: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    """Sum over chunks of d objective(chunk) / d gate_u (unit channels summed): (U,) float64.

    `objective(chunk)` returns a scalar built from the model's forward pass. With gates at 1,
    -gradient is the first-order change of the objective when the unit is removed.
    """
    total = torch.zeros(len(units), dtype=torch.float64)  # (U,)
    with gates(ctx.model, units) as g:
        for chunk in chunks:
            value = objective(chunk)  # ()
            grads = torch.autograd.grad(value, g.tensors)  # [(D_in,)] per layer
            total += g.unit_sums(grads).detach().to(torch.float64).cpu()  # (U,)
    return total

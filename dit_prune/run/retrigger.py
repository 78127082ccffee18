"""Re-trigger robustness of `dit-prune run`: one fixed attack applied to each table arm.

The attack (dit_prune.metrics.retrigger, after Kowalczuk et al. 2025, "Finding Dori") optimises
the initial noise so that the model reproduces a target. The run attacks the images it counts
as copied (the duplicated images of a `--duplicate` checkpoint, else a seeded sample of the
training images) and as many held-out images (the floor), with the run's copy detector and tau.
A latent text-to-image run attacks the latent noise and compares the VAE-decoded samples.

Example:
    >>> probe = retrigger_probe(cfg, inputs, target, context)  # doctest: +SKIP
    >>> probe(model)["retrigger_rate"]  # doctest: +SKIP
    0.9
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dit_prune.metrics.retrigger import (
    AttackBudget,
    RetriggerTargets,
    attack_success,
    choose_targets,
)


@dataclass
class RetriggerProbe:
    """Attacks a model with the run's budget and targets; counts the seconds it spends."""

    budget: AttackBudget
    targets: RetriggerTargets
    scheduler: Any
    detector: Any
    threshold: float
    source: str  # "duplicated" or "training sample": where the copied targets come from
    seconds: float = 0.0
    models: int = 0
    # latent models: model-space samples -> images in [-1, 1], and the (c, h, w) of the noise
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    shape: tuple[int, int, int] | None = None

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        """retrigger_rate / _interval / _floor (and MSEs) of one model, for its arm's metrics."""
        started = time.perf_counter()
        result = attack_success(model, self.scheduler, self.targets, self.budget, self.detector,
                                self.threshold, decode=self.decode, shape=self.shape)
        self.seconds += time.perf_counter() - started
        self.models += 1
        return result.metrics(seed=self.budget.seed)

    def describe(self) -> dict[str, Any]:
        """What was measured, for report.json's "retrigger" entry."""
        heldout = int(self.targets.heldout.sum())
        return {"targets": len(self.targets.heldout) - heldout, "heldout_targets": heldout,
                "source": self.source, "attack_steps": self.budget.attack_steps,
                "ddim_steps": self.budget.ddim_steps, "lr": self.budget.lr,
                "prior_weight": self.budget.prior_weight, "seed": self.budget.seed,
                "copy_threshold": self.threshold, "models_attacked": self.models,
                "seconds": round(self.seconds, 2)}


def retrigger_probe(cfg: Any, inputs: Any, target: tuple[str, list[int]] | None,
                    context: Any) -> RetriggerProbe | None:
    """The run's probe (None when --retrigger-targets is 0): targets from `target`'s training
    positions (the duplicated images) or a seeded sample of all training images."""
    budget = cfg.retrigger_budget()
    if budget is None:
        return None
    targets = choose_targets(inputs.train_images, inputs.train_labels, inputs.heldout_images,
                             inputs.heldout_labels, budget.targets,
                             positions=target[1] if target else None, seed=budget.seed)
    text = getattr(inputs, "text", None)
    latent = text is not None and text.latent
    return RetriggerProbe(budget, targets, inputs.loaded.scheduler, context.copy_detector,
                          float(context.copy_threshold),
                          source=target[0] if target else "training sample",
                          decode=text.decode if latent else None,
                          shape=text.model_shape if latent else None)

"""The recovery of `dit-prune run`: its data, its copied targets, and one call per pruned model.

Every model the run prunes (the scorer's, random's) gets the same recovery, and so does one
control: the *unpruned* model, so that a recovery's own effect on copying and quality is seen
apart from pruning's (docs/results.md does the same for fine-tuning).

* data: `--recover-data` (train, unused, heldout, a folder), or ``generated-novel``: the run's
  sample store draws `--recover-pool` teacher samples (seeds from
  `recovery_data.GENERATED_SEED_BASE`, class = seed mod classes, the run's sampler, steps and
  guidance)
  and `novel_filter` keeps those below the run's copy threshold tau;
* adversarial targets: the duplicated images when the run targets them, else the training
  images the unpruned model copies on the run's seeds (most copied first) — never held-out
  images.

Example:
    >>> recovery = prepare_recovery(cfg, inputs, base, ctx, draw, target, before)  # doctest: +SKIP
    >>> model = recovery.apply(pruned, "after_0.2")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.pruning.recovery import RecoveryConfig, recover
from dit_prune.pruning.recovery_data import (
    GENERATED_NOVEL,
    RECOVERY_SOURCES,
    check_enough_novel,
    generated_seeds,
    novel_filter,
)
from dit_prune.sampling import labels_for_seeds

FINETUNE_TIMESTEPS = "all"  # report.json: finetune's t, uniform over the whole noise schedule


def heldout_contamination(cfg: Any, text: bool) -> str | None:
    """The warning for recovery data that is the run's held-out set (FD's and τ's reference),
    or None: the keyword ``heldout`` (on a class-conditional run, only while the held-out set
    is the default digits one) or a folder that resolves to `--heldout`'s."""
    if cfg.recover == "none":
        return None
    data = str(cfg.recover_data)
    same = False
    if data == "heldout":
        same = text or not cfg.heldout
    elif cfg.heldout and data not in RECOVERY_SOURCES:
        same = Path(data).expanduser().resolve() == Path(cfg.heldout).expanduser().resolve()
    if not same:
        return None
    return (f"recovery trains on the held-out images (--recover-data {data}), which FD is "
            "measured against: FD after recovery is contaminated (biased low)")


@dataclass
class RunRecovery:
    """What every model of the run is recovered with (the same for all of them)."""

    method: str
    images: torch.Tensor  # (R, C, H, W) in [-1, 1]
    labels: torch.Tensor | None  # (R,)
    teacher: nn.Module  # the unpruned model
    scheduler: Any
    options: dict[str, Any]  # RunConfig.recovery_options()
    data_info: dict[str, Any]
    targets: torch.Tensor | None = None  # (T, C, H, W) adversarial: the copied images
    target_labels: torch.Tensor | None = None  # (T,)
    target_positions: list[int] = field(default_factory=list)  # their training indices
    target_source: str = ""
    summaries: list[dict[str, Any]] = field(default_factory=list)  # one per recovered model
    # text-to-image runs: the TextRun (its caption conditioning); labels are caption labels
    text: Any = None

    def apply(self, model: nn.Module, tag: str) -> nn.Module:
        """Recover `model` (named `tag` in the summaries) in place; returns it in eval mode."""
        if self.text is not None:  # caption-conditioned, through the prediction type
            from dit_prune.prediction import Prediction
            from dit_prune.pruning.caption_recovery import caption_recover

            result = caption_recover(self.method, model, self.images, self.labels,
                                     self.teacher, Prediction.from_scheduler(self.scheduler),
                                     self.text.condition, progress=False, **self.options)
        else:
            extra: dict[str, Any] = {}
            if self.method == "adversarial":
                extra = {"scheduler": self.scheduler, "targets": self.targets,
                         "target_labels": self.target_labels}
            result = recover(self.method, model, self.images, self.labels,
                             teacher=self.teacher, progress=False, **self.options, **extra)
        if result is None:
            return model.eval()
        summary = {k: v for k, v in result.summary().items() if k != "config"}
        self.summaries.append({"model": tag, **summary})
        return result.model.eval()

    def describe(self) -> dict[str, Any]:
        """report.json's "recovery": method, options, data and (adversarial) targets."""
        options = {k: v for k, v in self.options.items() if k != "config"}
        if "config" in self.options:
            options.update(vars(self.options["config"]))
        if self.method == "finetune":  # the trainer draws t over the whole schedule
            options.pop("t_min", None)
            options.pop("t_max", None)
            options["timesteps"] = FINETUNE_TIMESTEPS
        out: dict[str, Any] = {"method": self.method, "options": options,
                               "data": self.data_info, "models_recovered": len(self.summaries)}
        if self.targets is not None:
            out["targets"] = {"source": self.target_source, "positions": self.target_positions}
        out["summaries"] = self.summaries
        return out


def prepare_recovery(cfg: Any, inputs: Any, base: nn.Module, context: Any, sampler: Any,
                     target: tuple[str, list[int]] | None, before: Any) -> RunRecovery | None:
    """The run's recovery (None for --recover none), data drawn and filtered, targets chosen.

    `sampler` is the run's `Sampler` class bound to its store (called as
    `sampler(model, tag, model_hash, labels=..., seeds=...)`); `before` is the unpruned arm.
    """
    if cfg.recover == "none":
        return None
    contaminated = heldout_contamination(cfg, text=getattr(inputs, "text", None) is not None)
    if contaminated:  # collected into the report's warnings (and stderr) by the run
        warnings.warn(contaminated, UserWarning, stacklevel=2)
    options = cfg.recovery_options()
    if cfg.recover_data == GENERATED_NOVEL:
        seeds = generated_seeds(cfg.recover_pool)
        labels = labels_for_seeds(seeds, cfg.num_classes)  # (P,)
        drawn = sampler(base, "recovery_pool", inputs.loaded.meta.weights_sha256,
                        labels=labels, seeds=seeds)  # (P, C, H, W) in [0, 1]
        pool = novel_filter(drawn * 2 - 1, labels, context.train_embeddings,
                            context.copy_detector, context.copy_threshold, seeds)
        check_enough_novel(pool, options["config"].batch_size if "config" in options
                           else RecoveryConfig.batch_size)  # at least one recovery batch
        images, image_labels, info = pool.images, pool.labels, pool.info()
    else:
        images, image_labels = inputs.recovery_images, inputs.recovery_labels
        info = {"source": cfg.recover_data, "num_images": len(images)}
    recovery = RunRecovery(cfg.recover, images, image_labels, base, inputs.loaded.scheduler,
                           options, info, text=getattr(inputs, "text", None))
    if cfg.recover == "adversarial":
        _choose_targets(recovery, inputs, target, before, options["config"].max_targets)
    return recovery


def _choose_targets(recovery: RunRecovery, inputs: Any, target: tuple[str, list[int]] | None,
                    before: Any, count: int) -> None:
    """The copied training images the adversarial inner loop attacks."""
    if target is not None:
        positions, source = list(target[1])[:count], target[0]
    else:
        positions = [i for i, _ in before.evaluation.copy.most_copied(count)]
        source = "copied by the unpruned model"
    if not positions:
        raise DitPruneError("adversarial recovery: the unpruned model copies no training image "
                            "on the run's seeds, so there is nothing to re-trigger")
    idx = torch.as_tensor(positions, dtype=torch.long)  # (T,)
    recovery.targets = inputs.train_images[idx].cpu()  # (T, C, H, W)
    if inputs.train_labels is None:
        raise DitPruneError("adversarial recovery needs labelled training images (the attack "
                            "conditions on the target's class)")
    recovery.target_labels = inputs.train_labels[idx].cpu()  # (T,)
    recovery.target_positions, recovery.target_source = positions, source

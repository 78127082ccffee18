"""Recovery of caption-conditioned transformers (text-to-image runs): fine-tuning and
distillation on caption labels, through the scheduler's prediction type.

A text-to-image run gives every caption a label (`dit_prune.pipelines.caption_labels`) and calls
its transformers as ``model(x_t, timestep=t, class_labels=y)`` inside `caption_conditioning`.
Recovery does the same:

* ``finetune``: the text trainer's recipe (`dit_prune.text_training`): the scheduler's own loss
  (`Prediction`: ε, v or flow matching target at a time index k uniform in [0, T)), each
  example's caption dropped to the empty caption (the null label) with probability
  `caption_dropout` (0.1, as the trainer), AdamW, gradient clipping at 1, an EMA of the
  weights (decay `ema_decay`, with the trainer's warm-up) that is returned.
* ``distill``: `dit_prune.pruning.recovery.distill` with the prediction type: the student
  matches the unpruned teacher's output at time indices [t_min, t_max] only (both called with
  the same caption labels, dropped to the empty caption as above).

Adversarial recovery is not offered here (its inner attack conditions on class embeddings).

Example:
    >>> result = caption_recover("distill", student, images, labels, teacher,  # doctest: +SKIP
    ...                          Prediction.from_scheduler(pipe.scheduler), condition, steps=2)
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dit_prune.data import check_fits_model
from dit_prune.errors import DitPruneError
from dit_prune.models import null_label
from dit_prune.prediction import Prediction
from dit_prune.pruning.recovery import RecoveryConfig, RecoveryResult, distill
from dit_prune.text_training import _update_ema, denoising_loss

CAPTION_RECOVERIES = ("none", "finetune", "distill")
CAPTION_DROPOUT = 0.1  # the text trainer's default (TextTrainConfig.caption_dropout)
Condition = Callable[[nn.Module], AbstractContextManager[None]]


def caption_finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     prediction: Prediction, condition: Condition,
                     steps: int = RecoveryConfig.steps, lr: float = RecoveryConfig.lr,
                     batch_size: int = RecoveryConfig.batch_size,
                     ema_decay: float = RecoveryConfig.ema_decay, seed: int = 0,
                     progress: bool = True) -> RecoveryResult:
    """Fine-tune `model` in place on images (N, C, H, W) in its input space with caption labels
    (N,); returns the EMA weights loaded into `model` (`result.model`, eval mode).

    Raises a one-line DitPruneError for images or labels that do not suit the model, or bad
    options (`RecoveryConfig`)."""
    config = RecoveryConfig(steps=steps, lr=lr, batch_size=batch_size, ema_decay=ema_decay,
                            seed=seed)
    check_fits_model(images, labels, model, "recovery images")
    if labels is None or len(labels) != len(images):
        raise DitPruneError("caption fine-tuning needs one caption label per recovery image")
    device = next(model.parameters()).device
    null = null_label(model)
    images, labels = images.to(device), labels.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.requires_grad_(True).train()
    bar = tqdm(range(config.steps), desc="fine-tuning", disable=not progress)
    try:
        with condition(model):
            for step in bar:
                idx = torch.randint(len(images), (config.batch_size,), generator=gen)  # (B,)
                x0 = images[idx.to(device)]  # (B, C, H, W)
                drop = torch.rand(config.batch_size, generator=gen) < CAPTION_DROPOUT  # (B,)
                y = torch.where(drop.to(device), null, labels[idx.to(device)])  # (B,)
                k = torch.randint(prediction.num_train_timesteps, (config.batch_size,),
                                  generator=gen).to(device)  # (B,)
                noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, C, H, W)
                loss = denoising_loss(model, prediction, x0, noise, k, class_labels=y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                _update_ema(ema, model, config.ema_decay, step)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        bar.close()
        model.eval()
    model.load_state_dict(ema.state_dict())
    summary = {"steps": config.steps, "lr": config.lr, "batch_size": config.batch_size,
               "ema_decay": config.ema_decay, "seed": config.seed, "num_images": len(images),
               "caption_dropout": CAPTION_DROPOUT, "prediction": prediction.kind}
    return RecoveryResult(model, "finetune", losses, time.perf_counter() - started, summary)


def caption_recover(method: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    teacher: nn.Module, prediction: Prediction, condition: Condition,
                    **options: Any) -> RecoveryResult | None:
    """Run recovery `method` ('none', 'finetune' or 'distill') on a caption-conditioned
    `model` (see module docstring); `options` as for `dit_prune.pruning.recovery.recover`
    (steps, lr, batch_size, t_min, t_max, ema_decay, seed, progress; others are ignored)."""
    if method not in CAPTION_RECOVERIES:
        raise DitPruneError(f"recovery {method!r} is not supported on caption-conditioned "
                            f"models; choose one of {CAPTION_RECOVERIES}")
    if method == "none":
        return None
    if method == "finetune":
        allowed = ("steps", "lr", "batch_size", "ema_decay", "seed", "progress")
        return caption_finetune(model, images, labels, prediction, condition,
                                **{k: v for k, v in options.items() if k in allowed})
    allowed = ("steps", "lr", "batch_size", "t_min", "t_max", "seed", "progress")
    with condition(model), condition(teacher):
        return distill(model, teacher, images, labels, prediction=prediction,
                       **{k: v for k, v in options.items() if k in allowed})

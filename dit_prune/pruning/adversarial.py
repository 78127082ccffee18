"""Adversarial recovery: distill from the unpruned teacher while unlearning re-triggered copies.

In the spirit of Kowalczuk et al. 2025 ("Finding Dori: memorization in text-to-image diffusion
models is less local than assumed"), who find that pruning hides memorized images from random
seeds but an attacker who optimises the model's input brings them back, and that only
adversarial fine-tuning held. Each outer step here:

1. **inner loop** — the re-trigger attack of `dit_prune.metrics.retrigger` (`optimise_noise`:
   Adam on the initial noise through a differentiable DDIM sampler, given the target's class)
   searches, for every copied training image, noise that makes the *current* student reproduce
   it. The noise is warm-started from the previous step and redrawn every `restart_every`
   steps from seeds disjoint from the re-trigger probe's (`ADV_SEED_BASE`);
2. **outer step** — one AdamW step on the student's weights for
   ``distill + weight * mean_i relu(margin - mse_i)``, where mse_i is the pixel MSE between
   the student's DDIM sample from the attacked noise z_i (differentiated through the sampler)
   and target i. The hinge is bounded: a target whose attacked sample is already `margin` away
   gives no gradient, so the student is not pushed to make anything particular. The distill
   term is `recovery.distill_loss` on novel data (e.g. teacher samples the copy detector calls
   novel), at t in [t_min, t_max] (default: all t), and keeps quality close to the teacher.

The targets must be the copied training images (the duplicated ones when a checkpoint records
them), never held-out images: held-out targets measure the attack's floor.

With `embedding_lr` > 0 the inner loop also searches an offset added to the class embedding of
every block (`retrigger.class_embedding_offsets`, from 0, warm-started and reset with the
noise), the class-conditional analogue of Kowalczuk et al.'s embedding attack; the outer step
then samples with that offset too. Default 0: the noise alone, the attack `dit-prune run`'s
probe measures with.

Example:
    >>> from diffusers import DDPMScheduler
    >>> from dit_prune.models import new_dit
    >>> teacher, student = new_dit("tiny", 10, 8, 1), new_dit("tiny", 10, 8, 1)
    >>> novel = torch.rand(16, 1, 8, 8) * 2 - 1
    >>> copied, classes = torch.rand(2, 1, 8, 8) * 2 - 1, torch.tensor([3, 7])
    >>> config = AdversarialConfig(steps=2, batch_size=4, inner_steps=1, ddim_steps=2)
    >>> result = adversarial(student, teacher, DDPMScheduler(), novel, None, copied, classes,
    ...                      config, progress=False)
    >>> len(result.trace["attacked_mse"]), result.config["num_targets"]
    (2, 2)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dit_prune.data import check_fits_model
from dit_prune.errors import DitPruneError
from dit_prune.metrics.retrigger import (
    SEED_STRIDE,
    AttackBudget,
    class_embedding_offsets,
    ddim_sample,
    optimise_noise,
    zero_offsets,
)
from dit_prune.models import disable_block_label_dropout, null_class
from dit_prune.pruning.recovery import (
    RecoveryConfig,
    RecoveryResult,
    _require_class_conditional,
    distill_loss,
    noise_levels,
    student_training,
)
from dit_prune.sampling import initial_noise

# noise seed of target i in restart r under seed s: ADV_SEED_BASE + SEED_STRIDE * s + T * r + i;
# the re-trigger probe uses SEED_STRIDE * s + i (i < 2T), so the two never share a noise
ADV_SEED_BASE = 100_000_000


@dataclass(frozen=True)
class AdversarialConfig:
    """Options of adversarial recovery (validated on creation; one-line errors).

    Example:
        >>> AdversarialConfig(margin=0)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: adversarial recovery margin must be a finite number \
> 0, got 0
    """

    steps: int = RecoveryConfig.steps  # outer steps (weight updates)
    lr: float = RecoveryConfig.lr  # AdamW learning rate of the weights
    batch_size: int = RecoveryConfig.batch_size  # distillation batch
    t_min: int = 0  # distillation t range: all t by default (novel data)
    t_max: int = RecoveryConfig.t_max
    seed: int = 0
    inner_steps: int = 2  # Adam steps on the noise per outer step (warm-started)
    restart_every: int = 20  # outer steps between fresh noises
    ddim_steps: int = 8  # steps of the differentiable DDIM sampler (the probe's default)
    attack_lr: float = 0.1  # Adam learning rate of the noise (the probe's default)
    prior_weight: float = 1.0  # the attack's penalty keeping the noise's mean 0 and std 1
    weight: float = 1.0  # weight of the hinge term against the distillation term
    # pixel MSE (images in [-1, 1]) beyond which a target is left alone. On digits-duplicated
    # 0.1 gave FD +105% and grainy samples, 0.05 FD -15% at 13x fewer copies
    # (docs/results.md, recovery and re-triggering)
    margin: float = 0.05
    embedding_lr: float = 0.0  # > 0: the inner loop also searches the class embedding
    max_targets: int = 16  # copied images attacked at most (the first ones given)

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("batch_size", 1), ("inner_steps", 1),
                          ("restart_every", 1), ("ddim_steps", 1), ("max_targets", 1),
                          ("t_min", 0), ("t_max", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DitPruneError(f"adversarial recovery {name.replace('_', ' ')} must be an "
                                    f"integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DitPruneError(f"adversarial recovery seed must be an integer, got "
                                f"{self.seed!r}")
        for name, positive in (("lr", True), ("attack_lr", True), ("margin", True),
                               ("weight", False), ("prior_weight", False),
                               ("embedding_lr", False)):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value) and (value > 0 if positive else value >= 0)
            if not ok:
                raise DitPruneError(f"adversarial recovery {name.replace('_', ' ')} must be a "
                                    f"finite number {'> 0' if positive else '>= 0'}, got "
                                    f"{value!r}")
        self.distill_config()  # the t range and the shared options

    def distill_config(self) -> RecoveryConfig:
        """The distillation term's options."""
        return RecoveryConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                              t_min=self.t_min, t_max=self.t_max, seed=self.seed)

    def attack_budget(self, targets: int) -> AttackBudget:
        """The inner loop's budget: `inner_steps` Adam steps per outer step."""
        return AttackBudget(targets=targets, attack_steps=self.inner_steps,
                            ddim_steps=self.ddim_steps, lr=self.attack_lr,
                            prior_weight=self.prior_weight, seed=self.seed,
                            embedding_lr=self.embedding_lr)


ADVERSARIAL_OPTIONS = tuple(AdversarialConfig.__dataclass_fields__)


def adversarial_config(options: dict[str, Any], **defaults: Any) -> AdversarialConfig:
    """An AdversarialConfig from KEY=VALUE options (unknown keys refused) over `defaults`."""
    unknown = sorted(set(options) - set(ADVERSARIAL_OPTIONS))
    if unknown:
        raise DitPruneError(f"unknown adversarial recovery option {unknown[0]!r}; use "
                            f"{', '.join(ADVERSARIAL_OPTIONS)}")
    return AdversarialConfig(**{**defaults, **options})


def adversarial(
    student: nn.Module,
    teacher: nn.Module,
    scheduler: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    targets: torch.Tensor,
    target_labels: torch.Tensor,
    config: AdversarialConfig | None = None,
    progress: bool = True,
) -> RecoveryResult:
    """Adversarial recovery of `student` (trained in place and returned, in eval mode).

    images (N, C, H, W) in [-1, 1] with labels (N,) or None: the distillation data (novel
    images). targets (T, C, H, W) in [-1, 1] with target_labels (T,): the copied training
    images the attack tries to re-trigger (the first `config.max_targets`). `teacher` is left
    as it was. Deterministic for `config.seed`. `result.trace` holds, per outer step, the
    distillation loss and the mean pixel MSE of the attacked samples to their targets (higher:
    further from the copies). Raises DitPruneError on images or targets the model cannot take.
    """
    config = config or AdversarialConfig()
    _require_class_conditional(student)
    check_fits_model(images, labels, student, "recovery images")
    check_fits_model(targets, target_labels, student, "adversarial targets")
    if len(images) == 0 or len(targets) == 0:
        raise DitPruneError("adversarial recovery needs distillation images and copied targets")
    if labels is not None and len(labels) != len(images):
        raise DitPruneError(f"{len(images)} images but {len(labels)} labels")
    if len(target_labels) != len(targets):
        raise DitPruneError(f"{len(targets)} adversarial targets but {len(target_labels)} labels")
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    distill_config = config.distill_config()
    distill_config.check_timesteps(num_train_timesteps)
    disable_block_label_dropout(student)
    device = next(student.parameters()).device
    goal = targets[: config.max_targets].to(device)  # (T, C, H, W)
    goal_labels = target_labels[: config.max_targets].to(device)  # (T,)
    budget = config.attack_budget(len(goal))
    alphas = noise_levels(num_train_timesteps, device)  # (T_train,)
    null = null_class(student)
    losses: list[float] = []
    trace: dict[str, list[float]] = {"distill_loss": [], "attacked_mse": []}
    z, offsets = goal, None  # replaced at step 0
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc="adversarial recovery", disable=not progress)
    with student_training(student, teacher, config.lr, config.seed, bar) as (optimizer, gen):
        for step in bar:
            if step % config.restart_every == 0:
                z = initial_noise(_noise_seeds(config, step // config.restart_every, len(goal)),
                                  tuple(goal.shape[1:])).to(device)  # (T, C, H, W)
                offsets = zero_offsets(student, len(goal), budget)  # (L, T, D) or None
            z, offsets, _ = optimise_noise(student, scheduler, z, goal, goal_labels, budget,
                                           offsets)
            with class_embedding_offsets(student, offsets):
                x0 = ddim_sample(student, scheduler, z, goal_labels,
                                 config.ddim_steps)  # (T, C, H, W)
            mse = (x0 - goal).pow(2).flatten(1).mean(1)  # (T,)
            hinge = F.relu(config.margin - mse).mean()
            distill = distill_loss(student, teacher, images, labels, alphas, null,
                                   distill_config, gen)
            loss = distill + config.weight * hinge
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distill_config.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), distill_config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            trace["distill_loss"].append(float(distill.detach()))
            trace["attacked_mse"].append(float(mse.detach().mean()))
            bar.set_postfix(distill=f"{trace['distill_loss'][-1]:.4f}",  # every step
                            attacked_mse=f"{trace['attacked_mse'][-1]:.3f}", refresh=False)
    summary = asdict(config)
    summary.update(num_images=len(images), labelled=labels is not None, num_targets=len(goal))
    return RecoveryResult(student, "adversarial", losses, time.perf_counter() - started,
                          summary, trace)


def _noise_seeds(config: AdversarialConfig, restart: int, count: int) -> list[int]:
    base = ADV_SEED_BASE + SEED_STRIDE * config.seed + count * restart
    return [base + i for i in range(count)]

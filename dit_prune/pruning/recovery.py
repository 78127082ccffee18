"""Recovery after pruning: plain fine-tuning, or distillation that avoids re-teaching copies.

* ``finetune`` continues training with the project's trainer (`train_dit`, same recipe as the
  base model: epsilon loss, label dropout, EMA). On the training images this re-teaches copying
  (32% -> 72% memorized in 200 steps, docs/definitions.md#earlier-measurements); it is
  offered because Ye et al. 2025 fine-tune after pruning, and it can also run on images the
  base never saw.
* ``distill`` matches the pruned student to the unpruned teacher's full output, but only at
  large diffusion times (default t in [500, 999]), where the teacher's prediction depends on
  coarse structure rather than on individual training images; small t, where copying is
  decided, is left as pruning made it. Any images work (held-out, unused, unlabelled: labels
  are then drawn at random, null class included). On images the teacher generated and the copy
  detector calls novel (`recovery_data.novel_filter`), distillation can run at all t
  (`t_min=0`) without showing the student a copied image.
* ``adversarial`` (dit_prune.pruning.adversarial) distills the same way while moving the
  student off the samples a noise-optimisation attack makes of the copied images.

Example:
    >>> import torch
    >>> from dit_prune.models import new_dit
    >>> teacher = new_dit("tiny", 10, 8, 1)
    >>> student = new_dit("tiny", 10, 8, 1)
    >>> images = torch.rand(16, 1, 8, 8) * 2 - 1
    >>> result = distill(student, teacher, images, steps=2, batch_size=4, progress=False)
    >>> len(result.losses), result.config["t_min"]
    (2, 500)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dit_prune.data import check_fits_model
from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name
from dit_prune.models import disable_block_label_dropout, null_class, null_label
from dit_prune.prediction import Prediction

RECOVERY_METHODS = ("none", "finetune", "distill", "adversarial")
RECOVERING = RECOVERY_METHODS[1:]  # the methods that train
# the recovery options of `dit-prune prune` and `dit-prune run` -> the methods they apply to
# (finetune trains at every t with the trainer's schedule; only it keeps an EMA)
RECOVERY_FLAGS: dict[str, tuple[str, ...]] = {
    "--recover-steps": RECOVERING,
    "--recover-lr": RECOVERING,
    "--recover-batch-size": RECOVERING,
    "--recover-t-min": ("distill", "adversarial"),
    "--recover-t-max": ("distill", "adversarial"),
    "--recover-ema": ("finetune",),
    "--recover-data": RECOVERING,
    "--recover-pool": RECOVERING,  # and --recover-data generated-novel only
    "--recover-option": ("adversarial",),
}
# options that only the generated-novel recovery data reads
GENERATED_NOVEL_FLAGS = ("--recover-pool",)


def check_recovery_flags(method: str, given: Iterable[str], data: str | None = None,
                         generated_only: Iterable[str] = GENERATED_NOVEL_FLAGS) -> None:
    """Refuse, in one line, a recovery option that `method` (or the recovery data `data`,
    default train) would ignore: every flag in `given` (the options the user set, e.g.
    "--recover-t-min") must apply to `method` (`RECOVERY_FLAGS`; a flag not listed there applies
    to every method that trains), and those in `generated_only` need `data` generated-novel.

    `dit-prune prune` and `dit-prune run` (and `RunConfig`) check their options with it before
    any work, so a setting is never dropped without a word.

    Example:
        >>> check_recovery_flags("distill", ["--recover-t-min"])
        >>> check_recovery_flags("finetune", ["--recover-t-min"])
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: --recover-t-min applies to --recover distill or \
adversarial only, not finetune (which would ignore it)
    """
    from dit_prune.pruning.recovery_data import GENERATED_NOVEL

    if method not in RECOVERY_METHODS:
        raise DitPruneError(f"unknown recovery {method!r}; choose one of {RECOVERY_METHODS}")
    given = list(given)
    ordered = [f for f in RECOVERY_FLAGS if f in given] + \
        [f for f in given if f not in RECOVERY_FLAGS]
    generated_only = tuple(generated_only)
    for flag in ordered:
        methods = RECOVERY_FLAGS.get(flag, RECOVERING)
        if method == "none":
            raise DitPruneError(f"{flag} is a recovery option, but no recovery was chosen "
                                f"(--recover none): add --recover {_either(methods)}, or "
                                f"drop {flag}")
        if method not in methods:
            raise DitPruneError(f"{flag} applies to --recover {_either(methods)} only, "
                                f"not {method} (which would ignore it)")
        if flag in generated_only and (data or "train") != GENERATED_NOVEL:
            raise DitPruneError(f"{flag} applies to --recover-data {GENERATED_NOVEL} only, not "
                                f"{data or 'train'} (which would ignore it)")


def _either(names: tuple[str, ...]) -> str:
    """('a', 'b', 'c') -> 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


@dataclass(frozen=True)
class RecoveryConfig:
    """Options shared by the recovery methods (validated on creation); these defaults are the
    defaults of `finetune`, `distill`, `dit-prune prune --recover-*` and `dit-prune run`.

    Example:
        >>> RecoveryConfig(t_max=5000).check_timesteps(1000)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: recovery t range [500, 5000] must lie in [0, 999] (the \
scheduler's training steps)
    """

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 64
    t_min: int = 500
    t_max: int = 999
    label_dropout: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    ema_decay: float = 0.99  # finetune only

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise DitPruneError(f"recovery steps and batch size must be positive, got "
                                f"{self.steps} and {self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise DitPruneError(f"recovery learning rate must be a positive finite number, got "
                                f"{self.lr}")
        if not 0 <= self.t_min <= self.t_max:
            raise DitPruneError(f"recovery t range [{self.t_min}, {self.t_max}] is empty")
        if not 0.0 <= self.label_dropout < 1.0:
            raise DitPruneError(f"label dropout must lie in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise DitPruneError(f"recovery EMA decay must lie in [0, 1), got {self.ema_decay}")

    def check_timesteps(self, num_train_timesteps: int) -> None:
        """Refuse a t range outside the scheduler's [0, num_train_timesteps - 1]."""
        if self.t_max > num_train_timesteps - 1:
            raise DitPruneError(f"recovery t range [{self.t_min}, {self.t_max}] must lie in "
                                f"[0, {num_train_timesteps - 1}] (the scheduler's training "
                                "steps)")


@dataclass
class RecoveryResult:
    model: nn.Module  # the recovered model, in eval mode
    method: str
    losses: list[float]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    # other per-step series (adversarial: "distill_loss", "attacked_mse"), same length as losses
    trace: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "steps": len(self.losses)}
        for name, values in {"loss": self.losses, **self.trace}.items():
            head, tail = values[:20], values[-20:]
            out[f"{name}_first_20"] = sum(head) / max(len(head), 1)
            out[f"{name}_last_20"] = sum(tail) / max(len(tail), 1)
        out.update(seconds=round(self.seconds, 1), config=self.config)
        return out


def finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = RecoveryConfig.steps,
    lr: float = RecoveryConfig.lr,
    batch_size: int = RecoveryConfig.batch_size,
    ema_decay: float = RecoveryConfig.ema_decay,
    seed: int = 0,
    num_train_timesteps: int = 1000,
    progress: bool = True,
) -> RecoveryResult:
    """Plain fine-tuning of `model` on images (N, C, H, W) in [-1, 1] with labels (N,).

    Trains `model` in place with `train_dit` and returns its EMA copy as `result.model`.
    diffusers' per-block label dropout is switched off on `model` first (a DiT loaded with plain
    `DiTPipeline.from_pretrained` keeps it): labels are dropped once per example instead.
    """
    from dit_prune.training import TrainConfig, train_dit

    _require_class_conditional(model)
    check_fits_model(images, labels, model, "recovery images")
    disable_block_label_dropout(model)
    RecoveryConfig(steps=steps, lr=lr, batch_size=batch_size, ema_decay=ema_decay, seed=seed)
    train_config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                               seed=seed, probe_every=0,
                               num_train_timesteps=num_train_timesteps)
    result = train_dit(images, labels, train_config, num_classes=null_class(model), model=model,
                       progress=progress)
    config = {"steps": steps, "lr": lr, "batch_size": batch_size, "ema_decay": ema_decay,
              "seed": seed, "num_images": len(images)}
    return RecoveryResult(result.model, "finetune", result.losses, result.seconds, config)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    steps: int = RecoveryConfig.steps,
    lr: float = RecoveryConfig.lr,
    batch_size: int = RecoveryConfig.batch_size,
    t_min: int = RecoveryConfig.t_min,
    t_max: int = RecoveryConfig.t_max,
    seed: int = 0,
    num_train_timesteps: int = 1000,
    progress: bool = True,
    prediction: Prediction | None = None,
) -> RecoveryResult:
    """Match `student` to `teacher` (MSE on the full output) at t in [t_min, t_max] only.

    `student` is trained in place (and returned); `teacher` is left as it was (run in eval mode
    under no_grad, its mode restored afterwards). diffusers' per-block label dropout is switched
    off on `student` (a DiT loaded with plain `DiTPipeline.from_pretrained` keeps it), so a
    student identical to its teacher has loss 0.

    With `prediction` (a caption-conditioned transformer, called inside its
    `caption_conditioning` by `dit_prune.pruning.caption_recovery`), x_t, the time range and the
    model's time input follow the scheduler's prediction type (t is the time index k, larger =
    noisier; flow matching: σ_k), labels are caption labels and the null label is the model's
    (`models.null_label`); otherwise the project's DDPM schedule and a class-conditional DiT.
    """
    if prediction is None:
        _require_class_conditional(student)
    check_fits_model(images, labels, student, "recovery images")
    disable_block_label_dropout(student)
    if prediction is not None:
        num_train_timesteps = prediction.num_train_timesteps
    config = RecoveryConfig(steps=steps, lr=lr, batch_size=batch_size, t_min=t_min,
                            t_max=min(t_max, num_train_timesteps - 1), seed=seed)
    if labels is not None and len(labels) != len(images):
        raise DitPruneError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DitPruneError("no images to distill on")
    device = next(student.parameters()).device
    if prediction is None:
        alphas = noise_levels(num_train_timesteps, device)  # (T,)
        null = null_class(student)
    else:
        alphas = prediction.schedule.to(device)  # (T,) only its device is read then
        null = null_label(student)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc="distilling", disable=not progress)
    with student_training(student, teacher, config.lr, config.seed, bar) as (optimizer, gen):
        for _ in bar:
            loss = distill_loss(student, teacher, images, labels, alphas, null, config, gen,
                                prediction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(student.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)  # shown every step
    summary = asdict(config)
    summary.pop("ema_decay")  # a finetune option
    summary["num_images"] = len(images)
    summary["labelled"] = labels is not None
    return RecoveryResult(student, "distill", losses, time.perf_counter() - started, summary)


@contextmanager
def student_training(student: nn.Module, teacher: nn.Module, lr: float, seed: int,
                     bar: Any) -> Iterator[tuple[torch.optim.Optimizer, torch.Generator]]:
    """The student in training mode with an AdamW optimizer and a seeded generator, the teacher
    frozen in eval mode on the student's device; on exit (also on an error or an interrupt) the
    progress bar is closed, the student is back in eval mode and the teacher in its own mode."""
    teacher_was_training = teacher.training
    teacher.to(next(student.parameters()).device).eval()
    student.requires_grad_(True).train()
    try:
        yield (torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0),
               torch.Generator().manual_seed(seed))
    finally:
        bar.close()
        student.eval()
        teacher.train(teacher_was_training)


def noise_levels(num_train_timesteps: int, device: torch.device | str) -> torch.Tensor:
    """alpha-bar (T,) of the project's DDPM schedule (diffusers' defaults), on `device`."""
    import diffusers

    return diffusers.DDPMScheduler(
        num_train_timesteps=num_train_timesteps).alphas_cumprod.to(device)  # (T,)


def distill_loss(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                 labels: torch.Tensor | None, alphas: torch.Tensor, null: int,
                 config: RecoveryConfig, gen: torch.Generator,
                 prediction: Prediction | None = None) -> torch.Tensor:
    """One batch of the distillation loss: MSE between student and teacher outputs on
    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, x0 drawn from images (N, C, H, W) in [-1, 1],
    t uniform in [config.t_min, config.t_max], labels with dropout (or uniform when None).
    With `prediction`, x_t and the model's time input are the prediction type's
    (`Prediction.noisy`, `Prediction.model_time`; `alphas` then only gives the device).

    Draws from `gen` in a fixed order, so a seed fixes every batch. Returns a scalar with
    gradients to the student only (the teacher runs under no_grad).
    """
    device = alphas.device
    idx = torch.randint(len(images), (config.batch_size,), generator=gen)  # (B,)
    x0 = images[idx].to(device)  # (B, C, H, W)
    y = _draw_labels(labels, idx, null, config.label_dropout, gen).to(device)  # (B,)
    t = torch.randint(config.t_min, config.t_max + 1, (config.batch_size,),
                      generator=gen).to(device)  # (B,)
    noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, C, H, W)
    if prediction is None:
        a = alphas[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, C, H, W)
        time = t  # (B,)
    else:
        xt = prediction.noisy(x0, noise, t)  # (B, C, H, W)
        time = prediction.model_time(t)  # (B,) k, or σ_k·T for flow matching
    with torch.no_grad():
        target = teacher(xt, timestep=time, class_labels=y).sample  # (B, C', H, W)
    pred = student(xt, timestep=time, class_labels=y).sample  # (B, C', H, W)
    return F.mse_loss(pred, target)


def recover(
    method: str,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    teacher: nn.Module | None = None,
    **options: Any,
) -> RecoveryResult | None:
    """Run recovery `method` (one of RECOVERY_METHODS); None for 'none'.

    `options` are the keyword options of `finetune` or `distill` (steps, lr, t_min, ...);
    'adversarial' also takes `scheduler`, `targets`, `target_labels` and `config` (an
    AdversarialConfig; the other options are then ignored) or its fields.
    """
    if method not in RECOVERY_METHODS:
        raise DitPruneError(f"unknown recovery {method!r}; choose one of {RECOVERY_METHODS}")
    if method == "none":
        return None
    if method == "finetune":
        if labels is None:
            raise DitPruneError("fine-tuning needs labelled images")
        allowed = ("steps", "lr", "batch_size", "ema_decay", "seed", "num_train_timesteps",
                   "progress")
        return finetune(model, images, labels, **{k: v for k, v in options.items()
                                                   if k in allowed})
    if teacher is None:
        raise DitPruneError(f"{method} recovery needs the unpruned teacher model")
    if method == "adversarial":
        from dit_prune.pruning.adversarial import (
            ADVERSARIAL_OPTIONS,
            AdversarialConfig,
            adversarial,
        )

        missing = [k for k in ("scheduler", "targets", "target_labels") if options.get(k) is None]
        if missing:
            raise DitPruneError(f"adversarial recovery needs {missing[0]!r} (the copied images "
                                "to re-trigger and the noise scheduler)")
        config = options.get("config") or AdversarialConfig(
            **{k: v for k, v in options.items() if k in ADVERSARIAL_OPTIONS})
        return adversarial(model, teacher, options["scheduler"], images, labels,
                           options["targets"], options["target_labels"], config,
                           progress=options.get("progress", True))
    allowed = ("steps", "lr", "batch_size", "t_min", "t_max", "seed", "num_train_timesteps",
               "progress")
    return distill(model, teacher, images, labels,
                   **{k: v for k, v in options.items() if k in allowed})


def _draw_labels(
    labels: torch.Tensor | None,
    idx: torch.Tensor,
    null: int,
    dropout: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Given labels with dropout to the null class, or uniform labels (null included)."""
    if labels is None:
        return torch.randint(null + 1, (len(idx),), generator=gen)  # (B,)
    y = labels[idx].clone()  # (B,)
    drop = torch.rand(len(idx), generator=gen) < dropout  # (B,)
    return torch.where(drop, torch.full_like(y, null), y)  # (B,)


def _require_class_conditional(model: nn.Module) -> None:
    if family_name(model) != "DiTTransformer2DModel":
        raise DitPruneError(
            f"recovery supports class-conditional DiTs only, not {type(model).__name__}"
        )


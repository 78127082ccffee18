"""Re-trigger success: can noise optimisation make a model copy a given image again?

After Kowalczuk et al. 2025 ("Finding Dori: memorization in text-to-image diffusion models is
less local than assumed"): pruning-based mitigation makes copies rarer from random seeds, but an
attacker who optimises the model's input can often bring the memorized images back. Here the
input is the initial noise of a class-conditional DiT: it is optimised with Adam for K steps,
through a differentiable DDIM sampler of S steps conditioned on the target's class, so that the
sample matches the target (MSE), with a penalty keeping the noise's mean near 0 and std near 1.
The sampler follows the scheduler's prediction type (DDIM reads ε or v from its config; a
flow-matching scheduler keeps its own Euler steps on the velocity), a text-to-image model is
conditioned on the target's caption (labels inside `caption_conditioning`), and a latent
model's samples are decoded by its VAE (differentiably) before they are compared.

A target is re-triggered when both hold:
  * its sample's nearest reference image (pixel L2; references = the training images plus the
    held-out targets) is the target (ties count: a duplicated training image is its own copy);
  * the copy detector's cosine similarity between the sample and the target is >= tau.

Targets are copied training images and the same number of held-out images the model never saw;
the held-out success is the floor, what noise optimisation reaches without memorization.

Example:
    >>> from dit_prune.models import new_dit
    >>> from diffusers import DDPMScheduler
    >>> model = new_dit("tiny", 10, 8, 1).eval()
    >>> images = torch.rand(12, 1, 8, 8) * 2 - 1
    >>> labels = torch.arange(12) % 10
    >>> targets = choose_targets(images[:8], labels[:8], images[8:], labels[8:], count=2)
    >>> budget = AttackBudget(targets=2, attack_steps=1, ddim_steps=2)
    >>> result = attack_success(model, DDPMScheduler(), targets, budget,
    ...                         detector=None, threshold=0.5)  # no detector: nearest-only
    >>> result.success.shape
    torch.Size([4])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import bootstrap_interval
from dit_prune.models import null_label
from dit_prune.sampling import (
    image_token_count,
    initial_noise,
    make_sampling_scheduler,
    predict_noise,
)

Decoder = Callable[[torch.Tensor], torch.Tensor]  # model-space samples -> images in [-1, 1]

SEED_STRIDE = 10_000  # noise seed of target i under attack seed s: SEED_STRIDE * s + i


@dataclass(frozen=True)
class AttackBudget:
    """The fixed, stated budget of the attack (one seed; the same for every model compared).

    Example:
        >>> AttackBudget(attack_steps=-1)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: re-trigger attack steps must be an integer >= 0, got -1
    """

    targets: int = 10  # copied training targets (and as many held-out ones)
    # K Adam steps on the initial noise. 10, not more: at 40 steps the attack also reaches
    # held-out digits and the training digits of a model that copies nothing (floor 70-80% on
    # digits-duplicated and digits-generalized), so it no longer measures memorization
    # (docs/evaluator.md#re-trigger-success)
    attack_steps: int = 10
    ddim_steps: int = 8  # S steps of the differentiable DDIM sampler
    lr: float = 0.1
    prior_weight: float = 1.0  # weight of the penalty keeping the noise's mean 0 and std 1
    seed: int = 0
    # Adam learning rate of an offset added to the class embedding of every block (searched
    # with the noise, from 0); 0: the noise alone (the probe of `dit-prune run`)
    embedding_lr: float = 0.0

    def __post_init__(self) -> None:
        for name, low in (("targets", 1), ("attack_steps", 0), ("ddim_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DitPruneError(f"re-trigger {name.replace('_', ' ')} must be an integer "
                                    f">= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DitPruneError(f"re-trigger seed must be an integer, got {self.seed!r}")
        for name, positive in (("lr", True), ("prior_weight", False), ("embedding_lr", False)):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value) and (value > 0 if positive else value >= 0)
            if not ok:
                raise DitPruneError(f"re-trigger {name.replace('_', ' ')} must be a finite "
                                    f"number {'> 0' if positive else '>= 0'}, got {value!r}")

    def describe(self) -> str:
        """One phrase stating the budget, for reports."""
        embedding = f" and the class embedding (lr {self.embedding_lr:g})" \
            if self.embedding_lr else ""
        return (f"{self.attack_steps} Adam steps (lr {self.lr:g}, prior weight "
                f"{self.prior_weight:g}) on the initial noise{embedding} through "
                f"{self.ddim_steps} DDIM steps, seed {self.seed}")


@dataclass(frozen=True)
class RetriggerTargets:
    """What is attacked: T copied training images, then T' held-out ones, and the references."""

    images: torch.Tensor  # (T + T', C, H, W) in [-1, 1]
    labels: torch.Tensor | None  # (T + T',) class of each target; None: the null class
    reference_index: torch.Tensor  # (T + T',) position of each target in `reference`
    reference: torch.Tensor  # (M + T', C, H, W): training images, then the held-out targets
    heldout: torch.Tensor  # (T + T',) bool: a held-out target (the floor)
    heldout_index: torch.Tensor  # (T',) positions of the held-out targets in the held-out set


@dataclass(frozen=True)
class RetriggerResult:
    """Per-target outcome of one attack on one model."""

    success: torch.Tensor  # (T + T',) bool
    heldout: torch.Tensor  # (T + T',) bool
    mse: torch.Tensor  # (T + T',) final MSE between sample and target
    samples: torch.Tensor  # (T + T', C, H, W) in [-1, 1]

    def metrics(self, seed: int = 0) -> dict[str, Any]:
        """retrigger_rate / _interval (training targets, bootstrap over targets) and
        retrigger_floor / _floor_interval (held-out targets)."""
        train, held = self.success[~self.heldout], self.success[self.heldout]  # (T,), (T',)
        return {
            "retrigger_rate": float(train.float().mean()),
            "retrigger_interval": list(bootstrap_interval(train.float(), seed=seed)),
            "retrigger_floor": float(held.float().mean()),
            "retrigger_floor_interval": list(bootstrap_interval(held.float(), seed=seed)),
            "retrigger_mse": float(self.mse[~self.heldout].mean()),
            "retrigger_floor_mse": float(self.mse[self.heldout].mean()),
        }


def choose_targets(train: torch.Tensor, train_labels: torch.Tensor | None,
                   heldout: torch.Tensor, heldout_labels: torch.Tensor | None, count: int,
                   positions: Sequence[int] | None = None, seed: int = 0) -> RetriggerTargets:
    """Up to `count` training targets (from `positions`, e.g. the duplicated images, else from
    the whole set), drawn by one seeded permutation, and as many held-out targets.

    train (M, C, H, W) and heldout (K, C, H, W) are in [-1, 1].
    """
    if count < 1:
        raise DitPruneError(f"re-trigger targets must be at least 1, got {count}")
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(train)) if positions is None else \
        torch.as_tensor(list(positions), dtype=torch.long)  # (P,)
    train_idx = pool[torch.randperm(len(pool), generator=gen)[:count]]  # (T,)
    held_idx = torch.randperm(len(heldout), generator=gen)[: len(train_idx)]  # (T',)
    if len(train_idx) == 0 or len(held_idx) == 0:
        raise DitPruneError("re-trigger needs at least one training and one held-out image")
    held_targets = heldout[held_idx]  # (T', C, H, W)
    labels = None
    if train_labels is not None and heldout_labels is not None:
        labels = torch.cat([train_labels[train_idx], heldout_labels[held_idx]])  # (T + T',)
    return RetriggerTargets(
        images=torch.cat([train[train_idx], held_targets]),  # (T + T', C, H, W)
        labels=labels,
        reference_index=torch.cat([train_idx, len(train) + torch.arange(len(held_idx))]),
        reference=torch.cat([train, held_targets]),  # (M + T', C, H, W)
        heldout=torch.cat([torch.zeros(len(train_idx), dtype=torch.bool),
                           torch.ones(len(held_idx), dtype=torch.bool)]),
        heldout_index=held_idx,
    )


def ddim_sample(model: nn.Module, scheduler: Any, z: torch.Tensor, labels: torch.Tensor,
                steps: int, decode: Decoder | None = None) -> torch.Tensor:
    """Differentiable deterministic sampling from noise z (B, c, h, w) to x0 in [-1, 1]: DDIM
    (eta 0) on an ε / v schedule, which `DDIMScheduler.step` reads through the scheduler's
    `prediction_type`; for flow matching the scheduler's own Euler steps on the predicted
    velocity (`make_sampling_scheduler`, with the dynamic shift of z's token count). `decode`
    maps the final model-space sample to images (a VAE decoder, differentiable); the result
    is (B, C, H, W), clamped to [-1, 1]."""
    sched = make_sampling_scheduler(scheduler, "ddim", steps,
                                    image_token_count(model, tuple(z.shape[1:])))
    x = z * getattr(sched, "init_noise_sigma", 1.0)  # (B, c, h, w)
    null = null_label(model)  # caption models: 0
    for t in sched.timesteps:
        out = predict_noise(model, x, t, labels, None, null)  # (B, c, h, w): ε, v or velocity
        x = sched.step(out, t, x, return_dict=False)[0]  # (B, c, h, w)
    if decode is not None:
        x = decode(x)  # (B, C, H, W)
    return x.clamp(-1, 1)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, its training flag restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """The model's parameters without `requires_grad` for the block, their flags restored
    afterwards (also on error). An attack differentiates with respect to its inputs alone:
    without parameter edges in the graph its backward pass is ~10% faster on a CPU, with the
    same gradients."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def label_tables(model: nn.Module) -> list[nn.Module]:
    """The class-label embedding tables of a class-conditional DiT (one per block), in order."""
    return [m for m in model.modules() if type(m).__name__ == "LabelEmbedding"]


@contextlib.contextmanager
def class_embedding_offsets(model: nn.Module,
                            offsets: torch.Tensor | None) -> Iterator[nn.Module]:
    """Add offsets[l] (B, D) to the output of the l-th label-embedding table for the block
    (offsets (L, B, D); None: nothing). The hooks are removed on exit, even on error."""
    if offsets is None:
        yield model
        return
    tables = label_tables(model)
    if len(tables) != len(offsets):
        raise DitPruneError(f"{len(offsets)} class-embedding offsets for {len(tables)} tables")

    def hook(index: int) -> Any:
        def add(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            if out.shape != offsets[index].shape:
                raise DitPruneError(f"class embedding {tuple(out.shape)} does not match its "
                                    f"offset {tuple(offsets[index].shape)}")
            return out + offsets[index]  # (B, D)
        return add

    handles = [table.register_forward_hook(hook(i)) for i, table in enumerate(tables)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def zero_offsets(model: nn.Module, batch: int, budget: AttackBudget) -> torch.Tensor | None:
    """Starting class-embedding offsets (L, B, D) of zeros, or None when the budget searches the
    noise alone or the model has no label tables."""
    tables = label_tables(model)
    if not budget.embedding_lr or not tables:
        return None
    weight = tables[0].embedding_table.weight  # (classes + 1, D)
    return torch.zeros(len(tables), batch, weight.shape[1], device=weight.device)


def optimise_noise(model: nn.Module, scheduler: Any, z: torch.Tensor, targets: torch.Tensor,
                   labels: torch.Tensor, budget: AttackBudget,
                   offsets: torch.Tensor | None = None, decode: Decoder | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """The attack's inner loop: `budget.attack_steps` Adam steps on the noise z (B, c, h, w),
    from the given z, so that the samples (`ddim_sample`, decoded by `decode` for a latent
    model) match targets (B, C, H, W) in [-1, 1]. With class-embedding `offsets` (L, B, D; see
    `zero_offsets`) they are searched too, with `budget.embedding_lr`.

    Returns the optimised noise (B, C, H, W) and offsets, detached, and the MSE after each step.
    Gradients are taken with respect to them alone; the model is left unchanged (and in its
    mode). Adversarial recovery (dit_prune.pruning.adversarial) calls it to warm-start attacks.
    """
    z = z.detach().clone().requires_grad_(True)  # (B, C, H, W)
    groups = [{"params": [z], "lr": budget.lr}]
    if offsets is not None:
        offsets = offsets.detach().clone().requires_grad_(True)  # (L, B, D)
        groups.append({"params": [offsets], "lr": budget.embedding_lr})
    optimizer = torch.optim.Adam(groups)
    searched = [z] if offsets is None else [z, offsets]
    losses: list[float] = []
    with evaluating(model), frozen_parameters(model):
        for _ in range(budget.attack_steps):
            with class_embedding_offsets(model, offsets):
                x0 = ddim_sample(model, scheduler, z, labels, budget.ddim_steps,
                                 decode)  # (B, C, H, W)
            fit = F.mse_loss(x0, targets)
            flat = z.flatten(1)  # (B, D)
            prior = (flat.mean(1).pow(2) + (flat.std(1) - 1).pow(2)).mean()
            grads = torch.autograd.grad(fit + budget.prior_weight * prior, searched)
            for tensor, grad in zip(searched, grads, strict=True):
                tensor.grad = grad
            optimizer.step()
            losses.append(float(fit.detach()))
    return z.detach(), None if offsets is None else offsets.detach(), losses


def attack(model: nn.Module, scheduler: Any, targets: torch.Tensor, labels: torch.Tensor,
           seeds: Sequence[int], budget: AttackBudget, decode: Decoder | None = None,
           shape: Sequence[int] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Optimise the initial noise (and, with `budget.embedding_lr`, the class embedding) so
    that the samples match targets (B, C, H, W) in [-1, 1]. A latent model gives `decode`
    (model-space samples -> images) and `shape`, the (c, h, w) of its noise; without them the
    noise has the targets' shape.

    Returns the final samples (B, C, H, W) and the MSE after each Adam step. Only the inputs are
    optimised: gradients are taken with respect to them alone, and the model is left unchanged.
    """
    device = targets.device
    noise_shape = tuple(int(v) for v in (shape or targets.shape[1:]))  # (c, h, w)
    z0 = initial_noise(list(seeds), noise_shape).to(device)  # (B, c, h, w)
    offsets = zero_offsets(model, len(targets), budget)  # (L, B, D) or None
    z, offsets, losses = optimise_noise(model, scheduler, z0, targets, labels, budget, offsets,
                                        decode)
    with evaluating(model), torch.no_grad(), class_embedding_offsets(model, offsets):
        final = ddim_sample(model, scheduler, z, labels, budget.ddim_steps,
                            decode)  # (B, C, H, W)
    return final, losses


def success(samples: torch.Tensor, reference_index: torch.Tensor, reference: torch.Tensor,
            detector: Any | None, threshold: float) -> torch.Tensor:
    """(B,) bool: the target is a nearest reference of its sample (pixel L2, ties included) and
    the detector's similarity between sample and target is >= threshold (no detector: the
    nearest-reference test alone)."""
    ref = reference.to(samples.device)
    dists = torch.cdist(samples.flatten(1), ref.flatten(1))  # (B, R)
    idx = reference_index.to(samples.device)  # (B,)
    nearest = dists.gather(1, idx[:, None])[:, 0] <= dists.min(1).values  # (B,)
    if detector is None:
        return nearest.cpu()
    with torch.no_grad():
        emb_s = detector.embed(samples)  # (B, E)
        emb_t = detector.embed(ref[idx])  # (B, E)
    sims = F.cosine_similarity(emb_s.float(), emb_t.float(), dim=1)  # (B,)
    return (nearest & (sims.to(nearest.device) >= threshold)).cpu()


def attack_success(model: nn.Module, scheduler: Any, targets: RetriggerTargets,
                   budget: AttackBudget, detector: Any | None, threshold: float,
                   device: torch.device | str | None = None, decode: Decoder | None = None,
                   shape: Sequence[int] | None = None) -> RetriggerResult:
    """Attack every target once with the budget's seed and judge the final samples (a latent
    model: `decode` and the noise `shape`, as in `attack`)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images = targets.images.to(device)  # (B, C, H, W)
    null = null_label(model)
    labels = targets.labels if targets.labels is not None else \
        torch.full((len(images),), null, dtype=torch.long)  # (B,)
    seeds = [SEED_STRIDE * budget.seed + i for i in range(len(images))]
    samples, _ = attack(model, scheduler, images, labels.to(device), seeds, budget, decode,
                        shape)
    ok = success(samples, targets.reference_index, targets.reference, detector, threshold)
    mse = (samples - images).pow(2).flatten(1).mean(1).cpu()  # (B,)
    return RetriggerResult(ok, targets.heldout.clone(), mse, samples.detach().cpu())

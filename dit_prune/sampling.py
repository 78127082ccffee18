"""Sampling with one random generator per image, so image i depends only on (model, label, seed).

Example:
    >>> from dit_prune.models import new_dit
    >>> import diffusers, torch
    >>> model = new_dit("tiny", 10, 8, 1).eval()
    >>> sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    >>> imgs = sample_images(model, sched, torch.tensor([3, 7]), [0, 1], steps=5, progress=False)
    >>> imgs.shape, bool(imgs.min() >= 0 and imgs.max() <= 1)
    (torch.Size([2, 1, 8, 8]), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import diffusers
import torch
from torch import nn
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError

SAMPLERS = ("ddim", "ddpm")


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded individually (as NVlabs/edm's StackedRandomGenerator)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Per-seed starting noise, (N, C, H, W), identical whatever the batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=g) for g in seed_generators(seeds)])


MAX_SEED = 2**63 - 1  # the largest seed a torch generator takes as a signed 64-bit integer
MAX_SEED_COUNT = 10_000_000  # seeds (images) per --seeds: a typo such as 0-99999999999 is refused
_SEEDS_FORMAT = "use e.g. '0-999' or '1,2,3'"


def seed_value(text: str | int, flag: str = "--seed") -> int:
    """One seed option (`--seed`): an integer in [0, MAX_SEED]; anything else is a one-line
    DitPruneError naming `flag`. Usable as an argparse `type` (the error becomes one line).

    Example:
        >>> seed_value("7")
        7
        >>> seed_value("-1")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: --seed -1: a seed is an integer in [0, 9223372036854775807]
    """
    try:
        value = int(str(text).strip())
    except ValueError:
        value = -1
    if isinstance(text, bool) or not 0 <= value <= MAX_SEED:
        raise DitPruneError(f"{flag} {text}: a seed is an integer in [0, {MAX_SEED}]")
    return value


def seed_option(text: str) -> int:
    """`seed_value` as an argparse `type`: a bad seed becomes argparse's one-line usage error."""
    import argparse

    try:
        return seed_value(text)
    except DitPruneError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def parse_seeds(text: str, flag: str = "") -> list[int]:
    """'0-999' -> [0..999]; '1,5,9' -> [1, 5, 9]; ranges and lists may be mixed.

    Seeds are distinct integers in [0, 2**63 - 1], at most MAX_SEED_COUNT of them; a negative,
    too large or repeated seed, an empty range ('9-0') or anything else is a one-line
    DitPruneError naming it. Every
    `--seeds` (eval, run, the scripts) goes through here, before any work starts; `flag`, when
    given, starts the message ('--seeds: ...').

    Example:
        >>> parse_seeds("0-3,7")
        [0, 1, 2, 3, 7]
        >>> parse_seeds("0-3,2", "--seeds")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: --seeds: seeds '0-3,2' repeat seed 2: each seed must \
appear once
    """
    prefix = f"{flag}: " if flag else ""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        start, dash, end = part.partition("-")
        if part.startswith("-") or end.startswith("-"):
            raise DitPruneError(f"{prefix}seed {part!r} of {text!r} is negative; seeds are "
                                f"integers in [0, 2**63 - 1 = {MAX_SEED}]")
        bounds = [_seed_bound(text, start, prefix)]
        if dash:
            bounds.append(_seed_bound(text, end, prefix))
        if bounds[-1] < bounds[0]:
            raise DitPruneError(f"{prefix}the range {part!r} of seeds {text!r} is empty (its end "
                                "is below its start)")
        if len(seeds) + bounds[-1] - bounds[0] + 1 > MAX_SEED_COUNT:  # before building it
            raise DitPruneError(f"{prefix}seeds {text!r} name more than {MAX_SEED_COUNT:,} "
                                "images, the most one command samples")
        seeds.extend(range(bounds[0], bounds[-1] + 1))
    if not seeds:
        raise DitPruneError(f"{prefix}no seeds in {text!r}: {_SEEDS_FORMAT}")
    if len(set(seeds)) != len(seeds):
        seen: set[int] = set()
        repeated = next(s for s in seeds if s in seen or seen.add(s))
        raise DitPruneError(f"{prefix}seeds {text!r} repeat seed {repeated}: each seed must "
                            "appear once")
    return seeds


def _seed_bound(text: str, word: str, prefix: str) -> int:
    """One seed (a range end) of `text`, checked to be an integer in [0, MAX_SEED]."""
    word = word.strip()
    if not word.isdigit() or not word.isascii():
        raise DitPruneError(f"{prefix}cannot parse seeds {text!r}: {_SEEDS_FORMAT}")
    value = int(word)
    if value > MAX_SEED:
        raise DitPruneError(f"{prefix}seed {value} of {text!r} is too large; seeds are "
                            f"integers in [0, 2**63 - 1 = {MAX_SEED}]")
    return value


def format_seeds(seeds: Sequence[int]) -> str:
    """Inverse of parse_seeds for contiguous ranges; a comma list otherwise."""
    seeds = list(seeds)
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def labels_for_seeds(seeds: Sequence[int], num_classes: int) -> torch.Tensor:
    """The class label of each seed's image: seed s gets class s mod num_classes, (N,) long.

    The one seed -> label rule of eval, run, the trainer's probe and the scorers, so a seed
    gives the same image everywhere; consecutive seeds cycle through the classes.

    Example:
        >>> labels_for_seeds([0, 1, 2, 3, 10, 13], 3).tolist()
        [0, 1, 2, 0, 1, 1]
    """
    if num_classes < 1:
        raise DitPruneError(f"labels need at least one class, got {num_classes}")
    return torch.tensor([int(s) % num_classes for s in seeds], dtype=torch.long)  # (N,)


def make_sampling_scheduler(scheduler: Any, sampler: str, steps: int,
                            image_tokens: int | None = None) -> Any:
    """A fresh DDIM or DDPM scheduler sharing the training noise schedule, set to `steps`.

    A flow-matching scheduler (`dit_prune.prediction.is_flow_scheduler`) is kept: a fresh copy
    of its own class (deterministic Euler, with its shift) whatever `sampler` says; swapping in
    DDIM would misread its sigmas as a DDPM schedule. One with dynamic shifting (Flux) needs
    `image_tokens`, the transformer's image sequence length, for its shift μ
    (`dynamic_shift_mu`); without it that is a one-line error. `steps` must be an integer in
    [1, the schedule's training steps].

    Example:
        >>> make_sampling_scheduler(diffusers.DDPMScheduler(), "ddim", 0)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: sampling steps must be an integer in [1, 1000] (the \
scheduler's training steps), got 0
    """
    if sampler not in SAMPLERS:
        raise DitPruneError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    check_steps(steps, scheduler)
    from dit_prune.prediction import is_flow_scheduler

    if is_flow_scheduler(scheduler):
        cls = type(scheduler)
    else:
        cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
    fresh = cls.from_config(scheduler.config)
    if getattr(fresh.config, "use_dynamic_shifting", False):
        if image_tokens is None:
            raise DitPruneError(f"{cls.__name__} uses dynamic shifting: its shift depends on the "
                                "image's token count, which this call does not give")
        fresh.set_timesteps(steps, mu=dynamic_shift_mu(fresh, image_tokens))
    else:
        fresh.set_timesteps(steps)
    return fresh


def dynamic_shift_mu(scheduler: Any, image_tokens: int) -> float:
    """The shift μ of a dynamic-shifting flow-matching scheduler for `image_tokens` image
    tokens: linear from `base_shift` at `base_image_seq_len` tokens to `max_shift` at
    `max_image_seq_len` (diffusers' `calculate_shift`, as `FluxPipeline` computes it).

    Example:
        >>> sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        >>> round(dynamic_shift_mu(sched, 256), 3), round(dynamic_shift_mu(sched, 4096), 3)
        (0.5, 1.15)
    """
    config = scheduler.config
    base_len = int(getattr(config, "base_image_seq_len", None) or 256)
    max_len = int(getattr(config, "max_image_seq_len", None) or 4096)
    base = float(getattr(config, "base_shift", None) or 0.5)
    top = float(getattr(config, "max_shift", None) or 1.15)
    slope = (top - base) / (max_len - base_len)
    return float(image_tokens) * slope + base - slope * base_len


def image_token_count(model: nn.Module, shape: Sequence[int]) -> int:
    """Image tokens of one (C, H, W) model input: (H / p)·(W / p) with the transformer's
    `patch_size` p (1 when it has none, e.g. Flux on its 2×2-packed model space)."""
    patch = int(getattr(model.config, "patch_size", None) or 1)
    return (int(shape[-2]) // patch) * (int(shape[-1]) // patch)


def model_timesteps(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """A sampler timestep as the transformer's `timestep` input, (B,): long for DDPM-style
    integer timesteps, float32 for flow matching's σ·T (which truncating would change)."""
    value = float(t)
    if value == int(value):
        return torch.full((batch,), int(value), device=device, dtype=torch.long)  # (B,)
    return torch.full((batch,), value, device=device, dtype=torch.float32)  # (B,)


def check_steps(steps: Any, scheduler: Any, name: str = "sampling steps") -> None:
    """Raise a one-line error unless 1 <= steps <= the scheduler's training steps (an int);
    `name` is what the message calls the value (e.g. the option `--steps`)."""
    limit = int(scheduler.config.num_train_timesteps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise DitPruneError(f"{name} must be an integer in [1, {limit}] (the scheduler's "
                            f"training steps), got {steps!r}")


def check_guidance_scale(guidance_scale: Any, minimum: float | None = None,
                         name: str = "guidance scale") -> None:
    """Raise a one-line error unless the guidance scale is a finite number (and, with
    `minimum`, at least `minimum`). The commands (`dit-prune run`, `dit-prune eval`) ask for
    `minimum=1`: 1 is no guidance, and a scale below it pushes away from the class.

    Example:
        >>> check_guidance_scale(float("nan"))
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: guidance scale must be a finite number, got nan
        >>> check_guidance_scale(-1.0, minimum=1)
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: guidance scale must be a finite number >= 1, got -1.0
    """
    try:
        value = float(guidance_scale)
        finite = math.isfinite(value)
    except (TypeError, ValueError):
        value, finite = math.nan, False
    if not finite or isinstance(guidance_scale, bool) or \
            (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise DitPruneError(f"{name} must be a finite number{bound}, got {guidance_scale!r}")


@torch.no_grad()
def sample_images(
    model: nn.Module,
    scheduler: Any,
    labels: torch.Tensor | Sequence[int],
    seeds: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 1.0,
    sampler: str = "ddim",
    batch_size: int = 128,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Generate one image per (label, seed): (N, C, H, W) in [0, 1].

    `guidance_scale` > 1 uses classifier-free guidance against the model's own null class
    (index = number of classes; 0 for a transformer without a class count, whose labels are
    caption labels inside `caption_conditioning`). `decode` maps model-space samples to images
    in [-1, 1] (e.g. a VAE decoder for latent DiTs, `dit_prune.pipelines.vae.decode_latents`);
    pixel-space models need none. The returned shape is then the decoded images'. `shape` is the
    (C, H, W) of one model input (default: `in_channels` and `sample_size`; a transformer without
    a sample size, such as Flux on its 2×2-packed latents, needs it).
    """
    check_guidance_scale(guidance_scale)
    check_steps(steps, scheduler)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()  # (N,)
    seeds = [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise DitPruneError(
            f"{len(labels)} labels but {len(seeds)} seeds: need one of each per image")
    # the null label: the class count of a class-conditional DiT (PixArt: 1000), 0 for
    # transformers without one (SD3, Sana: caption labels, checked by `CaptionLabels`)
    num_classes = int(getattr(model.config, "num_embeds_ada_norm", None) or 0)
    if num_classes and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DitPruneError(
            f"labels must lie in [0, {num_classes - 1}], got [{labels.min()}, {labels.max()}]"
        )
    device = next(model.parameters()).device
    if shape is None:
        if not getattr(model.config, "sample_size", None):
            raise DitPruneError(f"{type(model).__name__} has no sample_size: pass the (C, H, W) "
                                "of its inputs")
        shape = (int(model.config.in_channels), int(model.config.sample_size),
                 int(model.config.sample_size))
    shape = tuple(int(v) for v in shape)
    out: list[torch.Tensor] = []
    bar = tqdm(total=len(seeds), desc=f"sampling ({sampler}, {steps} steps)", disable=not progress)
    for start in range(0, len(seeds), batch_size):
        batch_seeds = seeds[start : start + batch_size]
        batch_labels = labels[start : start + batch_size].to(device)  # (B,)
        x = _denoise(model, scheduler, batch_labels, batch_seeds, steps, guidance_scale, sampler,
                     shape, num_classes)  # (B, C, h, w)
        if decode is not None:
            x = decode(x)  # (B, C', H, W) in [-1, 1]
        out.append(((x.clamp(-1, 1) + 1) / 2).cpu())  # (B, C, H, W) in [0, 1]
        bar.update(len(batch_seeds))
    bar.close()
    if not out:
        return torch.empty(0, *shape)
    return torch.cat(out)


def _denoise(
    model: nn.Module,
    scheduler: Any,
    labels: torch.Tensor,
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    sampler: str,
    shape: tuple[int, int, int],
    null: int,
) -> torch.Tensor:
    device = labels.device
    sched = make_sampling_scheduler(scheduler, sampler, steps, image_token_count(model, shape))
    x = initial_noise(seeds, shape).to(device) * getattr(sched, "init_noise_sigma", 1.0)
    generators = seed_generators([s + 1_000_003 for s in seeds]) if sampler == "ddpm" else None
    guided = guidance_scale != 1.0
    for t in sched.timesteps:
        eps = predict_noise(model, x, t, labels, guidance_scale if guided else None, null)
        # a list of generators makes diffusers draw each image's step noise from its own one
        x = sched.step(eps, t, x, generator=generators, return_dict=False)[0]  # (B, C, h, w)
    return x


def predict_noise(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | int,
    labels: torch.Tensor,
    guidance_scale: float | None,
    null: int,
) -> torch.Tensor:
    """Epsilon prediction (first C channels when the model also learns sigma), with optional CFG.

    `x` goes in cast to the model's dtype (bf16/fp16 models work); the prediction comes back in
    `x`'s dtype, and guidance is combined in float32.
    """
    channels = x.shape[1]
    dtype = next(model.parameters()).dtype
    if guidance_scale is None:
        timesteps = model_timesteps(t, len(x), x.device)  # (B,)
        out = model(x.to(dtype), timestep=timesteps, class_labels=labels).sample  # (B, C', h, w)
        return out[:, :channels].to(x.dtype)  # (B, C, h, w)
    x_in = torch.cat([x, x]).to(dtype)  # (2B, C, h, w)
    labels_in = torch.cat([labels, torch.full_like(labels, null)])  # (2B,)
    timesteps = model_timesteps(t, len(x_in), x.device)  # (2B,)
    eps = model(x_in, timestep=timesteps, class_labels=labels_in).sample[:, :channels]
    eps_cond, eps_uncond = eps.float().chunk(2)  # (B, C, h, w) each
    return (eps_uncond + guidance_scale * (eps_cond - eps_uncond)).to(x.dtype)

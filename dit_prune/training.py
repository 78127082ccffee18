"""Train a class-conditional pixel- or latent-space DiT with the DDPM epsilon loss.

Labels are dropped to the null class once per example (for classifier-free guidance), an EMA of
the weights is kept and saved, accelerate handles devices (the same code runs under
`accelerate launch`), and a memorization probe runs every `probe_every` steps.

Example:
    >>> from dit_prune.data import digits_split
    >>> split = digits_split()
    >>> cfg = TrainConfig(steps=3, batch_size=8, probe_every=0)
    >>> result = train_dit(split.pool_images[:16], split.pool_labels[:16], cfg, progress=False)
    >>> len(result.losses)
    3
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import memorization_report
from dit_prune.models import new_dit, null_class
from dit_prune.sampling import labels_for_seeds, sample_images
from dit_prune.train_state import TrainState, load_train_state, save_train_state


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved with the checkpoint)."""

    size: str = "tiny"
    patch_size: int = 2
    steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    num_train_timesteps: int = 1000
    probe_every: int = 1000  # 0 disables the memorization probe
    probe_per_class: int = 10
    probe_steps: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.patch_size < 1:
            raise DitPruneError("steps, batch size and patch size must be positive")
        check_optimisation(self.lr, "label dropout", self.label_dropout, self.ema_decay)


def check_optimisation(lr: float, dropout_name: str, dropout: float, ema_decay: float) -> None:
    """One-line errors for a learning rate that is not a positive finite number, and for a
    conditioning dropout or EMA decay outside [0, 1); shared by the trainers' configs."""
    if not (math.isfinite(lr) and lr > 0):
        raise DitPruneError(f"learning rate must be a positive finite number, got {lr}")
    if not 0.0 <= dropout < 1.0:
        raise DitPruneError(f"{dropout_name} must lie in [0, 1), got {dropout}")
    if not 0.0 <= ema_decay < 1.0:
        raise DitPruneError(f"EMA decay must lie in [0, 1), got {ema_decay}")


@dataclass
class TrainResult:
    model: nn.Module  # the EMA weights, in eval mode
    scheduler: Any
    losses: list[float]
    probes: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def train_dit(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    num_classes: int | None = None,
    model: nn.Module | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """Train (or continue training `model`) on images (N, C, H, W) in [-1, 1] and labels (N,).

    With `state_dir`, the full training state is saved there every `checkpoint_every` steps (and
    at the end), and a state already there is resumed: the result equals an uninterrupted run's.
    """
    from accelerate import Accelerator

    if len(images) == 0:
        raise DitPruneError("no training images")
    if len(labels) != len(images):
        raise DitPruneError(f"{len(images)} images but {len(labels)} labels")
    num_classes = num_classes or int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DitPruneError(f"labels must lie in [0, {num_classes - 1}]")
    torch.manual_seed(config.seed)
    if model is None:
        model = new_dit(config.size, num_classes, images.shape[-1], images.shape[1],
                        config.patch_size)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=config.num_train_timesteps)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    data_gen = torch.Generator().manual_seed(config.seed)
    alphas = scheduler.alphas_cumprod.to(accelerator.device)  # (T,)
    null = null_class(accelerator.unwrap_model(model))
    losses: list[float] = []
    probes: list[dict[str, float]] = []
    start, seconds_before = 0, 0.0
    run_key = _run_key(images, labels, config, num_classes)
    raw_model = accelerator.unwrap_model(model)
    if state_dir is not None and (Path(state_dir) / "state.json").is_file():
        resumed = load_train_state(Path(state_dir), run_key, raw_model, ema, optimizer, data_gen)
        start, losses, probes = resumed.step, resumed.losses, resumed.probes
        seconds_before = resumed.seconds
    started = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="training", initial=start, total=config.steps,
               disable=not progress or not accelerator.is_main_process)
    model.train()
    for step in bar:
        idx = torch.randint(len(images), (config.batch_size,), generator=data_gen)  # (B,)
        x0 = images[idx].to(accelerator.device)  # (B, C, H, W)
        y = labels[idx].to(accelerator.device)  # (B,)
        drop = torch.rand(config.batch_size, generator=data_gen) < config.label_dropout  # (B,)
        y = torch.where(drop.to(y.device), torch.full_like(y, null), y)  # (B,)
        t = torch.randint(config.num_train_timesteps, (config.batch_size,), generator=data_gen)
        noise = torch.randn(x0.shape, generator=data_gen).to(x0.device)  # (B, C, H, W)
        a = alphas[t.to(x0.device)].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, C, H, W)
        pred = model(xt, timestep=t.to(x0.device), class_labels=y).sample[:, : x0.shape[1]]
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        _update_ema(ema, accelerator.unwrap_model(model), config.ema_decay, step)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if config.probe_every and (step + 1) % config.probe_every == 0 and \
                accelerator.is_main_process:
            probes.append(_probe(ema, scheduler, images, num_classes, config, step + 1))
            bar.write(f"step {step + 1}: probe memorization {probes[-1]['memorization_rate']:.2f}")
        done = step + 1
        if state_dir is not None and accelerator.is_main_process and (
                done == config.steps or (checkpoint_every and done % checkpoint_every == 0)):
            seconds = seconds_before + time.perf_counter() - started
            save_train_state(Path(state_dir), TrainState(done, losses, probes, run_key, seconds),
                             raw_model, ema, optimizer, data_gen)
    bar.close()
    return TrainResult(
        model=ema.cpu().eval(),
        scheduler=scheduler,
        losses=losses,
        probes=probes,
        seconds=seconds_before + time.perf_counter() - started,
        config=asdict(config),
    )


def _run_key(images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
             num_classes: int) -> str:
    """Digest of everything that determines the run: resuming under another key is refused."""
    digest = hashlib.sha256(json.dumps([asdict(config), num_classes], sort_keys=True).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA tracks the weights closely
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(d).add_(p.detach(), alpha=1 - d)


def _probe(ema: nn.Module, scheduler: Any, images: torch.Tensor, num_classes: int,
           config: TrainConfig, step: int) -> dict[str, float]:
    seeds = list(range(num_classes * config.probe_per_class))
    labels = labels_for_seeds(seeds, num_classes)  # (P,)
    samples = sample_images(ema, scheduler, labels, seeds, steps=config.probe_steps,
                            progress=False)  # (P, C, H, W) in [0, 1]
    unique = torch.unique(images, dim=0)  # duplicated images would hide their own copies (d2 = 0)
    report = memorization_report(samples * 2 - 1, unique)
    return {"step": step, "memorization_rate": report.rate, "num_samples": report.num_samples}

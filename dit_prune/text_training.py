"""Train a text-to-image DiT pipeline on (image, caption) rows with its scheduler's own loss.

The loss is the pipeline scheduler's prediction target (`dit_prune.prediction`: ε, v or flow
matching) at a time index drawn uniformly from [0, T). Captions are encoded once with the
pipeline's own `encode_prompt` and cached (the text encoder stays frozen); each example's
caption is replaced by the empty caption with probability `caption_dropout` (classifier-free
guidance, as PixArt trains). An EMA of the weights is kept and returned; the state is saved
every `checkpoint_every` steps and resumed exactly (`dit_prune.train_state`).

Example:
    >>> import torch
    >>> from dit_prune.pipelines.digits_text import digits_text_pipeline
    >>> from dit_prune.text_data import CaptionedImages
    >>> pipe = digits_text_pipeline(layers=1, heads=2, head_dim=8)
    >>> rows = CaptionedImages(torch.zeros(4, 1, 8, 8), ("a cat",) * 4)
    >>> result = train_text_pipeline(pipe, rows, TextTrainConfig(steps=2, batch_size=2),
    ...                              progress=False)
    >>> len(result.losses)
    2
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dit_prune.errors import DitPruneError
from dit_prune.pipelines.text_encoding import CaptionCache
from dit_prune.prediction import Prediction
from dit_prune.text_data import CaptionedImages
from dit_prune.train_state import TrainState, load_train_state, save_train_state
from dit_prune.training import check_optimisation


@dataclass
class TextTrainConfig:
    """Everything that determines a text-to-image training run (saved with the checkpoint)."""

    steps: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise DitPruneError("steps and batch size must be positive")
        check_optimisation(self.lr, "caption dropout", self.caption_dropout, self.ema_decay)


@dataclass
class TextTrainResult:
    pipeline: Any  # the pipeline with the EMA transformer, in eval mode
    losses: list[float]
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def train_text_pipeline(
    pipe: Any,
    rows: CaptionedImages,
    config: TextTrainConfig,
    progress: bool = True,
    state_dir: str | Path | None = None,
    checkpoint_every: int = 0,
) -> TextTrainResult:
    """Train `pipe.transformer` on `rows` (images in the transformer's input space, [-1, 1] for
    a pixel-space pipeline); returns the pipeline with the EMA weights in place.

    With `state_dir`, the training state is saved there every `checkpoint_every` steps (and at
    the end) and a state already there is resumed: the result equals an uninterrupted run's.
    """
    torch.manual_seed(config.seed)
    model = pipe.transformer
    device = next(model.parameters()).device
    prediction = Prediction.from_scheduler(pipe.scheduler)
    cache = CaptionCache.build(pipe, list(dict.fromkeys(rows.captions)))
    caption_rows = cache.rows(rows.captions).to(device)  # (N,)
    null_row = cache.null_row
    images = rows.images.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    start, seconds_before = 0, 0.0
    key = _run_key(rows, config, model)
    if state_dir is not None and (Path(state_dir) / "state.json").is_file():
        resumed = load_train_state(Path(state_dir), key, model, ema, optimizer, gen)
        start, losses, seconds_before = resumed.step, resumed.losses, resumed.seconds
    started = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="training", initial=start, total=config.steps,
               disable=not progress)
    model.train()
    steps_total = prediction.num_train_timesteps
    for step in bar:
        idx = torch.randint(len(images), (config.batch_size,), generator=gen)  # (B,)
        x0 = images[idx]  # (B, C, H, W)
        drop = torch.rand(config.batch_size, generator=gen) < config.caption_dropout  # (B,)
        crow = torch.where(drop.to(device), null_row, caption_rows[idx.to(device)])  # (B,)
        k = torch.randint(steps_total, (config.batch_size,), generator=gen).to(device)  # (B,)
        noise = torch.randn(x0.shape, generator=gen).to(device)  # (B, C, H, W)
        loss = denoising_loss(model, prediction, x0, noise, k, **cache.model_kwargs(crow))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        _update_ema(ema, model, config.ema_decay, step)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        done = step + 1
        if state_dir is not None and (done == config.steps or (
                checkpoint_every and done % checkpoint_every == 0)):
            seconds = seconds_before + time.perf_counter() - started
            save_train_state(Path(state_dir), TrainState(done, losses, [], key, seconds),
                             model, ema, optimizer, gen)
    bar.close()
    model.load_state_dict(ema.state_dict())
    model.eval()
    return TextTrainResult(pipe, losses, seconds_before + time.perf_counter() - started,
                           asdict(config))


def _run_key(rows: CaptionedImages, config: TextTrainConfig, model: Any) -> str:
    """Digest of the config, the model config and the data: resuming another run is refused.

    diffusers' private config keys (`_use_default_values`, a list in set order that changes
    from process to process) are left out, so a new process resumes the same run."""
    public = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    text = json.dumps([asdict(config), public, list(rows.captions)], sort_keys=True,
                      default=str)
    digest = hashlib.sha256(text.encode())
    digest.update(rows.images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def denoising_loss(model: torch.nn.Module, prediction: Prediction, x0: torch.Tensor,
                   noise: torch.Tensor, k: torch.Tensor, **conditioning: Any) -> torch.Tensor:
    """The scheduler's training loss of one batch: MSE between the model's output (its first C
    channels; a learned-variance model outputs 2C) on x_t = `prediction.noisy(x0, noise, k)` at
    time `prediction.model_time(k)` and `prediction.target(x0, noise, k)` (ε, v or ε − x0).
    x0 and noise (B, C, H, W), k (B,) time indices; `conditioning` goes to the model as is
    (caption kwargs, or `class_labels` inside `caption_conditioning`). A scalar."""
    out = model(prediction.noisy(x0, noise, k), timestep=prediction.model_time(k),
                **conditioning).sample  # (B, C', H, W)
    return F.mse_loss(out[:, : x0.shape[1]], prediction.target(x0, noise, k))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA tracks the weights closely
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(d).add_(p.detach(), alpha=1 - d)

"""Copy rate: cosine similarity to the nearest training image in a copy-detection embedding.

The ratio test (memorization.py) stops calling a copy a copy once pixel noise is added. A
copy-detection embedding (in the spirit of SSCD, Pizzi et al. 2022) is trained to map an image
and its noisy, blurred, shifted, re-contrasted versions to the same point, so a copy stays a
copy. A sample is a copy when its cosine similarity to its nearest training image is at least
tau, where tau is calibrated so that at least 99% of held-out real images fall strictly below it
(calibrated against the same training set: tau depends on the reference set).

All images, samples included, are passed on the training images' scale, [-1, 1] (as for
`memorization_report`); generated images in [0, 1] are mapped with `x * 2 - 1` first.

Detectors: our `digits-copydetect` directory (3 convs -> 64-d, L2-normalized, InfoNCE), or a
user's TorchScript SSCD file (`load_copy_detector("sscd_disc_mixup.torchscript.pt")`).

Example:
    >>> det = load_copy_detector("checkpoints/digits-copydetect")  # doctest: +SKIP
    >>> rep = copy_report(samples, train, det, heldout_images=heldout)  # doctest: +SKIP
    >>> rep.rate, rep.interval, rep.threshold  # doctest: +SKIP
    (0.62, (0.59, 0.65), 0.87)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dit_prune.checkpoint import file_sha256
from dit_prune.data import check_images
from dit_prune.errors import DitPruneError
from dit_prune.metrics.augment import copy_views, random_shift
from dit_prune.metrics.features import load_torchscript
from dit_prune.metrics.memorization import DEFAULT_CHUNK_ELEMENTS, bootstrap_interval
from dit_prune.metrics.netio import (
    apply_batched,
    device_of,
    load_net_dir,
    load_state_strict,
    save_net_dir,
    torch_threads,
    weights_fingerprint,
)

COPYDETECT_KIND = "digits-copydetect"
CALIBRATION_QUANTILE = 0.99
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CopyNet(nn.Module):
    """3 convs -> linear (+ a linear map of the raw pixels) -> L2-normalized embedding.

    For 1x8x8 images in [-1, 1]. The pixel path lets the embedding keep exact pixel identity
    where the conv path has learned invariances.
    """

    def __init__(self, embed_dim: int = 64, width: int = 32, pixel_skip: bool = True) -> None:
        super().__init__()
        self.skip = nn.Linear(64, embed_dim, bias=False) if pixel_skip else None
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),  # (N, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # (N, 2w, 4, 4)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),  # (N, 2w, 4, 4)
            nn.Flatten(),  # (N, 32w)
            nn.Linear(32 * width, embed_dim),  # (N, E)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.body(x)  # (N, E)
        if self.skip is not None:
            z = z + self.skip(x.flatten(1))  # (N, E)
        return F.normalize(z, dim=1)  # (N, E), unit norm


@dataclass
class CopyDetector:
    """An embedding for copy detection; `embed` returns unit vectors (N, E)."""

    module: nn.Module
    name: str
    fingerprint: str
    input_shape: tuple[int, int, int] | None = None  # (C, H, W) it requires, if fixed
    default_threshold: float | None = None  # tau from the detector's own calibration, if any
    config: dict[str, Any] = field(default_factory=dict)
    resize: int | None = None  # TorchScript SSCD: resize to this side, ImageNet-normalize

    def to(self, device: str | torch.device) -> CopyDetector:
        self.module.to(device)
        return self

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.resize is None:
            return F.normalize(self.module(batch.float()).float(), dim=1)  # (B, E)
        rgb = (batch.float() + 1) / 2  # (B, C, H, W) in [0, 1]
        if rgb.shape[1] == 1:
            rgb = rgb.repeat(1, 3, 1, 1)  # (B, 3, H, W)
        rgb = F.interpolate(rgb, size=(self.resize, self.resize), mode="bilinear",
                            align_corners=False)  # (B, 3, S, S)
        mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=rgb.device).view(1, 3, 1, 1)
        out = self.module((rgb - mean) / std).float()  # (B, E)
        return F.normalize(out.reshape(len(batch), -1), dim=1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (N, E) of images in [-1, 1]."""
        if self.input_shape is not None and tuple(images.shape[1:]) != self.input_shape:
            raise DitPruneError(
                f"copy detector {self.name} takes {self.input_shape} images, got "
                f"{tuple(images.shape[1:])}: pass --copy-detector PATH to a TorchScript SSCD model"
            )
        self.module.eval()
        try:
            return apply_batched(self._run, images, device_of(self.module), batch_size=256)
        except (RuntimeError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DitPruneError(f"copy detector {self.name} failed on the images: {first}"
                                ) from None


def load_copy_detector(path: str | Path, device: str | torch.device = "cpu",
                       resize: int = 288) -> CopyDetector:
    """Our `digits-copydetect` directory, or a TorchScript SSCD file (inputs resized to `resize`).

    Example:
        >>> load_copy_detector("/nonexistent/sscd.pt")
        Traceback (most recent call last):
        ...
        dit_prune.errors.DitPruneError: copy detector not found: /nonexistent/sscd.pt ...
    """
    source = Path(path)
    if source.is_dir():
        state, config = load_net_dir(source, COPYDETECT_KIND)
        arch = config.get("architecture", {})
        net = CopyNet(int(arch.get("embed_dim", 64)), int(arch.get("width", 32)),
                      bool(arch.get("pixel_skip", False)))
        load_state_strict(net, state, source)
        tau = config.get("calibration", {}).get("threshold")
        return CopyDetector(net.eval(), config.get("name", "digits-copydetect"),
                            weights_fingerprint(net), (1, 8, 8),
                            float(tau) if tau is not None else None, config).to(device)
    if not source.is_file():
        raise DitPruneError(
            f"copy detector not found: {source} (nothing is downloaded; use a digits-copydetect "
            f"directory, or put a TorchScript SSCD model such as sscd_disc_mixup.torchscript.pt "
            f"at that path)"
        )
    module = load_torchscript(source, "copy detector")
    return CopyDetector(module, source.stem, file_sha256(source)[:16], None, None,
                        {"source": str(source)}, resize).to(device)


@dataclass(frozen=True)
class CopyReport:
    """Per-sample copy detection and the copy rate with a bootstrap 95% interval."""

    rate: float
    interval: tuple[float, float]
    num_samples: int
    similarities: torch.Tensor  # (N,) cosine similarity to the nearest training image
    nearest: torch.Tensor  # (N,) index of that training image
    copies: torch.Tensor  # (N,) bool, similarity >= threshold
    threshold: float
    threshold_source: str  # "given" or "held-out (K images)"
    heldout_similarities: torch.Tensor | None = field(default=None, repr=False)  # (K,)

    @property
    def heldout_false_copy_rate(self) -> float | None:
        """Fraction of held-out real images at or above the threshold (<= 1% by calibration)."""
        if self.heldout_similarities is None:
            return None
        return float((self.heldout_similarities >= self.threshold).double().mean())

    def most_copied(self, top: int = 10) -> list[tuple[int, int]]:
        """(training index, number of samples that are copies of it), most copied first."""
        counts = Counter(self.nearest[self.copies].tolist())
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]

    def summary(self) -> dict[str, object]:
        return {"copy_rate": self.rate, "copy_interval": list(self.interval),
                "copy_threshold": self.threshold, "threshold_source": self.threshold_source,
                "heldout_false_copy_rate": self.heldout_false_copy_rate,
                "most_copied": self.most_copied()}


def nearest_cosine(
    queries: torch.Tensor, refs: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest cosine similarity (N,) of unit vectors `queries` (N, E) to `refs` (M, E), and index.

    Chunked over queries so one similarity block holds at most `chunk_elements` entries. The
    matmul picks the two best candidates; their similarities are recomputed directly,
    `(q * r).sum()`, and the higher wins (ties: the lower index), so the result does not depend
    on block shapes (`dit_prune.store.search.store_nearest_cosine` gives the same bits).
    """
    rows = max(1, chunk_elements // max(1, len(refs)))
    k = min(2, len(refs))
    sims, idx = [], []
    for i in range(0, len(queries), rows):
        block = queries[i : i + rows]  # (r, E)
        cand = (block @ refs.T).topk(k, dim=1).indices  # (r, k)
        exact = torch.stack([(block * refs[cand[:, j]]).sum(dim=1) for j in range(k)], 1)
        second = (exact[:, -1] > exact[:, 0]) | (
            (exact[:, -1] == exact[:, 0]) & (cand[:, -1] < cand[:, 0]))  # (r,)
        sims.append(torch.where(second, exact[:, -1], exact[:, 0]))
        idx.append(torch.where(second, cand[:, -1], cand[:, 0]))
    return torch.cat(sims), torch.cat(idx)


MIN_CALIBRATION_IMAGES = 100  # below this the 99th percentile is the held-out maximum


def calibration_warning(num_heldout: int, quantile: float = CALIBRATION_QUANTILE) -> str | None:
    """The warning text when tau is calibrated on too few held-out images to mean a percentile:
    with fewer than `MIN_CALIBRATION_IMAGES` (100), the 99th percentile is the largest held-out
    similarity, so one image sets tau and the held-out false-copy rate is 0 by construction.

    Example:
        >>> calibration_warning(1000) is None
        True
        >>> calibration_warning(12).split(":")[0]
        'copy threshold τ calibrated on only 12 held-out images'
    """
    if num_heldout >= MIN_CALIBRATION_IMAGES:
        return None
    return (f"copy threshold τ calibrated on only {num_heldout} held-out images: with fewer than "
            f"{MIN_CALIBRATION_IMAGES}, the {100 * quantile:g}th percentile is their maximum "
            "(one image sets τ, and the held-out false-copy rate is 0 by construction); copy "
            "rates depend on that one image. Use at least 100 (ideally >= 1,000) held-out images")


def calibrate_threshold(heldout_similarities: torch.Tensor,
                        quantile: float = CALIBRATION_QUANTILE) -> float:
    """tau: the smallest float32 above the ceil(q*K)-th smallest held-out similarity.

    So at least a fraction q of held-out images lie strictly below tau.

    Example:
        >>> sims = torch.arange(100, dtype=torch.float32) / 100  # 0.00 .. 0.99
        >>> tau = calibrate_threshold(sims)
        >>> int((sims < tau).sum()), int((sims >= tau).sum())
        (99, 1)
    """
    values = heldout_similarities.float().flatten().sort().values  # (K,)
    if len(values) == 0:
        raise DitPruneError("no held-out images to calibrate the copy threshold on")
    k = min(len(values), max(1, math.ceil(quantile * len(values) - 1e-9)))
    return float(torch.nextafter(values[k - 1], torch.tensor(math.inf)))


def copy_report(
    samples: torch.Tensor,
    train_images: torch.Tensor,
    detector: CopyDetector,
    heldout_images: torch.Tensor | None = None,
    threshold: float | None = None,
    seed: int = 0,
    train_embeddings: torch.Tensor | None = None,
) -> CopyReport:
    """Copy rate of `samples` against `train_images`; all images in [-1, 1], same (C, H, W).

    tau: `threshold` when given; else calibrated on `heldout_images` against these training
    images. Without either it is refused: a detector's stored tau was calibrated on another
    reference set, and tau depends on the reference set. `train_embeddings` (M, E) may be passed
    to skip re-embedding the training set. Integer, out-of-range or non-finite images are
    one-line DitPruneErrors naming the argument.

    Example:
        >>> rep = copy_report(train[:5], train, det, heldout_images=held)  # doctest: +SKIP
        >>> rep.rate  # doctest: +SKIP
        1.0
    """
    check_images(train_images, "train_images")
    if len(train_images) < 1:
        raise DitPruneError("the copy rate needs at least 1 training image")
    shape = tuple(train_images.shape[1:])
    check_images(samples, "samples", shape)
    if heldout_images is not None:
        check_images(heldout_images, "heldout_images", shape)
    if threshold is not None and not math.isfinite(float(threshold)):
        raise DitPruneError(f"threshold must be a finite number, got {threshold!r}")
    if threshold is None and heldout_images is None:
        stored = ("" if detector.default_threshold is None else
                  f" ({detector.name}'s stored tau {detector.default_threshold:.4f} was "
                  "calibrated on another reference set)")
        raise DitPruneError("copy_report needs heldout_images (to calibrate tau against these "
                            f"training images) or an explicit threshold{stored}")
    train_emb = detector.embed(train_images) if train_embeddings is None else train_embeddings
    sims, nearest = nearest_cosine(detector.embed(samples), train_emb)  # (N,), (N,)
    held_sims = None
    if heldout_images is not None:
        held_sims, _ = nearest_cosine(detector.embed(heldout_images), train_emb)  # (K,)
    return report_from_similarities(sims, nearest, held_sims, threshold, seed)


def report_from_similarities(sims: torch.Tensor, nearest: torch.Tensor,
                             held_sims: torch.Tensor | None, threshold: float | None,
                             seed: int = 0) -> CopyReport:
    """Copies among samples with nearest-training similarities `sims` (N,) at tau: `threshold`
    when given, else calibrated on the held-out images' similarities `held_sims` (K,)."""
    if threshold is not None:
        tau, source = float(threshold), "given"
    else:
        tau, source = calibrate_threshold(held_sims), f"held-out ({len(held_sims)} images)"
    copies = sims >= tau  # (N,)
    return CopyReport(
        rate=float(copies.double().mean()) if len(copies) else float("nan"),
        interval=bootstrap_interval(copies, seed=seed),
        num_samples=len(sims),
        similarities=sims,
        nearest=nearest,
        copies=copies,
        threshold=tau,
        threshold_source=source,
        heldout_similarities=held_sims,
    )


@dataclass(frozen=True)
class CopyTrainConfig:
    """Everything that determines a digits-copydetect training run."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    temperature: float = 0.1
    max_noise: float = 0.3
    embed_dim: int = 64
    width: int = 32
    pixel_skip: bool = True
    noise_prob: float = 1.0  # probability that a heavy view gets Gaussian noise
    light_anchor: bool = True  # first view: the image itself or a 1 px shift (as references are)
    threads: int | None = 1  # one thread: bit-reproducible and leaves a core free


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (NT-Xent) of two batches of unit vectors (B, E); row i of a pairs b's i."""
    z = torch.cat([a, b])  # (2B, E)
    logits = z @ z.T / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])  # (2B,)
    return F.cross_entropy(logits, target)


def make_views(x: torch.Tensor, gen: torch.Generator, config: CopyTrainConfig) -> torch.Tensor:
    """Anchors (light: unchanged or shifted 1 px, like clean training references; or heavy)
    followed by heavy "still a copy" views of the same images: (2B, C, H, W)."""
    heavy = copy_views(x, gen, config.max_noise, config.noise_prob)  # (B, C, H, W)
    if not config.light_anchor:
        return torch.cat([copy_views(x, gen, config.max_noise, config.noise_prob), heavy])
    keep = torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5  # (B, 1, 1, 1)
    anchors = torch.where(keep, x, random_shift(x, gen))  # (B, C, H, W)
    return torch.cat([anchors, heavy])


def train_copy_detector(
    images: torch.Tensor, config: CopyTrainConfig = CopyTrainConfig(), progress: bool = True
) -> tuple[CopyNet, dict[str, Any]]:
    """Contrastive training on images (N, 1, 8, 8) in [-1, 1] (the whole pool, training images
    included); two augmented views per image, distinct images per batch. Deterministic by seed.

    Example:
        >>> from dit_prune.data import digits_split
        >>> net, info = train_copy_detector(digits_split().pool_images[:64],
        ...                                 CopyTrainConfig(steps=2, batch_size=32), progress=False)
        >>> net(torch.zeros(3, 1, 8, 8)).norm(dim=1).tolist()
        [1.0, 1.0, 1.0]
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise DitPruneError(f"digits-copydetect trains on (N, 1, 8, 8) images, got "
                            f"{tuple(images.shape)}")
    batch = min(config.batch_size, len(images))
    started = time.perf_counter()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), torch_threads(config.threads):
        torch.manual_seed(config.seed)
        net = CopyNet(config.embed_dim, config.width, config.pixel_skip)
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr,
                                                    total_steps=config.steps)
        net.train()
        bar = tqdm(range(config.steps), desc="training digits-copydetect", disable=not progress)
        for step in bar:
            idx = torch.randperm(len(images), generator=gen)[:batch]  # (B,) distinct images
            x = images[idx].float()  # (B, 1, 8, 8)
            views = make_views(x, gen, config)  # (2B, 1, 8, 8): B anchors, then B positives
            za, zb = net(views).chunk(2)  # (B, E) each
            loss = info_nce(za, zb, config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step % 100 == 0:
                bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.3f}")
    net.eval()
    return net, {"train_seconds": round(time.perf_counter() - started, 1),
                 "final_loss_mean_last_100": round(sum(losses[-100:]) / len(losses[-100:]), 4)}


def save_copy_detector(
    net: CopyNet, path: str | Path, extra: dict[str, Any] | None = None,
    model_card: str | None = None, overwrite: bool = False,
) -> Path:
    """Write a `digits-copydetect` directory: weights, config (architecture + `extra`), card."""
    config = {
        "kind": COPYDETECT_KIND,
        "name": "digits-copydetect",
        "architecture": {"embed_dim": int(net.body[-1].out_features),
                         "width": int(net.body[0].out_channels),
                         "pixel_skip": net.skip is not None},
        "input": "(N, 1, 8, 8) float in [-1, 1]; output L2-normalized",
        "fingerprint": weights_fingerprint(net),
        **(extra or {}),
    }
    files = {"MODEL_CARD.md": model_card} if model_card else None
    return save_net_dir(net, config, path, overwrite, files)

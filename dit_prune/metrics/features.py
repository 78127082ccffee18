"""Feature extractors for Fréchet distance, precision/recall and class agreement.

Two kinds, both exposing `name`, `feature_dim`, `fingerprint` and `features(images)` on images in
[-1, 1], (N, C, H, W) -> (N, D) float32 (integer, out-of-range or non-finite images are one-line
`DitPruneError`s):

* `digitsnet`: a small CNN classifier trained on the 1,000-image digits pool (ships in
  `checkpoints/digits-features`); its penultimate 64-d activations are the FD features and its
  labels give class agreement (`predict`).
* a user's TorchScript network, e.g. NVIDIA's `inception-2015-12-05.pt` (named `inception`,
  giving standard FID: 2048-d pool features, uint8 RGB input, resized inside the network);
  any other TorchScript file is named after its file stem and receives float RGB in [0, 1].

Nothing is downloaded; `torch.jit.load` runs only on a file the user points to.

Example:
    >>> extractor = load_feature_extractor("checkpoints/digits-features")  # doctest: +SKIP
    >>> extractor.name, extractor.features(torch.zeros(2, 1, 8, 8)).shape  # doctest: +SKIP
    ('digitsnet', torch.Size([2, 64]))
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dit_prune.checkpoint import file_sha256
from dit_prune.data import check_images
from dit_prune.errors import DitPruneError
from dit_prune.metrics.augment import random_shift
from dit_prune.metrics.netio import (
    apply_batched,
    device_of,
    load_net_dir,
    load_state_strict,
    save_net_dir,
    torch_threads,
    weights_fingerprint,
)

FEATURES_KIND = "digits-features"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)


class FeatureExtractor(Protocol):
    """What the evaluator needs from a feature network."""

    name: str  # used in reports: FD_<name>
    feature_dim: int
    fingerprint: str  # identifies the weights (part of the reference-statistics cache key)

    def features(self, images: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, D)
        ...


class DigitsNet(nn.Module):
    """Small CNN for 1x8x8 digits in [-1, 1]: three convs -> 64-d features -> class logits."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 64, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),  # (N, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),  # (N, 2w, 8, 8)
            nn.MaxPool2d(2),  # (N, 2w, 4, 4)
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),  # (N, 2w, 4, 4)
            nn.MaxPool2d(2), nn.Flatten(),  # (N, 2w * 4)
            nn.Linear(8 * width, feature_dim), nn.ReLU(),  # (N, D)
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))  # (N, K)


@dataclass
class DigitsFeatureExtractor:
    """`digitsnet`: FD features and class predictions from a trained DigitsNet."""

    net: DigitsNet
    config: dict[str, Any]
    name: str = "digitsnet"

    def __post_init__(self) -> None:
        self.net.eval()
        self.feature_dim = int(self.net.head.in_features)
        self.num_classes = int(self.net.head.out_features)
        self.fingerprint = weights_fingerprint(self.net)

    def to(self, device: str | torch.device) -> DigitsFeatureExtractor:
        self.net.to(device)
        return self

    def _check(self, images: torch.Tensor) -> None:
        check_images(images, "images")  # float, finite, [-1, 1]
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise DitPruneError(
                f"the digitsnet feature network takes (N, 1, 8, 8) digits, got "
                f"{tuple(images.shape)}: pass --features PATH to a TorchScript network"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, (N, 64), of images in [-1, 1]."""
        self._check(images)
        return apply_batched(self.net.embed, images.float(), device_of(self.net))  # (N, D)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class labels (N,) int64 of images in [-1, 1]."""
        self._check(images)
        logits = apply_batched(self.net, images.float(), device_of(self.net))  # (N, K)
        return logits.argmax(1)


@dataclass
class TorchScriptFeatureExtractor:
    """A user's TorchScript feature network; `inception` when it is NVIDIA's Inception-v3."""

    module: torch.jit.ScriptModule
    name: str
    fingerprint: str
    feature_dim: int = 0  # filled in on first use

    @property
    def is_inception(self) -> bool:
        return self.name == "inception"

    def to(self, device: str | torch.device) -> TorchScriptFeatureExtractor:
        self.module.to(device)
        return self

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        rgb = batch.float().clamp(-1, 1)
        if rgb.shape[1] == 1:
            rgb = rgb.repeat(1, 3, 1, 1)  # (B, 3, H, W) grey -> RGB
        if self.is_inception:
            # NVIDIA's network takes uint8 RGB and resizes to 299 itself
            pixels = ((rgb + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
            out = self.module(pixels, return_features=True)  # (B, 2048)
        else:
            out = self.module((rgb + 1) / 2)  # (B, D)
        return out.reshape(len(batch), -1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) features of images in [-1, 1] (grey images are repeated to RGB)."""
        check_images(images, "images")  # float, finite, [-1, 1]
        if images.shape[1] not in (1, 3):
            raise DitPruneError(f"{self.name}: expected (N, 1 or 3, H, W) images, "
                                f"got {tuple(images.shape)}")
        device = device_of(self.module)
        try:
            feats = apply_batched(self._run, images, device, batch_size=64)  # (N, D)
        except (RuntimeError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DitPruneError(f"feature network {self.name} failed on the images: {first}"
                                ) from None
        self.feature_dim = int(feats.shape[1])
        return feats


def load_feature_extractor(
    path: str | Path, device: str | torch.device = "cpu"
) -> DigitsFeatureExtractor | TorchScriptFeatureExtractor:
    """A `digits-features` directory or a TorchScript file -> a feature extractor on `device`."""
    source = Path(path)
    if source.is_dir():
        return load_digits_features(source).to(device)
    if not source.is_file():
        raise DitPruneError(
            f"feature network not found: {source} (nothing is downloaded; for standard FID fetch "
            f"{INCEPTION_FILE} from {INCEPTION_URL} on a connected machine and put it at {source},"
            f" or use a digits-features directory)"
        )
    module = load_torchscript(source, "feature network")
    name = "inception" if "inception" in source.stem.lower() else source.stem
    return TorchScriptFeatureExtractor(module, name, file_sha256(source)[:16]).to(device)


def load_torchscript(path: Path, what: str) -> torch.jit.ScriptModule:
    """torch.jit.load of a file the user named (CPU first), with a one-line error."""
    try:
        with warnings.catch_warnings():  # deprecated in favour of torch.export, still the format
            warnings.simplefilter("ignore", DeprecationWarning)  # NVIDIA and SSCD ship
            module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DitPruneError(f"{path} is not a TorchScript {what}: {first}") from None
    return module.eval()


def load_digits_features(path: str | Path) -> DigitsFeatureExtractor:
    """Load a `digits-features` directory (model.safetensors + config.json)."""
    state, config = load_net_dir(path, FEATURES_KIND)
    arch = config.get("architecture", {})
    net = DigitsNet(int(arch.get("num_classes", 10)), int(arch.get("feature_dim", 64)),
                    int(arch.get("width", 32)))
    load_state_strict(net, state, Path(path))
    return DigitsFeatureExtractor(net, config)


@dataclass(frozen=True)
class FeatureTrainConfig:
    """Everything that determines a digits-features training run."""

    seed: int = 0
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    feature_dim: int = 64
    width: int = 32
    threads: int | None = 1  # one thread: bit-reproducible and leaves a core free


def train_digits_features(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FeatureTrainConfig = FeatureTrainConfig(),
    progress: bool = True,
) -> tuple[DigitsNet, dict[str, Any]]:
    """Train a DigitsNet on images (N, 1, 8, 8) in [-1, 1] with ±1 px shift augmentation.

    Deterministic given `config.seed` (global RNG state is restored afterwards).
    Returns the net (eval mode) and a dict with the training time.

    Example:
        >>> from dit_prune.data import digits_split
        >>> s = digits_split()
        >>> cfg = FeatureTrainConfig(epochs=1)
        >>> net, info = train_digits_features(s.pool_images, s.pool_labels, cfg, progress=False)
        >>> net(s.heldout_images[:2]).shape
        torch.Size([2, 10])
    """
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8) or len(images) != len(labels):
        raise DitPruneError(f"digits-features trains on (N, 1, 8, 8) images with N labels, got "
                            f"{tuple(images.shape)} and {len(labels)} labels")
    num_classes = int(labels.max()) + 1
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch_threads(config.threads):
        torch.manual_seed(config.seed)
        net = DigitsNet(num_classes, config.feature_dim, config.width)
        gen = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = -(-len(images) // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
        net.train()
        for _ in tqdm(range(config.epochs), desc="training digits-features", disable=not progress):
            order = torch.randperm(len(images), generator=gen)  # (N,)
            for i in range(0, len(images), config.batch_size):
                idx = order[i : i + config.batch_size]
                x = random_shift(images[idx].float(), gen)  # (B, 1, 8, 8)
                loss = F.cross_entropy(net(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    net.eval()
    return net, {"train_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def accuracy(net: DigitsNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose predicted class equals `labels`."""
    return float((net.eval()(images.float()).argmax(1) == labels).float().mean())


def save_digits_features(
    net: DigitsNet, path: str | Path, extra: dict[str, Any] | None = None,
    model_card: str | None = None, overwrite: bool = False,
) -> Path:
    """Write a `digits-features` directory: weights, config (architecture + `extra`), card."""
    config = {
        "kind": FEATURES_KIND,
        "name": "digitsnet",
        "architecture": {"num_classes": int(net.head.out_features),
                         "feature_dim": int(net.head.in_features),
                         "width": int(net.body[0].out_channels)},
        "input": "(N, 1, 8, 8) float in [-1, 1]",
        "fingerprint": weights_fingerprint(net),
        **(extra or {}),
    }
    files = {"MODEL_CARD.md": model_card} if model_card else None
    return save_net_dir(net, config, path, overwrite, files)

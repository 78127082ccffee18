"""Shared fixtures: small models and the digits split, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO_ROOT / "checkpoints"


@pytest.fixture(scope="session")
def digits():
    from dit_prune.data import digits_split

    return digits_split()


@pytest.fixture()
def tiny_model():
    from dit_prune.models import new_dit

    torch.manual_seed(0)
    return new_dit("tiny", num_classes=10, sample_size=8, channels=1).eval()


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tiny models run fastest on one thread, and do not thrash when CPUs are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_untrained_checkpoint(path: Path) -> Path:
    """An untrained tiny DiT (seed 0, 10 classes, 8x8x1, DDPM 1000 steps) saved at `path`: enough
    for the CLI tests that only need a loadable checkpoint."""
    import diffusers

    from dit_prune.checkpoint import save_checkpoint
    from dit_prune.models import new_dit

    torch.manual_seed(0)
    save_checkpoint(new_dit("tiny", 10, 8, 1).eval(),
                    diffusers.DDPMScheduler(num_train_timesteps=1000), path)
    return path


def train_tiny_checkpoint(path: Path, digits, data_extra: dict | None = None) -> Path:
    """A DiT trained 30 steps on 20 balanced digits, saved at `path` with its training indices
    (and `data_extra` merged into its `dit_prune.json` "data"): the tiny model of the run tests."""
    from dit_prune.checkpoint import save_checkpoint
    from dit_prune.data import balanced_subset, indices_hash
    from dit_prune.training import TrainConfig, train_dit

    idx = balanced_subset(digits.pool_labels, 20, seed=0)
    result = train_dit(digits.pool_images[idx], digits.pool_labels[idx],
                       TrainConfig(steps=30, batch_size=20, probe_every=0), num_classes=10,
                       progress=False)
    save_checkpoint(result.model, result.scheduler, path, extra={"data": {
        "source": "digits", "pool_indices": idx.tolist(), "indices_sha256": indices_hash(idx),
        **(data_extra or {})}})
    return path

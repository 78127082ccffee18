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

"""Training: the loss goes down, and the same seed gives the same weights."""

from __future__ import annotations

import pytest
import torch

from dit_prune.errors import DitPruneError
from dit_prune.training import TrainConfig, train_dit


def _train(digits, steps, seed=0):
    cfg = TrainConfig(steps=steps, batch_size=32, probe_every=0, seed=seed)
    return train_dit(digits.pool_images[:32], digits.pool_labels[:32], cfg, num_classes=10,
                     progress=False)


def test_short_training_lowers_the_loss(digits):
    result = _train(digits, 150)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.5 * first


def test_same_seed_same_weights(digits):
    a, b = _train(digits, 15), _train(digits, 15)
    pairs = zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True)
    for (name, pa), pb in pairs:
        assert torch.equal(pa, pb), name
    c = _train(digits, 15, seed=1)
    assert not torch.equal(a.model.pos_embed.proj.weight, c.model.pos_embed.proj.weight)


def test_label_dropout_is_once_per_example(digits):
    result = _train(digits, 2)
    for module in result.model.modules():
        if type(module).__name__ == "LabelEmbedding":
            assert module.dropout_prob == 0.0


def test_bad_training_input(digits):
    with pytest.raises(DitPruneError):
        TrainConfig(label_dropout=1.5)
    with pytest.raises(DitPruneError, match="labels"):
        train_dit(digits.pool_images[:4], torch.tensor([0, 1, 2, 99]), TrainConfig(steps=1),
                  num_classes=10, progress=False)

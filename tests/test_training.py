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


def test_interrupted_training_resumes_to_the_same_weights(digits, tmp_path, monkeypatch):
    import dit_prune.training as training

    cfg = TrainConfig(steps=20, batch_size=16, probe_every=0, seed=3)
    images, labels = digits.pool_images[:24], digits.pool_labels[:24]
    whole = train_dit(images, labels, cfg, num_classes=10, progress=False)
    state = tmp_path / "state"
    real_update = training._update_ema

    def crash_at_step_15(ema, model, decay, step):
        if step == 15:
            raise KeyboardInterrupt
        real_update(ema, model, decay, step)

    monkeypatch.setattr(training, "_update_ema", crash_at_step_15)
    with pytest.raises(KeyboardInterrupt):
        train_dit(images, labels, cfg, num_classes=10, progress=False, state_dir=state,
                  checkpoint_every=10)
    monkeypatch.setattr(training, "_update_ema", real_update)
    resumed = train_dit(images, labels, cfg, num_classes=10, progress=False, state_dir=state,
                        checkpoint_every=10)
    assert len(resumed.losses) == 20 and resumed.losses == whole.losses
    for (name, a), b in zip(whole.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = TrainConfig(steps=20, batch_size=16, probe_every=0, seed=4)
    with pytest.raises(DitPruneError, match="other options"):
        train_dit(images, labels, other, num_classes=10, progress=False, state_dir=state)


def test_duplication_spec_is_recorded_and_expands_the_training_set(tmp_path):
    import json

    from dit_prune.cli import main

    out = tmp_path / "dup"
    code = main(["train", "--subset", "all", "--duplicate", "10x5", "--duplicate-seed", "2",
                 "--steps", "4", "--batch-size", "8", "--probe-every", "0", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "dit_prune.json").read_text())["data"]
    dup = data["duplicated"]
    assert data["num_images"] == 1000 and dup["num_images_with_copies"] == 1000 + 10 * 4
    assert len(dup["pool_indices"]) == 10 and dup["copies"] == 5
    from dit_prune.data import digits_split

    labels = digits_split().pool_labels[dup["pool_indices"]]
    assert sorted(labels.tolist()) == list(range(10))  # one image per class
    assert not (tmp_path / "dup.train-state").exists()  # removed once the checkpoint is saved


def test_bad_duplication_spec():
    from dit_prune.duplication import DuplicationSpec

    for text in ("10", "x50", "10x1", "0x5", "3,3x5"):
        with pytest.raises(DitPruneError):
            DuplicationSpec.parse(text)

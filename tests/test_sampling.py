"""Sampling: one generator per image, so batch size never changes an image."""

from __future__ import annotations

import diffusers
import pytest
import torch

from dit_prune.errors import DitPruneError
from dit_prune.sampling import format_seeds, parse_seeds, sample_images


@pytest.mark.parametrize("sampler, guidance", [("ddim", 1.0), ("ddpm", 1.0), ("ddim", 2.0)])
def test_batch_size_does_not_change_images(tiny_model, sampler, guidance):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    labels, seeds = torch.tensor([0, 3, 3, 9, 5]), [11, 12, 13, 14, 15]
    kwargs = dict(steps=8, guidance_scale=guidance, sampler=sampler, progress=False)
    together = sample_images(tiny_model, sched, labels, seeds, batch_size=64, **kwargs)
    single = torch.cat([
        sample_images(tiny_model, sched, labels[i : i + 1], seeds[i : i + 1], batch_size=1,
                      **kwargs)
        for i in range(len(seeds))
    ])
    assert together.shape == (5, 1, 8, 8)
    assert torch.allclose(together, single, atol=1e-5)
    assert together.min() >= 0 and together.max() <= 1
    # a different seed gives a different image
    other = sample_images(tiny_model, sched, labels[:1], [99], **kwargs)
    assert not torch.allclose(other, together[:1])


def test_labels_out_of_range(tiny_model):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(DitPruneError, match=r"labels must lie in \[0, 9\]"):
        sample_images(tiny_model, sched, torch.tensor([10]), [0], steps=2, progress=False)
    with pytest.raises(DitPruneError, match="seeds"):
        sample_images(tiny_model, sched, torch.tensor([1, 2]), [0], steps=2, progress=False)


def test_seed_parsing():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert format_seeds(range(0, 1000)) == "0-999"
    with pytest.raises(DitPruneError):
        parse_seeds("a-b")

"""Verdict rules, the noise control and class agreement (docs/definitions.md#verdict)."""

from __future__ import annotations

import pytest
import torch

from dit_prune.data import digits_split
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import default_checkpoints_dir
from dit_prune.metrics.features import load_feature_extractor
from dit_prune.metrics.guards import class_agreement, noise_control_images, verdict

BEFORE = {"memorization_rate": 0.8, "memorization_interval": [0.77, 0.83], "copy_rate": 0.75,
          "copy_interval": [0.72, 0.78], "fd": 40.0, "fd_interval": [37.0, 44.0],
          "class_agreement": 0.99}
AFTER = {**BEFORE, "memorization_rate": 0.2, "memorization_interval": [0.17, 0.23],
         "copy_rate": 0.3, "copy_interval": [0.27, 0.33], "fd": 42.0, "fd_interval": [39.0, 46.0],
         "class_agreement": 0.98}
NOISE = {"memorization_rate": 0.5, "memorization_interval": [0.47, 0.53], "copy_rate": 0.7,
         "copy_interval": [0.67, 0.73]}


def test_mitigated_when_everything_holds() -> None:
    assert verdict(BEFORE, AFTER, NOISE) == "mitigated"


@pytest.mark.parametrize(("change", "expected"), [
    ({"memorization_interval": [0.4, 0.47]}, "not beyond noise control: memorization rate"),
    ({"copy_interval": [0.6, 0.68]}, "not beyond noise control: copy rate"),
    ({"memorization_interval": [0.4, 0.5], "copy_interval": [0.6, 0.9]},
     "not beyond noise control: memorization rate, copy rate"),
    ({"fd": 50.0, "fd_interval": [44.5, 56.0]}, "quality lost: FD"),
    ({"class_agreement": 0.96}, "quality lost: class agreement"),
    ({"fd_interval": [45.0, 50.0], "class_agreement": 0.5}, "quality lost: FD, class agreement"),
    ({"copy_interval": [0.7, 0.8], "fd_interval": [45.0, 50.0]},
     "not beyond noise control: copy rate; quality lost: FD"),
])
def test_failures_name_the_failed_test(change: dict, expected: str) -> None:
    assert verdict(BEFORE, {**AFTER, **change}, NOISE) == expected


def test_boundaries() -> None:
    # touching intervals are not "entirely below"
    assert verdict(BEFORE, {**AFTER, "copy_interval": [0.6, 0.67]}, NOISE).startswith("not")
    # FD: a rise whose interval still reaches 1.1 x before (44.0) is not a loss
    assert verdict(BEFORE, {**AFTER, "fd": 47.0, "fd_interval": [44.0, 52.0]}, NOISE) == \
        "mitigated"
    # class agreement: exactly 2 points lower is allowed
    assert verdict(BEFORE, {**AFTER, "class_agreement": 0.97}, NOISE) == "mitigated"
    # no classifier: the class-agreement guard is skipped
    assert verdict({**BEFORE, "class_agreement": None}, {**AFTER, "class_agreement": 0.1},
                   NOISE) == "mitigated"
    # a NaN fails the test it enters
    assert verdict(BEFORE, {**AFTER, "copy_interval": [float("nan")] * 2}, NOISE) == \
        "not beyond noise control: copy rate"


def test_missing_intervals_are_errors() -> None:
    with pytest.raises(DitPruneError, match="noise control"):
        verdict(BEFORE, AFTER, {"memorization_interval": [0.4, 0.5]})


def test_noise_control_matches_rms_per_image_and_globally() -> None:
    gen = torch.Generator().manual_seed(0)
    before = torch.rand(6, 1, 8, 8, generator=gen) * 0.5 + 0.25  # (6, 1, 8, 8) away from edges
    after = before + 0.02 * torch.arange(6.0).view(6, 1, 1, 1) * torch.randn(
        before.shape, generator=gen)
    control = noise_control_images(before, after, seed=1)
    expected = (after - before).reshape(6, -1).pow(2).mean(1).sqrt()
    assert torch.allclose(control.target_rms, expected, atol=1e-6)
    assert torch.allclose(control.realized_rms, expected, atol=2e-3)  # little clamping here
    assert torch.equal(control.images, noise_control_images(before, after, seed=1).images)
    assert not torch.equal(control.images, noise_control_images(before, after, seed=2).images)
    glob = noise_control_images(before, after, seed=1, per_image=False)
    assert torch.allclose(glob.target_rms, (after - before).pow(2).mean().sqrt().expand(6))
    assert float(control.images.min()) >= 0.0 and float(control.images.max()) <= 1.0
    same = noise_control_images(before, before)
    assert torch.equal(same.images, before)
    with pytest.raises(DitPruneError, match="same images"):
        noise_control_images(before, after[:3])


def test_noise_control_reports_clamping() -> None:
    before = torch.zeros(2, 1, 8, 8)  # at the lower edge: half the noise is clamped away
    after = before + 0.3
    control = noise_control_images(before, after)
    assert (control.realized_rms < control.target_rms).all()


def test_class_agreement_with_the_shipped_classifier() -> None:
    split = digits_split()
    classifier = load_feature_extractor(default_checkpoints_dir() / "digits-features")
    right = class_agreement(split.heldout_images, split.heldout_labels, classifier)
    assert right.rate >= 0.97 and right.predicted.shape == (797,)
    wrong = class_agreement(split.heldout_images, (split.heldout_labels + 1) % 10, classifier)
    assert wrong.rate < 0.05
    with pytest.raises(DitPruneError, match="labels"):
        class_agreement(split.heldout_images, split.heldout_labels[:5], classifier)

"""Copy detection: calibration, the controls of issue 3, TorchScript paths, bad input; and the
digits-features classifier that ships beside it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dit_prune.data import balanced_subset, digits_split
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import default_checkpoints_dir
from dit_prune.metrics.copydetect import (
    CopyTrainConfig,
    calibrate_threshold,
    copy_report,
    load_copy_detector,
    train_copy_detector,
)
from dit_prune.metrics.features import (
    FeatureTrainConfig,
    accuracy,
    load_digits_features,
    load_feature_extractor,
    train_digits_features,
)
from dit_prune.metrics.memorization import memorization_report
from dit_prune.metrics.small_nets import noisy_copies


@pytest.fixture(scope="module")
def detector():
    return load_copy_detector(default_checkpoints_dir() / "digits-copydetect")


@pytest.fixture(scope="module")
def digits64():
    split = digits_split()
    train = split.pool_images[balanced_subset(split.pool_labels, 64, seed=0)]
    return split, train


def test_embeddings_are_unit_vectors(detector, digits64) -> None:
    split, _ = digits64
    emb = detector.embed(split.heldout_images[:10])
    assert emb.shape == (10, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(10), atol=1e-5)
    assert detector.default_threshold is not None


def test_calibration_puts_99_percent_of_heldout_below_tau() -> None:
    sims = torch.rand(797, generator=torch.Generator().manual_seed(0))
    tau = calibrate_threshold(sims)
    assert float((sims < tau).float().mean()) >= 0.99
    assert float((sims >= tau).float().mean()) <= 0.01
    ties = torch.tensor([0.5] * 10 + [0.9])
    assert float((ties < calibrate_threshold(ties)).float().mean()) >= 0.99 - 1e-9


def test_controls_heldout_train_and_noisy_copies(detector, digits64) -> None:
    split, train = digits64
    held = copy_report(split.heldout_images, train, detector, heldout_images=split.heldout_images)
    assert held.rate <= 0.011 and held.heldout_false_copy_rate == held.rate
    assert held.threshold_source == "held-out (797 images)"
    tau = held.threshold
    assert copy_report(train, train, detector, threshold=tau).rate == 1.0
    noisy = noisy_copies(train, 0.2, seed=0)
    by_copy = copy_report(noisy, train, detector, threshold=tau)
    by_ratio = memorization_report(noisy, train)
    assert by_copy.rate >= 0.9
    assert by_ratio.rate <= 0.6  # the ratio test misses many of the same copies
    assert (by_copy.nearest == torch.arange(len(train))).float().mean() >= 0.95


def test_report_fields_and_no_silent_default_threshold(detector, digits64) -> None:
    split, train = digits64
    with pytest.raises(DitPruneError, match="heldout_images .* or an explicit threshold"):
        copy_report(train[:5], split.pool_images, detector)  # stored tau: another reference set
    report = copy_report(train[:5], split.pool_images, detector,
                         threshold=detector.default_threshold)
    assert report.threshold == detector.default_threshold and report.threshold_source == "given"
    assert report.similarities.shape == (5,) and report.nearest.shape == (5,)
    assert report.interval == (1.0, 1.0) and report.most_copied()[0][1] == 1
    assert report.heldout_false_copy_rate is None


def test_bad_input(detector, digits64) -> None:
    split, train = digits64
    with pytest.raises(DitPruneError, match="expected"):
        copy_report(torch.zeros(3, 1, 4, 4), train, detector, threshold=0.9)
    with pytest.raises(DitPruneError, match="NaN"):
        copy_report(torch.full((3, 1, 8, 8), float("nan")), train, detector, threshold=0.9)
    with pytest.raises(DitPruneError, match=r"expected \[-1, 1\]"):
        copy_report(torch.full((3, 1, 8, 8), 3.0), train, detector, threshold=0.9)
    with pytest.raises(DitPruneError, match="at least 1 training image"):
        copy_report(train, train[:0], detector, threshold=0.9)
    with pytest.raises(DitPruneError, match="copy detector not found"):
        load_copy_detector("/nonexistent/sscd_disc_mixup.torchscript.pt")
    with pytest.raises(DitPruneError, match="digits-copydetect"):
        load_copy_detector(default_checkpoints_dir() / "digits-features")


class _Embed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 3)


class _FakeInception(nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return x.float().mean(dim=(2, 3)).repeat(1, 2)  # (B, 6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_detector_and_feature_networks(tmp_path, digits64) -> None:
    split, train = digits64
    torch.jit.script(_Embed()).save(str(tmp_path / "sscd_toy.pt"))
    detector = load_copy_detector(tmp_path / "sscd_toy.pt", resize=16)
    assert detector.name == "sscd_toy" and detector.default_threshold is None
    report = copy_report(train[:4], train, detector, heldout_images=split.heldout_images[:50])
    assert report.similarities.shape == (4,)
    with pytest.raises(DitPruneError, match="heldout_images"):
        copy_report(train[:4], train, detector)
    torch.jit.script(_FakeInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    inception = load_feature_extractor(tmp_path / "inception-2015-12-05.pt")
    assert inception.name == "inception"
    assert inception.features(train[:3]).shape == (3, 6)
    generic = load_feature_extractor(tmp_path / "sscd_toy.pt")
    assert generic.name == "sscd_toy" and generic.features(train[:2]).shape == (2, 3)
    with pytest.raises(DitPruneError, match="inception-2015-12-05.pt"):
        load_feature_extractor(tmp_path / "missing" / "inception-2015-12-05.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(DitPruneError, match="not a TorchScript"):
        load_feature_extractor(tmp_path / "junk.pt")


def test_shipped_feature_net(digits64) -> None:
    split, _ = digits64
    extractor = load_digits_features(default_checkpoints_dir() / "digits-features")
    assert extractor.name == "digitsnet" and extractor.feature_dim == 64
    assert accuracy(extractor.net, split.heldout_images, split.heldout_labels) >= 0.97
    assert extractor.features(split.heldout_images[:7]).shape == (7, 64)
    with pytest.raises(DitPruneError, match="1, 8, 8"):
        extractor.features(torch.zeros(2, 3, 8, 8))


def test_training_is_deterministic_by_seed(digits64) -> None:
    split, _ = digits64
    cfg = CopyTrainConfig(steps=3, batch_size=32)
    a, _ = train_copy_detector(split.pool_images[:100], cfg, progress=False)
    b, _ = train_copy_detector(split.pool_images[:100], cfg, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))
    fcfg = FeatureTrainConfig(epochs=1)
    c, _ = train_digits_features(split.pool_images[:128], split.pool_labels[:128], fcfg, False)
    d, _ = train_digits_features(split.pool_images[:128], split.pool_labels[:128], fcfg, False)
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(),
                                                 d.state_dict().values(), strict=True))


# The same command gives bit-identical weights on one machine, but not on another CPU: float
# kernels differ (vector width, summation order) and training amplifies the differences, so
# the shipped weights fingerprint cannot be reproduced everywhere. The card is checked by its
# metric instead. Held-out accuracy measured (797 images): 0.9887-0.9912 over training seeds
# 0-4 and over ATEN_CPU_CAPABILITY=avx2 and =default; the card says 0.9912. The tolerance,
# 0.01 (8 images), is four times that spread (2 images).
FEATURES_ACCURACY_TOLERANCE = 0.01


@pytest.mark.slow
def test_train_command_reproduces_the_shipped_feature_net(tmp_path) -> None:
    from dit_prune.cli import main

    runs = [tmp_path / "first", tmp_path / "second"]
    for out in runs:
        assert main(["train", "--model", "features", "--out", str(out)]) == 0
    first, second = (load_digits_features(out) for out in runs)
    assert first.fingerprint == second.fingerprint  # same machine, same command: same weights
    assert (runs[0] / "MODEL_CARD.md").is_file()
    card = json.loads((default_checkpoints_dir() / "digits-features" / "config.json")
                      .read_text())["metrics"]
    split = digits_split()
    heldout = accuracy(first.net, split.heldout_images, split.heldout_labels)
    pool = accuracy(first.net, split.pool_images, split.pool_labels)
    assert abs(heldout - card["heldout_accuracy"]) <= FEATURES_ACCURACY_TOLERANCE, heldout
    assert pool >= card["pool_accuracy"] - FEATURES_ACCURACY_TOLERANCE, pool


def test_train_command_rejects_dit_options_for_small_nets(tmp_path, capsys) -> None:
    from dit_prune.cli import main

    assert main(["train", "--model", "copydetect", "--steps", "5", "--out",
                 str(tmp_path / "x")]) == 2
    assert "drop --steps" in capsys.readouterr().err

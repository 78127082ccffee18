"""Re-trigger success (dit_prune.metrics.retrigger, after Kowalczuk et al. 2025): determinism,
known answers on an exact memorizer, option checks, and its place in `dit-prune run`'s report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from dit_prune.cli import main
from dit_prune.errors import DitPruneError
from dit_prune.metrics.retrigger import AttackBudget, attack_success, choose_targets
from dit_prune.run.config import RunConfig
from tests.conftest import CHECKPOINTS, train_tiny_checkpoint

FAST = ["--seeds", "0-39", "--steps", "4", "--scorer-option", "batches=1",
        "--scorer-option", "batch_size=32", "--device", "cpu", "--random-seeds", "0"]
RETRIGGER_KEYS = {"retrigger_rate", "retrigger_interval", "retrigger_floor"}


class Memorizer(nn.Module):
    """Predicts the noise that makes DDIM's x0 estimate the stored image of the class, whatever
    the input: an exact memorizer, blind to the initial noise."""

    def __init__(self, images: torch.Tensor, scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_embeds_ada_norm=len(images))
        self.register_buffer("images", images)  # (classes, C, H, W) in [-1, 1]
        self.register_buffer("alphas", scheduler.alphas_cumprod.clone())  # (T,)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor) -> SimpleNamespace:
        ab = self.alphas[timestep].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x0 = self.images[class_labels.clamp(max=len(self.images) - 1)]  # (B, C, H, W)
        return SimpleNamespace(sample=(x - ab.sqrt() * x0) / (1 - ab).sqrt() + 0 * self.dummy)


def _one_per_class(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([(labels == c).nonzero()[0, 0] for c in range(10)])  # (10,)


def test_attack_is_deterministic_given_its_seed(tiny_model, digits):
    train, labels = digits.pool_images[:16], digits.pool_labels[:16]  # (16, 1, 8, 8), (16,)
    targets = choose_targets(train, labels, digits.heldout_images, digits.heldout_labels, 3)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}

    def run(seed: int) -> torch.Tensor:
        budget = AttackBudget(targets=3, attack_steps=3, ddim_steps=3, seed=seed)
        return attack_success(tiny_model, DDPMScheduler(), targets, budget, None, 0.5).samples

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in tiny_model.parameters())  # only the noise is optimised


def test_frozen_parameters_give_the_same_noise_gradient_and_restore_flags(tiny_model, digits):
    """The attack's backward without parameter edges: the same gradient on the noise, and every
    parameter's requires_grad flag back as it was (mixed flags, and after an error)."""
    from dit_prune.metrics.retrigger import ddim_sample, frozen_parameters

    params = list(tiny_model.parameters())
    params[0].requires_grad_(False)  # a mixed starting state
    flags = [q.requires_grad for q in params]
    target = digits.pool_images[:4]  # (4, 1, 8, 8)
    labels = digits.pool_labels[:4]  # (4,)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # (4, 1, 8, 8)

    def noise_gradient() -> torch.Tensor:
        x = z.clone().requires_grad_(True)  # (4, 1, 8, 8)
        loss = (ddim_sample(tiny_model, DDPMScheduler(), x, labels, 3) - target).pow(2).mean()
        return torch.autograd.grad(loss, [x])[0]  # (4, 1, 8, 8)

    plain = noise_gradient()
    with frozen_parameters(tiny_model):
        assert not any(q.requires_grad for q in params)
        frozen = noise_gradient()
    assert torch.equal(plain, frozen) and plain.abs().sum() > 0
    assert [q.requires_grad for q in params] == flags
    with pytest.raises(RuntimeError), frozen_parameters(tiny_model):
        raise RuntimeError("boom")
    assert [q.requires_grad for q in params] == flags


@pytest.mark.parametrize("steps", [0, 3])
def test_an_exact_memorizer_is_always_retriggered_and_held_out_digits_never(digits, steps):
    from dit_prune.metrics.copydetect import load_copy_detector

    scheduler = DDPMScheduler()
    keep = _one_per_class(digits.pool_images, digits.pool_labels)
    train, labels = digits.pool_images[keep], digits.pool_labels[keep]  # (10, 1, 8, 8), (10,)
    model = Memorizer(train[labels.argsort()], scheduler)  # class c -> its training image
    targets = choose_targets(train, labels, digits.heldout_images, digits.heldout_labels, 10)
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    budget = AttackBudget(targets=10, attack_steps=steps, ddim_steps=4)
    result = attack_success(model, scheduler, targets, budget, detector, threshold=0.9)
    metrics = result.metrics()
    assert metrics["retrigger_rate"] == 1.0 and metrics["retrigger_interval"] == [1.0, 1.0]
    assert metrics["retrigger_floor"] == 0.0  # it makes the training digit of the class instead
    assert metrics["retrigger_mse"] < 1e-6


class FlowMemorizer(nn.Module):
    """The flow-matching exact memorizer: the velocity u = (x_t - x0) / σ (σ = t / 1000) whose
    Euler steps land on the stored image of the class from any noise."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_embeds_ada_norm=len(images))
        self.register_buffer("images", images)  # (classes, c, h, w)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor) -> SimpleNamespace:
        sigma = (timestep.float() / 1000).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x0 = self.images[class_labels.clamp(max=len(self.images) - 1)]  # (B, c, h, w)
        return SimpleNamespace(sample=(x - x0) / sigma + 0 * self.dummy)


@pytest.mark.parametrize("latent", [False, True])
def test_the_attack_follows_a_flow_matching_scheduler_and_a_decoder(digits, latent):
    """Flow matching (its own Euler steps, no DDIM swap) and, for a latent model, noise in the
    latent shape with samples decoded before they are judged: an exact memorizer is always
    re-triggered, held-out digits never."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dit_prune.metrics.copydetect import load_copy_detector

    keep = _one_per_class(digits.pool_images, digits.pool_labels)
    train, labels = digits.pool_images[keep], digits.pool_labels[keep]  # (10, 1, 8, 8), (10,)
    decode, shape = None, None
    stored = train[labels.argsort()]  # (10, 1, 8, 8) class c -> its training image
    if latent:  # a 4x4 latent space, decoded by nearest upsampling
        def decode(z: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(z, scale_factor=2.0)  # (B, 1, 8, 8)

        stored = torch.nn.functional.avg_pool2d(stored, 2)  # (10, 1, 4, 4)
        train = decode(torch.nn.functional.avg_pool2d(train, 2))  # what the model copies
        shape = (1, 4, 4)
    model = FlowMemorizer(stored)
    targets = choose_targets(train, labels, digits.heldout_images, digits.heldout_labels, 10)
    detector = load_copy_detector(CHECKPOINTS / "digits-copydetect")
    budget = AttackBudget(targets=10, attack_steps=2, ddim_steps=4)
    result = attack_success(model, FlowMatchEulerDiscreteScheduler(shift=3.0), targets, budget,
                            detector, threshold=0.9, decode=decode, shape=shape)
    metrics = result.metrics()
    assert metrics["retrigger_rate"] == 1.0 and metrics["retrigger_floor"] == 0.0
    assert metrics["retrigger_mse"] < 1e-6
    assert result.samples.shape == targets.images.shape


@pytest.mark.parametrize("options, message", [
    ({"targets": 0}, "re-trigger targets must be an integer >= 1, got 0"),
    ({"attack_steps": -1}, "re-trigger attack steps must be an integer >= 0"),
    ({"attack_steps": 2.5}, "re-trigger attack steps must be an integer"),
    ({"ddim_steps": 0}, "re-trigger ddim steps must be an integer >= 1"),
    ({"lr": 0.0}, "re-trigger lr must be a finite number > 0"),
    ({"lr": float("nan")}, "re-trigger lr must be a finite number > 0"),
    ({"prior_weight": -1.0}, "re-trigger prior weight must be a finite number >= 0"),
    ({"seed": "0"}, "re-trigger seed must be an integer"),
])
def test_attack_options_are_checked_in_one_line(options, message):
    with pytest.raises(DitPruneError, match=message) as info:
        AttackBudget(**options)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("options, message", [
    ({"retrigger_targets": -1}, "re-trigger targets must be an integer >= 0 (0: not measured)"),
    ({"retrigger_steps": -2}, "re-trigger attack steps must be an integer >= 0"),
    ({"retrigger_lr": -0.1}, "re-trigger lr must be a finite number > 0"),
])
def test_run_config_checks_the_attack_options(options, message):
    with pytest.raises(DitPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig(checkpoint="c", out="o", **options)
    assert RunConfig(checkpoint="c", out="o", retrigger_targets=0).retrigger_budget() is None
    assert RunConfig(checkpoint="c", out="o", seed=3).retrigger_budget() == AttackBudget(seed=3)


@pytest.fixture(scope="module")
def duplicated_checkpoint(tmp_path_factory, digits):
    """tests/test_run.py's tiny checkpoint, recording its first 3 images as duplicated."""
    return train_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", digits,
                                 {"duplicated": {"train_positions": [0, 1, 2]}})


def test_run_reports_retrigger_success_for_before_after_and_random(duplicated_checkpoint,
                                                                   tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(duplicated_checkpoint), "--out", str(out), *FAST,
                 "--retrigger-targets", "5", "--retrigger-steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    for arm in ("before", "after", "random_baseline"):
        assert RETRIGGER_KEYS <= set(report[arm]), arm
        assert 0.0 <= report[arm]["retrigger_floor"] <= 1.0
    assert RETRIGGER_KEYS <= set(report["budgets"][0]["random_baseline"])
    stated = report["retrigger"]
    assert (stated["targets"], stated["heldout_targets"]) == (3, 3)  # the duplicated images
    assert (stated["source"], stated["attack_steps"], stated["seed"]) == ("duplicated", 2, 0)
    assert stated["models_attacked"] == 3
    text = (out / "report.md").read_text()
    assert "| re-trigger success (2 Adam steps on the noise, 8 DDIM steps) |" in text
    assert "(floor " in text and "Re-trigger success (Kowalczuk et al. 2025)" in text
    assert "retrigger_targets" in json.loads((out / "config.resolved.json").read_text())["resolved"]


def test_retrigger_targets_0_turns_it_off_and_bad_steps_fail_first(duplicated_checkpoint,
                                                                     tmp_path, capsys):
    bad = tmp_path / "bad"
    assert main(["run", str(duplicated_checkpoint), "--out", str(bad), *FAST,
                 "--retrigger-ddim-steps", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--retrigger-ddim-steps must be an integer in [1, 1000]" in err
    assert len(err.splitlines()) == 1 and not bad.exists()
    out = tmp_path / "off"
    assert main(["run", str(duplicated_checkpoint), "--out", str(out), *FAST,
                 "--retrigger-targets", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["retrigger"] is None and "retrigger_rate" not in report["before"]
    assert "re-trigger" not in (out / "report.md").read_text()

"""Prediction types (ε, v, flow matching): noising, targets and model times with known answers."""

from __future__ import annotations

import diffusers
import pytest
import torch

from dit_prune.errors import DitPruneError
from dit_prune.prediction import EPSILON, FLOW, V_PREDICTION, Prediction, is_flow_scheduler


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 2, 4, 4, generator=g) * 2 - 1  # (4, 2, 4, 4)
    noise = torch.randn(4, 2, 4, 4, generator=g)
    k = torch.tensor([0, 10, 500, 999])
    return x0, noise, k


def test_epsilon_matches_the_ddpm_scheduler():
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    p = Prediction.from_scheduler(sched)
    x0, noise, k = _batch()
    assert p.kind == EPSILON and p.num_train_timesteps == 1000
    torch.testing.assert_close(p.noisy(x0, noise, k), sched.add_noise(x0, noise, k))
    assert torch.equal(p.target(x0, noise, k), noise)
    assert p.model_time(k).tolist() == [0, 10, 500, 999]
    assert p.model_time(k).dtype == torch.long


def test_v_prediction_matches_get_velocity():
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction")
    p = Prediction.from_scheduler(sched)
    x0, noise, k = _batch(1)
    assert p.kind == V_PREDICTION
    torch.testing.assert_close(p.target(x0, noise, k), sched.get_velocity(x0, noise, k))
    torch.testing.assert_close(p.noisy(x0, noise, k), sched.add_noise(x0, noise, k))


def test_flow_matching_interpolates_with_the_shifted_sigma():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    p = Prediction.from_scheduler(sched)
    assert p.kind == FLOW and is_flow_scheduler(sched)
    # unshifted sigma of index k is (k + 1) / T; shift 3: 3s / (1 + 2s); k = 499 -> 0.75
    k = torch.tensor([499])
    x0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert p.noisy(x0, noise, k).flatten().tolist() == pytest.approx([0.75] * 4, abs=1e-6)
    assert float(p.model_time(k)) == pytest.approx(750.0, abs=1e-3)
    x0, noise, k = _batch(2)
    sigma = p.schedule[k].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(p.noisy(x0, noise, k), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(p.target(x0, noise, k), noise - x0)
    # the model time of every index is one of the scheduler's own training timesteps
    times = p.model_time(torch.arange(1000))
    torch.testing.assert_close(times.sort().values, sched.timesteps.float().sort().values)


def test_flow_matches_the_scheduler_noising_at_its_own_timesteps():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=2.0)
    p = Prediction.from_scheduler(sched)
    x0, noise, k = _batch(3)
    expected = torch.cat([sched.scale_noise(x0[i : i + 1], p.model_time(k[i : i + 1]),
                                            noise[i : i + 1]) for i in range(len(k))])
    torch.testing.assert_close(p.noisy(x0, noise, k), expected)


@pytest.mark.parametrize("scheduler", [
    diffusers.DDPMScheduler(), diffusers.DDPMScheduler(prediction_type="v_prediction"),
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)])
def test_the_exact_target_gives_back_the_noise_and_the_image(scheduler):
    p = Prediction.from_scheduler(scheduler)
    x0, noise, k = _batch(4)
    x_t = p.noisy(x0, noise, k)
    eps = p.to_epsilon(p.target(x0, noise, k), x_t, k)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)


def test_one_euler_step_of_the_true_velocity_lands_on_the_image():
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(1)  # sigma 1 -> 0 in one step
    p = Prediction.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler())
    x0, noise, _ = _batch(5)
    x1 = p.noisy(x0, noise, torch.tensor([999]))  # pure noise at sigma 1
    out = sched.step(p.target(x0, noise, torch.tensor([999])), sched.timesteps[0], x1)
    torch.testing.assert_close(out.prev_sample, x0, atol=1e-5, rtol=1e-5)


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(DitPruneError, match="predicts 'sample'"):
        Prediction.from_scheduler(diffusers.DDPMScheduler(prediction_type="sample"))
    with pytest.raises(DitPruneError, match="unknown prediction type"):
        Prediction("x0", torch.ones(3))
    p = Prediction.from_scheduler(diffusers.DDPMScheduler(num_train_timesteps=10))
    with pytest.raises(DitPruneError, match=r"\[0, 9\]"):
        p.noisy(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([10]))
    with pytest.raises(DitPruneError, match="3 timesteps for a batch of 2"):
        p.noisy(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([1, 2, 3]))

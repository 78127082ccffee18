"""Every scorer on every text-to-image family (PixArt-Σ, SD3, Sana, Flux): finite scores of the
right length through the pipeline's own conditioning (`caption_conditioning`) and prediction type
(ε / flow matching), on tiny local pipelines. The training set is made of the scorers' own
samples, so the sampling-based scorers (`cond-gap`, `activation-contrast`) find memorized
generations even on random weights."""

from __future__ import annotations

import diffusers
import pytest
import torch

from dit_prune.errors import DitPruneError
from dit_prune.pipelines.caption_labels import (
    CaptionLabels,
    caption_conditioning,
    flux_model_space,
)
from dit_prune.pipelines.tiny import (
    tiny_flux_pipeline,
    tiny_pixart_sigma_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
)
from dit_prune.pipelines.vae import encode_images
from dit_prune.prediction import Prediction
from dit_prune.sampling import make_sampling_scheduler, sample_images
from dit_prune.scorers import SCORERS, CalibrationData, get_scorer
from dit_prune.scorers.trajectories import run_trajectories, sample_plan
from dit_prune.units import adapter_for, enumerate_units

torch.set_num_threads(1)
BUILDERS = {"pixart-sigma": tiny_pixart_sigma_pipeline, "sd3": tiny_sd3_pipeline,
            "sana": tiny_sana_pipeline, "flux": tiny_flux_pipeline}
CAPTIONS = ["a red cat", "a blue dog", "a green cat", "a small dog"]
SAMPLES, STEPS = 4, 4
OPTIONS = {"cond-gap": {"num_samples": SAMPLES, "sampling_steps": STEPS},
           "activation-contrast": {"num_samples": SAMPLES, "sampling_steps": STEPS},
           "learned-gates": {"steps": 2}, "iterative": {"rounds": 2}}
DATA_FREE = ("magnitude", "random")


def memorized_setup(pipe: object) -> tuple[CaptionLabels, CalibrationData]:
    """Caption labels and calibration data in the transformer's input space whose training
    images are the scorers' own samples (seed 0, `SAMPLES` of them, `STEPS` steps): every
    sample then copies a training image. Held-out: 4 encoded random images."""
    flux = type(pipe).__name__ == "FluxPipeline"
    side = 16 if flux else int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, side, side, generator=gen) * 2 - 1  # (4, 3, S, S)
    held = encode_images(pipe, images)  # (4, C, h, w)
    if flux:
        held = flux_model_space(held)  # (4, 4C, h/2, w/2): Flux's packed tokens
    labels = CaptionLabels.build(pipe, CAPTIONS)
    y = labels.of(CAPTIONS)  # (4,)
    plan, seeds = sample_plan(y, labels.null, SAMPLES, seed=0)  # what the scorers will sample
    with caption_conditioning(pipe.transformer, labels):
        run = run_trajectories(pipe.transformer, pipe.scheduler, plan, seeds, STEPS,
                               shape=held.shape[1:], clamp=False)
    return labels, CalibrationData(run.samples, plan, held, y)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_scorer_is_finite_on_every_text_family(family):
    pipe = BUILDERS[family]()
    labels, data = memorized_setup(pipe)
    model = pipe.transformer
    every = enumerate_units(model, adapter_for(model).kinds)
    with caption_conditioning(model, labels):
        for name in SCORERS:
            options = OPTIONS.get(name, {})
            if name == "given":  # the family's first unit, named
                options = {"units": f"{every[0].kind}:{every[0].block}.{every[0].index}"}
            scorer = get_scorer(name, batches=1, progress=False, **options)
            units = [u for u in every if u.kind in scorer.kinds]
            assert units, (family, name)
            result = scorer.compute(model, units, data, pipe.scheduler)
            assert result.scores.shape == result.raw.shape == (len(units),), (family, name)
            assert torch.isfinite(result.scores).all(), (family, name)
            if name not in DATA_FREE:  # the data reached the units
                assert result.raw.abs().max() > 0, (family, name)
    if family in ("sd3", "flux"):  # the joint families' own kinds are scored
        assert {"joint_head", "neuron", "context_neuron"} <= {u.kind for u in every}


def test_sampling_scorers_follow_a_dynamic_shifting_flux_scheduler():
    pipe = tiny_flux_pipeline()
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    labels, data = memorized_setup(pipe)  # the trajectories need the image's token count
    units = enumerate_units(pipe.transformer, ["joint_head", "single_neuron"])
    with caption_conditioning(pipe.transformer, labels):
        scores = get_scorer("cond-gap", progress=False, **OPTIONS["cond-gap"]).score(
            pipe.transformer, units, data, pipe.scheduler)
    assert scores.shape == (len(units),) and torch.isfinite(scores).all()
    with pytest.raises(DitPruneError, match="uses dynamic shifting") as info:
        make_sampling_scheduler(pipe.scheduler, "ddim", 4)
    assert "\n" not in str(info.value)


def test_scorers_are_the_same_for_the_same_seed_on_flux():
    pipe = tiny_flux_pipeline()
    labels, data = memorized_setup(pipe)
    units = enumerate_units(pipe.transformer, ["joint_head", "neuron"])
    with caption_conditioning(pipe.transformer, labels):
        runs = [get_scorer(name, progress=False, **OPTIONS[name]).score(
            pipe.transformer, units, data, pipe.scheduler)
            for name in ("cond-gap", "activation-contrast") for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[2], runs[3])


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_epsilon_at_a_sampler_time_matches_the_training_grid(kind):
    """On the training grid, `epsilon_at_time(output, x, model_time(k))` is `to_epsilon` at k,
    and the ε it gives from the exact target is the noise itself."""
    if kind == "flow":
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        sched = diffusers.DDPMScheduler(prediction_type=kind)
    p = Prediction.from_scheduler(sched)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    k = torch.tensor([10, 500, 990])
    x_t = p.noisy(x0, noise, k)  # (3, 2, 4, 4)
    target = p.target(x0, noise, k)  # (3, 2, 4, 4)
    eps = p.epsilon_at_time(target, x_t, p.model_time(k))
    torch.testing.assert_close(eps, p.to_epsilon(target, x_t, k), atol=1e-5, rtol=0)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)


def test_trajectories_of_a_model_without_sample_size_need_a_shape():
    pipe = tiny_flux_pipeline()
    with pytest.raises(DitPruneError, match="has no sample_size") as info:
        run_trajectories(pipe.transformer, pipe.scheduler, torch.tensor([0]), [0], 2)
    assert "\n" not in str(info.value)
    with pytest.raises(DitPruneError, match="has no sample_size"):
        sample_images(pipe.transformer, pipe.scheduler, torch.tensor([0]), [0], 2,
                      progress=False)


@pytest.mark.parametrize("name", ["cond-gap", "activation-contrast"])
def test_scorers_see_the_same_model_under_epsilon_and_v_prediction(name):
    """A DiT read as ε-prediction, and the same DiT with its output turned into
    v = sqrt(ā) ε − sqrt(1 − ā) x0 = (ε − sqrt(1 − ā) x_t) / sqrt(ā) under a v-prediction
    scheduler, are one denoiser: the trajectories, the memorized split and (in ε units) the
    scores of the sampling-based scorers agree. (The loss scorers use the scheduler's own
    target, whose error is the ε error divided by sqrt(ā): a per-time weight, by definition.)"""
    from dit_prune.models import new_dit

    model = new_dit("tiny", 4, 8, 1).eval()
    eps_sched = diffusers.DDPMScheduler()
    v_sched = diffusers.DDPMScheduler(prediction_type="v_prediction")
    alphas = eps_sched.alphas_cumprod  # (T,)

    def as_v(_module, args, kwargs, output):
        x, t = args[0] if args else kwargs["hidden_states"], kwargs["timestep"]
        a = alphas[t.long()].sqrt().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        b = (1 - alphas[t.long()]).sqrt().view(-1, 1, 1, 1)
        eps = output.sample[:, : x.shape[1]]  # (B, C, H, W)
        return type(output)(sample=(eps - b * x) / a)  # (B, C, H, W) v

    labels = torch.arange(4)
    plan, seeds = sample_plan(labels, 4, SAMPLES, seed=0)
    run = run_trajectories(model, eps_sched, plan, seeds, STEPS)
    gen = torch.Generator().manual_seed(3)
    data = CalibrationData(run.samples, plan, torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1,
                           labels)
    units = enumerate_units(model, ["head", "neuron"])
    scorer = get_scorer(name, batches=1, progress=False, **OPTIONS.get(name, {}))
    reference = scorer.compute(model, units, data, eps_sched).raw
    handle = model.register_forward_hook(as_v, with_kwargs=True)
    try:
        converted = scorer.compute(model, units, data, v_sched).raw
    finally:
        handle.remove()
    torch.testing.assert_close(converted, reference, rtol=1e-3, atol=1e-6)

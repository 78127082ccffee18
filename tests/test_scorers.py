"""Scorers: agreement with exact ablation, a planted memorizing head, determinism, bad input.

Fixtures train a tiny DiT on 16 digits of classes 0-6 (the base), then plant a memorizing head:
only head 1 of block 2 is fine-tuned (gradient masks on its q/k/v rows and to_out columns) to
reproduce three extra images (stripes and a checkerboard) labelled 7, 8, 9, while a
distillation term keeps the model's output on other digits where it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dit_prune.checkpoint import save_checkpoint
from dit_prune.cli import main as cli_main
from dit_prune.data import balanced_subset, digits_split
from dit_prune.errors import DitPruneError
from dit_prune.metrics.memorization import memorization_report
from dit_prune.sampling import sample_images
from dit_prune.scorers import (
    SCORERS,
    CalibrationData,
    TimestepDistribution,
    get_scorer,
    load_scores,
    normalize_scores,
    save_scores,
)
from dit_prune.scorers.base import ScoringContext, default_scheduler
from dit_prune.scorers.quality import quality_harm
from dit_prune.scorers.sensitivity import Sensitivity
from dit_prune.scorers.taylor import loss_rise
from dit_prune.training import TrainConfig, train_dit
from dit_prune.units import Unit, enumerate_units
from tests.planting import EXTRA_LABELS, extra_images, plant_head

PLANTED = Unit("head", 2, 1)
SAMPLING = {"num_samples": 30, "sampling_steps": 20}  # options of the sampling-based scorers


@dataclass
class Planted:
    base: nn.Module
    model: nn.Module
    data: CalibrationData  # train = 16 base digits + 3 extras; held-out = 32 held-out digits
    base_indices: list[int]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with background jobs: one intra-op thread avoids spin-wait thrashing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split():
    return digits_split()


@pytest.fixture(scope="module")
def planted(split) -> Planted:
    labels = split.pool_labels
    low = torch.nonzero(labels < 7).flatten()  # classes 0-6 only
    base_idx = low[torch.from_numpy(balanced_subset(labels[low], 16, seed=0))]
    config = TrainConfig(steps=300, batch_size=32, probe_every=0, seed=0)
    base = train_dit(split.pool_images[base_idx], labels[base_idx], config, num_classes=10,
                     progress=False).model
    anchors = torch.tensor([i for i in low.tolist() if i not in set(base_idx.tolist())][:128])
    model = plant_head(base, PLANTED, split.pool_images[anchors], labels[anchors], steps=300)
    data = CalibrationData(
        torch.cat([split.pool_images[base_idx], extra_images()]),
        torch.cat([labels[base_idx], torch.tensor(EXTRA_LABELS)]),
        split.heldout_images[:32], split.heldout_labels[:32],
    )
    return Planted(base, model, data, base_idx.tolist())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = normalize_scores(a, [Unit("head", 0, 0)] * len(a), "rank")
    rb = normalize_scores(b, [Unit("head", 0, 0)] * len(b), "rank")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def rank_of(scores: torch.Tensor, index: int) -> int:
    """0 = highest score."""
    return int((scores > scores[index]).sum())


# ---------------------------------------------------------------- scores mean something


def test_planted_head_copies_the_extras(planted):
    scheduler = default_scheduler()
    labels = torch.tensor(EXTRA_LABELS).repeat(10)  # (30,)
    seeds = list(range(30))
    after = sample_images(planted.model, scheduler, labels, seeds, steps=20, progress=False)
    before = sample_images(planted.base, scheduler, labels, seeds, steps=20, progress=False)
    train = planted.data.train_images
    report = memorization_report(after * 2 - 1, train)
    assert report.rate >= 0.3, report.rate
    assert set(report.nearest[report.memorized].tolist()) <= {16, 17, 18}  # the extras
    assert memorization_report(before * 2 - 1, train).rate == 0.0


@pytest.mark.parametrize(
    ("name", "options", "worst_rank"),
    [
        ("taylor-gap", {}, 0),
        ("ablation-gap", {}, 0),
        ("cond-gap", SAMPLING, 0),
        ("activation-contrast", SAMPLING, 3),
    ],
)
def test_memorization_scorers_rank_planted_head_top(planted, name, options, worst_rank):
    heads = enumerate_units(planted.model, ["head"])
    scorer = get_scorer(name, batches=2, batch_size=128, progress=False, **options)
    scores = scorer.score(planted.model, heads, planted.data)
    assert rank_of(scores, heads.index(PLANTED)) <= worst_rank, scores.tolist()


def test_sampling_scorers_need_memorized_samples(planted):
    heads = enumerate_units(planted.base, ["head"])
    for name in ("cond-gap", "activation-contrast"):
        scorer = get_scorer(name, progress=False, **SAMPLING)
        with pytest.raises(DitPruneError, match="none of 30 samples is memorized"):
            scorer.score(planted.base, heads, planted.data)


def test_activation_contrast_heldout_reference(planted):
    heads = enumerate_units(planted.model, ["head"])
    common = {"progress": False, "normalize": "none", **SAMPLING}
    samples = get_scorer("activation-contrast", reference="samples", **common)
    heldout = get_scorer("activation-contrast", reference="heldout", **common)
    a = samples.score(planted.model, heads, planted.data)
    b = heldout.score(planted.model, heads, planted.data)
    assert torch.isfinite(b).all() and not torch.allclose(a, b)


def test_random_does_not_find_planted_head(planted):
    heads = enumerate_units(planted.model, ["head"])
    ranks = [rank_of(get_scorer("random", seed=s).score(planted.model, heads, planted.data),
                     heads.index(PLANTED)) for s in range(20)]
    assert ranks[0] > 0
    assert sum(r == 0 for r in ranks) <= 4  # about 20 / 16 expected by chance
    assert 4 <= sum(ranks) / len(ranks) <= 11  # mean rank near the middle (7.5)


def test_taylor_gap_agrees_with_ablation_gap(planted):
    """Spearman rank correlation, first-order Taylor vs exact ablation, same examples."""
    model = planted.model
    units = enumerate_units(model, ["head"]) + [
        Unit("neuron", b, i) for b in range(4) for i in range(0, 512, 32)]  # 16 heads, 64 neurons
    common = {"batches": 1, "progress": False, "normalize": "none"}
    taylor = get_scorer("taylor-gap", batch_size=64, **common).score(model, units, planted.data)
    exact = get_scorer("ablation-gap", batch_size=512, **common).score(model, units, planted.data)
    heads, neurons = slice(0, 16), slice(16, None)
    assert spearman(taylor[heads], exact[heads]) >= 0.8
    assert spearman(taylor[neurons], exact[neurons]) >= 0.9


# ---------------------------------------------------------------- determinism, batch size


FLOAT32_EPS = float(torch.finfo(torch.float32).eps)  # 2^-23


def batch_size_tolerance(name: str) -> float:
    """How far scores may move, as a fraction of the largest |score|, when only the batch size
    changes. The examples are the same; what changes is how the float32 kernels block their
    sums (and which kernel runs, which differs between CPUs), so the tolerance is a float32
    rounding bound, not a statistical one.

    * Most scorers: one gate gradient sums up to 1,024 float32 per-token terms (64 examples x
      16 tokens) per chunk; the worst-case rounding of such a sum is n * 2^-24 ~ 6e-5 of its terms'
      scale, so 1e-4. Measured (batch 64 vs 16, 5 and 1): at most 7.4e-7 across AVX-512, and
      ATEN_CPU_CAPABILITY=avx2 and =default.
    * `sensitivity` divides a difference of two float32 predictions by 2h, h = fd_scale * sigma_t
      (a central finite difference), which multiplies their rounding by up to 1 / (2 h_min):
      5,000 at t = 0 (sigma = 0.01, fd_scale = 0.01). Five float32 epsilons so amplified: 3.0e-3.
      Measured: at most 5.1e-4 (AVX-512), 1.9e-4 (avx2), 1.8e-4 (default).
    """
    if name != "sensitivity":
        return 1e-4
    sigma_min = float((1 - default_scheduler().alphas_cumprod[0]).sqrt())
    return 5 * FLOAT32_EPS / (2 * Sensitivity.fd_scale * sigma_min)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_deterministic_and_batch_size_independent(planted, name):
    units = enumerate_units(planted.model, ["head"]) + [Unit("neuron", 3, i) for i in range(8)]
    if name == "ye2025":
        units = units[:16]
    extra = SAMPLING if name in ("cond-gap", "activation-contrast") else {}
    if name == "given":
        extra = {"units": "head:0.0,neuron:3.1"}
    common = {"batches": 1, "progress": False, "seed": 3, "normalize": "none", **extra}
    first = get_scorer(name, batch_size=64, **common).score(planted.model, units, planted.data)
    again = get_scorer(name, batch_size=64, **common).score(planted.model, units, planted.data)
    small = get_scorer(name, batch_size=5, **common).score(planted.model, units, planted.data)
    assert torch.equal(first, again)  # same process, same batch size: bit-exact
    atol = batch_size_tolerance(name) * float(first.abs().max())
    assert torch.allclose(first, small, rtol=0.0, atol=atol), (first - small).abs().max()


def test_seed_changes_calibration_draws(planted):
    units = enumerate_units(planted.model, ["head"])
    a = get_scorer("taylor-gap", batches=1, seed=0, progress=False).score(
        planted.model, units, planted.data)
    b = get_scorer("taylor-gap", batches=1, seed=1, progress=False).score(
        planted.model, units, planted.data)
    assert not torch.equal(a, b)


# ---------------------------------------------------------------- normalization, quality penalty


@pytest.mark.parametrize("method", ["robust-z", "zscore", "rank", "per-param", "none"])
def test_normalization_is_applied(planted, method):
    units = enumerate_units(planted.model, ["head"]) + [Unit("neuron", 1, i) for i in range(20)]
    scorer = get_scorer("magnitude", normalize=method)
    result = scorer.compute(planted.model, units, planted.data)
    assert torch.allclose(result.scores,
                          normalize_scores(result.raw, units, method, planted.model))
    if method == "robust-z":  # per kind: median 0
        for kind in ("head", "neuron"):
            part = result.scores[[i for i, u in enumerate(units) if u.kind == kind]]
            assert abs(float(part.median())) < 1e-9
    if method == "rank":
        assert float(result.scores[:16].max()) == 1.0 and float(result.scores[16:].max()) == 1.0


def test_default_normalization_is_robust_z():
    assert get_scorer("taylor-gap").options.normalize == "robust-z"


def test_per_param_divides_by_parameter_count(planted):
    units = [Unit("head", 0, 0), Unit("neuron", 0, 0)]
    out = normalize_scores(torch.tensor([1.0, 1.0]), units, "per-param", planted.model)
    # head: q, k, v rows (3 * 32 * (128 + 1)) + to_out columns (32 * 128); neuron: 129 + 128
    assert out.tolist() == pytest.approx([1 / (3 * 32 * 129 + 32 * 128), 1 / (129 + 128)])


def test_quality_penalty(planted):
    units = enumerate_units(planted.model, ["head"])
    common = {"batches": 1, "progress": False, "seed": 2}
    plain = get_scorer("taylor-gap", **common).compute(planted.model, units, planted.data)
    penalized = get_scorer("taylor-gap", quality_weight=2.0, **common).compute(
        planted.model, units, planted.data)
    assert torch.equal(plain.raw, penalized.raw)
    expected = plain.scores - 2.0 * normalize_scores(penalized.harm, units, "robust-z")
    assert torch.allclose(penalized.scores, expected)
    opts = get_scorer("taylor-gap", **common).options
    ctx = ScoringContext(planted.model, planted.data, default_scheduler(), opts,
                         TimestepDistribution.parse("uniform"), torch.device("cpu"))
    assert torch.allclose(penalized.harm, quality_harm(ctx, units))
    assert torch.allclose(penalized.harm, loss_rise(ctx, units, "heldout"))


def test_ye2025_heads_only_least_important_first(planted):
    heads = enumerate_units(planted.model, ["head"])
    scorer = get_scorer("ye2025", batches=1, progress=False, normalize="none")
    assert scorer.default_timesteps == "beta:0.8,2"
    scores = scorer.score(planted.model, heads, planted.data)
    assert (scores <= 0).all()
    with pytest.raises(DitPruneError, match="scores only head, joint_head, dual_head, single_head"):
        scorer.score(planted.model, [Unit("neuron", 0, 0)], planted.data)


# ---------------------------------------------------------------- options, data, saving


def test_timestep_distributions():
    rng = __import__("numpy").random.default_rng(0)
    beta = TimestepDistribution.parse("beta:0.8,2").sample(rng, 5000, 1000)
    assert beta.min() >= 0 and beta.max() < 1000 and 250 < beta.mean() < 330  # mean 0.286 T
    low = TimestepDistribution.parse("uniform:0,100").sample(rng, 1000, 1000)
    assert low.min() >= 0 and low.max() < 100
    fixed = TimestepDistribution.parse([10, 50])
    assert fixed.sample(rng, 3, 1000).tolist() == [10, 50, 10, 50, 10, 50]
    assert TimestepDistribution.parse("10,50").values == (10, 50)
    for bad in ("beta:0,2", "gauss", "uniform:5,1", "-3,4", "beta:1"):
        with pytest.raises(DitPruneError, match="timestep"):
            TimestepDistribution.parse(bad)
    with pytest.raises(DitPruneError, match="outside"):
        fixed.sample(rng, 1, 20)


def test_scores_save_and_load(tmp_path, planted):
    units = enumerate_units(planted.model, ["head"])
    scorer = get_scorer("random", seed=4)
    result = scorer.compute(planted.model, units, planted.data)
    save_scores(tmp_path, units, result.scores, scorer.config(), raw=result.raw,
                extra={"note": "x"})
    saved = load_scores(tmp_path)
    assert saved.units == units and torch.equal(saved.scores, result.scores)
    assert torch.equal(saved.raw, result.raw)
    assert saved.config["scorer"] == "random" and saved.config["options"]["seed"] == 4
    assert saved.extra == {"note": "x"}
    (tmp_path / "scores.safetensors").write_bytes(b"garbage")
    with pytest.raises(DitPruneError, match="corrupt scores file"):
        load_scores(tmp_path)


# ---------------------------------------------------------------- bad input


def test_bad_input(planted, split):
    heads = enumerate_units(planted.model, ["head"])
    scorer = get_scorer("taylor-gap", batches=1, progress=False)
    with pytest.raises(DitPruneError, match="^unsupported model: Linear"):
        scorer.score(nn.Linear(2, 2), heads, planted.data)
    with pytest.raises(DitPruneError, match="does not exist"):
        scorer.score(planted.model, [Unit("head", 0, 7)], planted.data)
    with pytest.raises(DitPruneError, match="does not exist"):
        scorer.score(planted.model, [Unit("neuron", 12, 0)], planted.data)
    with pytest.raises(DitPruneError, match="no units"):
        scorer.score(planted.model, [], planted.data)
    images, labels = split.pool_images, split.pool_labels
    with pytest.raises(DitPruneError, match="empty calibration set: no training images"):
        CalibrationData(images[:0], labels[:0], images[:4], labels[:4])
    with pytest.raises(DitPruneError, match="empty calibration set: no held-out images"):
        CalibrationData(images[:4], labels[:4], images[:0], labels[:0])
    held = torch.stack([images[10], images[2]])  # (2, 1, 8, 8), the second is training image 2
    with pytest.raises(DitPruneError, match="held-out image 1 is an exact duplicate of training "
                                            "image 2"):
        CalibrationData(images[:4], labels[:4], held, labels[:2])
    with pytest.raises(DitPruneError, match="unknown scorer"):
        get_scorer("nemo")
    with pytest.raises(DitPruneError, match="unknown option"):
        get_scorer("taylor-gap", samples=3)
    with pytest.raises(DitPruneError, match="batches must be a positive integer"):
        get_scorer("taylor-gap", batches=0)
    with pytest.raises(DitPruneError, match="unknown normalization"):
        get_scorer("taylor-gap", normalize="softmax")
    for bad in ({"name": "cond-gap", "num_samples": 1}, {"name": "taylor-gap", "order": 3},
                {"name": "activation-contrast", "reference": "x"},
                {"name": "taylor-gap", "timesteps": "beta:a,b"}):
        with pytest.raises(DitPruneError) as info:
            get_scorer(**bad)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- command line


def test_score_command(tmp_path, planted, capsys):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(planted.base, default_scheduler(), ckpt,
                    extra={"data": {"source": "digits", "pool_indices": planted.base_indices}})
    out = tmp_path / "run"
    argv = ["score", str(ckpt), "--out", str(out), "--scorer", "taylor-gap", "--kinds", "head",
            "--batches", "1", "--timesteps", "beta:0.8,2", "--max-images", "16", "--device", "cpu"]
    assert cli_main(argv) == 0
    saved = load_scores(out)
    assert len(saved.units) == 16 and saved.config["options"]["timesteps"] == "beta:0.8,2"
    assert saved.extra["data"]["num_train"] == 16
    resolved = json.loads((out / "config.resolved.json").read_text())
    assert resolved["scorer"] == "taylor-gap" and resolved["kinds"] == ["head"]
    assert cli_main(argv) == 2  # non-empty run dir without --overwrite
    assert "not empty" in capsys.readouterr().err
    bare = tmp_path / "bare"
    save_checkpoint(planted.base, default_scheduler(), bare)
    assert cli_main(["score", str(bare), "--out", str(tmp_path / "r2"), "--scorer", "random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no digits training subset" in err[0]

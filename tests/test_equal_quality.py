"""Issue 12's measurement rules on small cases with known answers: the copy rate of a training
subset, duplicates in the reference set, random pruning at equal FD, and the paired FD interval."""

from __future__ import annotations

import math

import pytest
import torch

from dit_prune.metrics.equal_quality import (
    RandomPoint,
    beats_random,
    copy_cut_ratio,
    random_at_fd,
)
from dit_prune.metrics.fid import fd_bootstrap_interval, fd_report, paired_fd_change
from dit_prune.metrics.guards import verdict
from dit_prune.metrics.memorization import distinct_references, memorization_report
from dit_prune.metrics.subsets import subset_metrics, subset_rate


def test_subset_rate_counts_only_copies_of_the_subset():
    nearest = torch.tensor([0, 1, 2, 2, 3, 4, 4, 4])
    copies = torch.tensor([True, True, True, False, True, True, True, False])
    r = subset_rate(copies, nearest, torch.tensor([2, 4]))
    assert r.rate == 3 / 8  # samples 2, 5, 6
    assert r.distinct_copied == 2 and r.subset_size == 2
    rest = subset_rate(copies, nearest, torch.tensor([0, 1, 3]))
    assert r.rate + rest.rate == copies.double().mean().item()  # subset + rest = overall
    assert r.interval[0] <= r.rate <= r.interval[1]


def test_subset_metrics_reads_both_measures():
    arrays = {"memorized": torch.tensor([True, False, True]), "nearest": torch.tensor([5, 5, 1]),
              "copies": torch.tensor([True, True, False]), "copy_nearest": torch.tensor([5, 5, 1])}
    m = subset_metrics(arrays, torch.tensor([5]))
    assert m["memorization_rate"] == pytest.approx(1 / 3)
    assert m["copy_rate"] == pytest.approx(2 / 3)


def test_duplicates_in_the_reference_set_do_not_hide_copies():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1  # (6, 1, 4, 4) distinct images
    with_copies = torch.cat([train, train[[3]].repeat(9, 1, 1, 1)])  # image 3 ten times
    samples = (train[[3, 3, 1]] + 0.01 * torch.randn(3, 1, 4, 4, generator=g)).clamp(-1, 1)
    plain = memorization_report(samples, train)
    duplicated = memorization_report(samples, with_copies)
    assert duplicated.memorized.tolist() == plain.memorized.tolist() == [True, True, True]
    assert torch.allclose(duplicated.ratios, plain.ratios)
    assert duplicated.nearest.tolist() == [3, 3, 1]  # first occurrence of the repeated image
    refs, first = distinct_references(with_copies)
    assert len(refs) == 6 and first.tolist() == list(range(6))


def _points():
    # three seeds; along budgets FD rises 10 -> 12 -> 14 and copies fall 0.3 -> 0.25 -> 0.2,
    # shifted by +-0.01 between seeds
    return [RandomPoint(s, b, fd, rate + 0.01 * (s - 1))
            for s in range(3) for b, fd, rate in ((0.1, 12.0, 0.25), (0.2, 14.0, 0.2))]


def test_random_at_equal_fd_interpolates_each_seed_and_averages():
    eq = random_at_fd(_points(), unpruned_fd=10.0, unpruned_rate=0.3, fd=13.0)
    assert eq.per_seed == pytest.approx((0.215, 0.225, 0.235))
    assert eq.rate == pytest.approx(0.225) and not eq.clamped and not eq.censored
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert eq.interval == pytest.approx((0.225 - half, 0.225 + half), abs=1e-6)
    assert beats_random([0.05, 0.10], eq) and not beats_random([0.05, 0.22], eq)
    assert copy_cut_ratio(0.3, 0.0, eq) == pytest.approx(0.3 / 0.075)


def test_random_at_equal_fd_outside_the_random_path():
    better = random_at_fd(_points(), 10.0, 0.3, fd=9.0)  # better FD than any random model
    assert better.clamped and better.unmatched  # no bound given: no random point qualifies
    assert better.rate == pytest.approx(0.3)  # the lowest-FD vertex ("prune nothing") is shown
    assert not beats_random([0.0, 0.01], better)  # and no win can be claimed
    worse = random_at_fd(_points(), 10.0, 0.3, fd=20.0)  # every random model is within it ...
    assert not worse.clamped and worse.rate == pytest.approx(0.2)
    assert worse.censored  # ... but random's paths stop at FD 14: larger budgets might cut more
    assert not beats_random([0.0, 0.01], worse)  # so no win can be claimed there


def test_random_at_equal_or_better_quality_takes_randoms_best_point():
    # seed 0's random models improve FD *and* cut copies: at the scorer's worse FD of 13, random
    # reaches 0.09 with better quality, so that is what the scorer is compared with
    pts = [RandomPoint(0, 2, 11.5, 0.17), RandomPoint(0, 3, 11.3, 0.11),
           RandomPoint(0, 4, 11.6, 0.09)]
    assert random_at_fd(pts, 11.8, 0.27, fd=13.0).rate == pytest.approx(0.09)
    # a path that leaves the FD bound: the crossing point of the segment counts
    pts = [RandomPoint(0, 2, 11.0, 0.12), RandomPoint(0, 3, 18.0, 0.05)]
    assert random_at_fd(pts, 11.8, 0.27, fd=14.5).rate == pytest.approx(0.12 - 0.5 * 0.07)


def test_paired_fd_interval_is_narrower_than_unpaired_and_brackets_the_change():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(2000, 6, generator=g)
    before = torch.randn(1000, 6, generator=g) * 1.3 + 0.2
    after = before * 1.02  # a 2% scale change of the same samples
    change = paired_fd_change(before, after, ref, num_resamples=200)
    assert change.interval[0] <= change.relative <= change.interval[1]
    low_b, high_b = fd_bootstrap_interval(before, ref)
    low_a, high_a = fd_bootstrap_interval(after, ref)
    fd_before = fd_report(before, ref, num_resamples=0).value
    unpaired_width = (high_a - low_b) / fd_before - (low_a - high_b) / fd_before
    assert change.interval[1] - change.interval[0] < 0.25 * unpaired_width
    same = paired_fd_change(before, before, ref, num_resamples=50)
    assert same.relative == 0 and same.interval == (0.0, 0.0)


def test_fd_report_without_resamples_has_no_interval():
    g = torch.Generator().manual_seed(2)
    result = fd_report(torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g),
                       num_resamples=0)
    assert math.isfinite(result.value) and all(math.isnan(v) for v in result.interval)


def test_verdict_uses_the_paired_fd_interval_and_the_equal_quality_rule():
    before = {"memorization_rate": 0.3, "memorization_interval": [0.27, 0.33], "copy_rate": 0.3,
              "copy_interval": [0.27, 0.33], "fd": 10.0, "fd_interval": [9.0, 11.0],
              "class_agreement": 0.99}
    after = dict(before, memorization_rate=0.02, memorization_interval=[0.01, 0.03],
                 copy_rate=0.02, copy_interval=[0.01, 0.03], fd=10.5, fd_interval=[9.5, 11.5])
    noise = {"memorization_interval": [0.25, 0.31], "copy_interval": [0.25, 0.31]}
    held = {"relative": 0.05, "interval": [0.02, 0.08]}
    assert verdict(before, after, noise, held, {"beats": True}) == "mitigated"
    lost = {"relative": 0.05, "interval": [0.01, 0.12]}  # point within 10%, interval is not
    assert verdict(before, after, noise, lost, {"beats": True}) == "quality lost: FD"
    assert verdict(before, after, noise, held, {"beats": False}) == \
        "not beyond random at equal quality"


def test_the_ceiling_is_the_cut_of_a_method_that_leaves_no_copy():
    from dit_prune.run.experiment import equal_quality_entry

    before = {"fd": 10.0, "copy_rate": 0.3, "copy_interval": [0.27, 0.33]}
    after = {"fd": 13.0, "copy_rate": 0.1, "copy_interval": [0.08, 0.12]}
    entry = equal_quality_entry(before, after, _points(), "all", None)
    assert entry["max_cut_ratio"] == pytest.approx(0.3 / (0.3 - 0.225))  # 4x: random cut 0.075
    assert entry["copy_cut_ratio"] == pytest.approx(0.2 / 0.075)
    assert entry["copy_cut_ratio"] <= entry["max_cut_ratio"]
    # where random already removes two thirds of the copies, no method reaches 3x
    strong = [RandomPoint(s, 1, 10.0, 0.1) for s in range(3)]
    assert equal_quality_entry(before, {**after, "fd": 10.0}, strong,
                               "all", None)["max_cut_ratio"] == pytest.approx(1.5)


def test_a_scorer_fd_below_the_path_by_noise_meets_random_within_its_interval():
    # the scorer's FD 9.5 is below every random path (which starts at the unpruned 10.0), but its
    # own FD interval reaches 12.0: random's best up to there is its first budget (0.25, +-0.01),
    # not the unpruned model's 0.3 that the lowest-FD vertex would give
    eq = random_at_fd(_points(), 10.0, 0.3, fd=9.5, fd_upper=12.0)
    assert eq.clamped and not eq.unmatched and eq.fd_upper == 12.0
    assert eq.per_seed == pytest.approx((0.24, 0.25, 0.26))
    assert beats_random([0.10, 0.20], eq) and not beats_random([0.10, 0.245], eq)
    # an interval that stops before the path's first point: unmatched, never a win
    short = random_at_fd(_points(), 10.0, 0.3, fd=9.5, fd_upper=9.8)
    assert short.unmatched and not beats_random([0.0, 0.01], short)
    # a bound below the FD itself changes nothing where the FD is within the path
    inside = random_at_fd(_points(), 10.0, 0.3, fd=13.0, fd_upper=12.5)
    assert inside.rate == pytest.approx(0.225) and not inside.clamped


def test_the_run_bounds_the_scorer_fd_by_its_paired_interval():
    from dit_prune.run.experiment import equal_quality_entry

    before = {"fd": 10.0, "copy_rate": 0.3, "copy_interval": [0.28, 0.32]}
    after = {"fd": 9.5, "copy_rate": 0.15, "copy_interval": [0.12, 0.18]}
    entry = equal_quality_entry(before, after, _points(), "all",
                                {"relative": -0.05, "interval": [-0.2, 0.2]})
    assert entry["fd_upper"] == pytest.approx(12.0) and entry["clamped"]
    assert entry["rate"] == pytest.approx(0.25) and entry["beats"]
    assert entry["copy_cut_ratio"] == pytest.approx(0.15 / 0.05)

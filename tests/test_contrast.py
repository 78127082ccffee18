"""Class-matched activation contrast: the difference is taken within classes."""

import pytest
import torch

from dit_prune.errors import DitPruneError
from dit_prune.scorers import get_scorer
from dit_prune.scorers.contrast import class_matched_difference, standardized_difference


def test_class_matched_difference_removes_a_class_effect() -> None:
    # unit 0 tells the classes apart (class 1 is +3 everywhere), unit 1 is +1 on memorized
    # samples only; class 1 is memorized far more often than class 0
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 100 + [1] * 100)  # (200,)
    memorized = torch.zeros(200, dtype=torch.bool)
    memorized[:5] = True
    memorized[100:175] = True
    values = torch.randn(200, 2, generator=g, dtype=torch.float64)  # (N, U)
    values[labels == 1, 0] += 3.0
    values[memorized, 1] += 1.0
    pooled = standardized_difference(values[memorized], values[~memorized])  # (U,)
    matched = class_matched_difference(values, memorized, labels)  # (U,)
    assert pooled[0] > pooled[1]  # pooled over classes, the class unit ranks first
    assert matched[1] > matched[0] + 0.5  # within classes, the memorization unit does
    assert abs(float(matched[0])) < 0.5


def test_class_matched_difference_weights_by_memorized_counts() -> None:
    values = torch.tensor([[1.0], [0.0], [2.0], [4.0], [0.0], [2.0], [4.0]])
    memorized = torch.tensor([True, False, False, True, False, False, True])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    # class 0: (1 - 1) / sqrt(2) = 0 with weight 1; class 1: (4 - 1) / sqrt(2) with weight 2
    expected = 2 * 3.0 / 2 ** 0.5 / 3
    assert float(class_matched_difference(values, memorized, labels)) == pytest.approx(expected)


def test_class_matched_difference_needs_a_usable_class() -> None:
    values = torch.zeros(3, 1)
    with pytest.raises(DitPruneError, match="match_classes"):
        class_matched_difference(values, torch.tensor([True, False, True]),
                                 torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("options, message", [
    ({"match_classes": "yes"}, "match_classes must be true or false"),
    ({"match_classes": True, "reference": "heldout"}, "needs the samples reference"),
])
def test_match_classes_options_are_validated(options: dict, message: str) -> None:
    with pytest.raises(DitPruneError, match=message):
        get_scorer("activation-contrast", **options)


@pytest.mark.parametrize("options, message", [
    ({"window": "middle"}, "window must be one of"),
    ({"window": "early", "reference": "heldout"}, "needs the samples reference"),
])
def test_window_options_are_validated(options: dict, message: str) -> None:
    with pytest.raises(DitPruneError, match=message):
        get_scorer("activation-contrast", **options)


def test_windows_split_the_steps() -> None:
    from dit_prune.scorers.contrast import _TrajectoryStats

    stats = _TrajectoryStats.__new__(_TrajectoryStats)
    stats.cutoff, stats.seen = 500, {100, 300, 700, 900, 950}  # 2 late, 3 early steps
    stats.units = ["a", "b"]
    stats.slots = [type("Slot", (), {"units": ["a", "b"]})()]
    stats.sums = [torch.tensor([[10.0, 4.0]], dtype=torch.float64)]  # (N, U) over all steps
    stats.late = [torch.tensor([[4.0, 4.0]], dtype=torch.float64)]  # over the late steps
    ms = {w: stats.per_unit(w).pow(2) for w in ("all", "early", "late")}  # (N, U) mean squares
    assert torch.allclose(ms["late"], torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(ms["early"], torch.tensor([[2.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(5 * ms["all"], 3 * ms["early"] + 2 * ms["late"])

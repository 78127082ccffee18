"""`activation-contrast`: units whose activations stand out on memorized generations (NeMo-like).

In the spirit of Hintersdorf et al. 2024 (NeMo): generate `num_samples` images with fixed seeds
(DDIM, `sampling_steps`), split them into memorized and not by the ratio test against the
training images (docs/definitions.md#memorization-rate), and score each unit by the
standardized difference

    (mean over memorized samples - mean over the reference) / std over the reference

of its trajectory activation statistic: the RMS, over tokens and sampling steps, of what the
unit writes into the residual stream (its input channels times its down-projection columns;
conditional branch only under guidance). For a neuron this is |a| * ||w||, and since the
difference is standardized per unit, its input activation alone would rank the same.

The reference is the non-memorized samples, or, when fewer than `min_reference` samples are not
memorized (a model that copies almost everything), trajectories started from held-out images
noised to `contrast_t` and denoised from there; the memorized statistic is then taken over the
same steps (t <= contrast_t) so both groups cover the same noise levels. `reference` forces
one or the other ('samples' / 'heldout'); 'auto' chooses as above.

With `match_classes=True` (samples reference only) the difference is taken within each class
and averaged with the memorized samples' class counts as weights:
sum_c n_c (mean_c(memorized) - mean_c(reference)) / std_c(reference) / sum_c n_c. A model that
copies some classes' images more often than others would otherwise rank the units that tell
those classes apart as "memorization" units, and removing them costs quality and class
agreement rather than copies. Classes with fewer than 2 reference samples are skipped.

`window` picks the sampling steps the statistic of the samples reference is taken over: 'all',
'early' (t > contrast_t: where the sample's layout, and so whether it will be a copy, is
decided) or 'late' (t <= contrast_t: where its details are drawn). The held-out reference
always uses the late steps (it starts at contrast_t).

Example:
    >>> from dit_prune.scorers import get_scorer
    >>> scorer = get_scorer("activation-contrast", num_samples=40, reference="heldout")
    >>> scorer.contrast_t
    500
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dit_prune.errors import DitPruneError
from dit_prune.hooks import LayerSlot, observe, slot_column_index, unit_slots
from dit_prune.metrics.memorization import memorization_report
from dit_prune.scorers.base import Scorer, ScoringContext
from dit_prune.scorers.trajectories import (
    Trajectories,
    heldout_subset,
    run_trajectories,
    sample_plan,
    trajectory_space,
)
from dit_prune.units import Unit, adapter_for

REFERENCES = ("auto", "samples", "heldout")
WINDOWS = ("all", "early", "late")


@dataclass(frozen=True)
class SamplingOptions:
    """Mixin fields of the scorers that generate images (seeds come from `options.seed`)."""

    num_samples: int = 100
    sampling_steps: int = 50
    guidance_scale: float = 1.0

    def _check_sampling(self) -> None:
        if not isinstance(self.num_samples, int) or self.num_samples < 2:
            raise DitPruneError(f"num_samples must be an integer >= 2, got {self.num_samples!r}")
        if not isinstance(self.sampling_steps, int) or self.sampling_steps < 1:
            raise DitPruneError(f"sampling_steps must be positive, got {self.sampling_steps!r}")
        if not self.guidance_scale >= 0:
            raise DitPruneError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")


@dataclass(frozen=True)
class ActivationContrast(Scorer, SamplingOptions):
    """Standardized activation difference, memorized generations vs a reference."""

    name: ClassVar[str] = "activation-contrast"
    reference: str = "auto"
    contrast_t: int = 500
    min_reference: int = 16
    match_classes: bool = False
    window: str = "all"

    def __post_init__(self) -> None:
        self._check_sampling()
        if self.reference not in REFERENCES:
            raise DitPruneError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not isinstance(self.contrast_t, int) or self.contrast_t < 0:
            raise DitPruneError(f"contrast_t must be a non-negative integer, got {self.contrast_t}")
        if not isinstance(self.match_classes, bool):
            raise DitPruneError(f"match_classes must be true or false, got {self.match_classes!r}")
        if self.window not in WINDOWS:
            raise DitPruneError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.window != "all" and self.reference == "heldout":
            raise DitPruneError(f"window={self.window} needs the samples reference (reference="
                                "samples or auto), not reference=heldout")
        if self.match_classes and self.reference == "heldout":
            raise DitPruneError("match_classes needs the samples reference (reference=samples "
                                "or auto), not reference=heldout")

    def raw_scores(self, ctx: ScoringContext, units: list[Unit]) -> torch.Tensor:
        labels, seeds = sample_plan(ctx.data.train_labels, ctx.null_label, self.num_samples,
                                    ctx.options.seed)
        stats = _TrajectoryStats(ctx, units, len(seeds), self.contrast_t)
        run = stats.run(labels, seeds, self.sampling_steps, self.guidance_scale)
        memorized = memorization_report(run.samples, ctx.data.train_images,
                                        value_range=None).memorized  # (N,) latents too
        if not memorized.any():
            raise DitPruneError(
                f"none of {len(seeds)} samples is memorized (ratio test): activation-contrast "
                "needs memorized generations"
            )
        use_heldout = self.reference == "heldout" or (
            self.reference == "auto" and int((~memorized).sum()) < self.min_reference)
        if not use_heldout:
            values = stats.per_unit(self.window)  # (N, U)
            if self.match_classes:
                return class_matched_difference(values, memorized, labels)
            return standardized_difference(values[memorized], values[~memorized])
        if self.match_classes or self.window != "all":
            raise DitPruneError(
                f"match_classes / window: only {int((~memorized).sum())} of {len(seeds)} "
                f"samples are not memorized (need {self.min_reference}); raise num_samples")
        images, ref_labels = heldout_subset(ctx.data.heldout_images, ctx.data.heldout_labels,
                                            ctx.null_label, self.num_samples, ctx.options.seed)
        ref_seeds = [s + 500_000 for s in seeds[: len(images)]]
        ref = _TrajectoryStats(ctx, units, len(images), self.contrast_t)
        ref.run(ref_labels, ref_seeds, self.sampling_steps, self.guidance_scale, images)
        values = stats.per_unit("late")[memorized]  # (N_mem, U)
        return standardized_difference(values, ref.per_unit("late"))


def standardized_difference(group: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(mean(group) - mean(reference)) / std(reference), per column: (U,)."""
    if len(reference) < 2:
        raise DitPruneError(f"the reference group has {len(reference)} samples; need at least 2")
    spread = reference.std(0).clamp_min(1e-12)  # (U,)
    return (group.mean(0) - reference.mean(0)) / spread  # (U,)


def class_matched_difference(values: torch.Tensor, memorized: torch.Tensor,
                             labels: torch.Tensor) -> torch.Tensor:
    """Per-class standardized difference, memorized vs not, weighted by memorized counts: (U,).

    values: (N, U) per-sample statistic; memorized: (N,) bool; labels: (N,) class of each sample.

    Example:
        >>> v = torch.tensor([[1.0], [0.0], [2.0], [5.0], [4.0], [6.0]])
        >>> m = torch.tensor([True, False, False, True, False, False])
        >>> class_matched_difference(v, m, torch.tensor([0, 0, 0, 1, 1, 1]))
        tensor([0.])
    """
    total = torch.zeros(values.shape[1], dtype=values.dtype)  # (U,)
    weight = 0
    for c in torch.unique(labels[memorized]):
        in_class = labels == c  # (N,)
        group, reference = values[in_class & memorized], values[in_class & ~memorized]
        if len(reference) < 2:
            continue
        total += len(group) * standardized_difference(group, reference)
        weight += len(group)
    if weight == 0:
        raise DitPruneError("match_classes: no class has both memorized samples and 2 or more "
                            "reference samples; raise num_samples")
    return total / weight  # (U,)


class _TrajectoryStats:
    """Per-sample mean square of each unit's output contribution (its channels times its
    down-projection columns) accumulated along trajectories, over all steps and over the steps
    with t <= `cutoff`. A unit with several down sites (a joint head's image and text streams)
    sums the mean squares of its sites; a conv down site (channel dimension 1, e.g. Sana's
    GLUMBConv `conv_point`) counts its H·W positions as tokens and must be 1x1 (anything wider
    is refused with one line)."""

    def __init__(self, ctx: ScoringContext, units: list[Unit], count: int, cutoff: int) -> None:
        self.ctx = ctx
        self.units = units
        self.cutoff = cutoff
        self.slots = unit_slots(ctx.model, units)
        for slot in self.slots:
            _check_pointwise(ctx.model, slot)
        self.index = [slot_column_index(slot) for slot in self.slots]  # [(U_s, width)]
        sizes = [len(slot.units) for slot in self.slots]
        self.sums = [torch.zeros(count, n, dtype=torch.float64) for n in sizes]  # [(N, U_s)]
        self.late = [torch.zeros(count, n, dtype=torch.float64) for n in sizes]  # [(N, U_s)]
        self.seen: set[int] = set()  # timesteps run
        self.current: tuple[torch.Tensor, int] = (torch.empty(0, dtype=torch.long), 0)

    def run(self, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float,
            start_images: torch.Tensor | None = None) -> Trajectories:
        start_t = self.cutoff if start_images is not None else None
        shape, clamp = trajectory_space(self.ctx.data)
        with observe(self.ctx.model, self.units, self._record):
            return run_trajectories(
                self.ctx.model, self.ctx.scheduler, labels, seeds, steps, guidance,
                self.ctx.options.batch_size, before_step=self._before,
                start_images=start_images, start_t=start_t, progress=self.ctx.options.progress,
                shape=shape, clamp=clamp)

    def per_unit(self, window: str) -> torch.Tensor:
        """(N, U) RMS of each unit's output contribution over tokens and the window's steps
        ('all', 'late': t <= cutoff, 'early': t > cutoff)."""
        late = len([t for t in self.seen if t <= self.cutoff])
        steps = {"all": len(self.seen), "late": late, "early": len(self.seen) - late}[window]
        if steps == 0:
            side = "at or below" if window == "late" else "above"
            raise DitPruneError(f"no sampling step {side} t = {self.cutoff}")
        flat = {unit: i for i, unit in enumerate(dict.fromkeys(self.units))}
        owner = torch.tensor([flat[u] for slot in self.slots for u in slot.units],
                             dtype=torch.long)  # (sum U_s,) the unit of each slot column
        gather = torch.tensor([flat[u] for u in self.units], dtype=torch.long)  # (U,)
        if window == "early":
            sums = torch.cat([a - b for a, b in zip(self.sums, self.late, strict=True)], 1)
        else:
            sums = torch.cat(self.late if window == "late" else self.sums, 1)  # (N, sum U_s)
        per_unit = sums.new_zeros(len(sums), len(flat)).index_add_(1, owner, sums)  # (N, U')
        return (per_unit[:, gather] / steps).sqrt()  # (N, U)

    def _before(self, rows: torch.Tensor, step: int, t: int) -> None:
        self.current = (rows, t)
        self.seen.add(t)

    @torch.no_grad()
    def _record(self, s: int, slot: LayerSlot, x: torch.Tensor) -> None:
        rows, t = self.current
        x = x[: len(rows)].float()  # (B, T, D_in), conditional half; conv: (B, D_in, H, W)
        if slot.dim == 1:
            x = x.flatten(2).transpose(1, 2)  # (B, H·W, D_in): positions as tokens
        index = self.index[s].to(x.device)  # (U_s, width)
        weight = slot.layer.weight.float().flatten(1)[:, index]  # (D_out, U_s, width)
        if index.shape[1] == 1:  # neurons: rank one, |a| * ||w||
            ms = x.pow(2).mean(1)[:, index[:, 0]] * weight[..., 0].pow(2).mean(0)  # (B, U_s)
        else:
            out = torch.einsum("btuw,ouw->btuo", x[..., index], weight)  # (B, T, U_s, D_out)
            ms = out.pow(2).mean((1, 3))  # (B, U_s)
        ms = ms.double().cpu()
        self.sums[s][rows] += ms
        if t <= self.cutoff:
            self.late[s][rows] += ms


def _check_pointwise(model: torch.nn.Module, slot: LayerSlot) -> None:
    """Refuse a conv down site wider than 1x1: its output is no per-token matmul."""
    kernel = getattr(slot.layer, "kernel_size", (1, 1))
    if slot.dim == 1 and tuple(kernel) != (1,) * len(tuple(kernel)):
        raise DitPruneError(
            f"activation-contrast: {adapter_for(model).family} {slot.units[0].kind} units write "
            f"through a {'x'.join(map(str, kernel))} convolution; only 1x1 (pointwise) conv "
            "down-projections are supported")

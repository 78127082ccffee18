"""Quality guards, the noise control, and the verdict of a mitigation run
(docs/definitions.md#noise-control, #quality-guards, #verdict).

* class agreement: fraction of samples whose classifier label equals the conditioning label;
* noise control: the "before" samples plus Gaussian noise whose RMS equals, image by image, the
  RMS change between "before" and "after" on the same seeds (seeded; clamped to the image
  range, and the realized RMS after clamping is reported);
* verdict: "mitigated" only when, for both the memorization rate and the copy rate, the "after"
  interval lies entirely below the noise control's interval, the quality guards hold and (when
  random models were measured) the copy rate beats random pruning at equal FD.

Example:
    >>> before = {"memorization_rate": 0.8, "memorization_interval": [0.77, 0.83],
    ...           "copy_rate": 0.7, "copy_interval": [0.67, 0.73], "fd": 40.0,
    ...           "fd_interval": [38.0, 42.0], "class_agreement": 0.99}
    >>> after = dict(before, memorization_rate=0.1, memorization_interval=[0.08, 0.12],
    ...              copy_rate=0.5, copy_interval=[0.47, 0.53])
    >>> noise = {"memorization_rate": 0.5, "memorization_interval": [0.47, 0.53],
    ...          "copy_rate": 0.69, "copy_interval": [0.66, 0.72]}
    >>> verdict(before, after, noise)
    'mitigated'
    >>> verdict(before, dict(after, copy_interval=[0.6, 0.7]), noise)
    'not beyond noise control: copy rate'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dit_prune.errors import DitPruneError

FD_TOLERANCE = 0.10  # FD may not get worse by more than 10%
CLASS_AGREEMENT_TOLERANCE = 0.02  # class agreement may not drop by more than 2 points
MITIGATED = "mitigated"


@dataclass(frozen=True)
class ClassAgreement:
    rate: float
    predicted: torch.Tensor  # (N,) classifier labels
    agrees: torch.Tensor  # (N,) bool


def class_agreement(images: torch.Tensor, labels: torch.Tensor, classifier: Any) -> ClassAgreement:
    """Agreement of `classifier.predict(images)` (images in [-1, 1]) with conditioning `labels`.

    Example:
        >>> class Fake:
        ...     def predict(self, images): return torch.tensor([1, 2, 3])
        >>> class_agreement(torch.zeros(3, 1, 8, 8), torch.tensor([1, 2, 0]), Fake()).rate
        0.6666666666666666
    """
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()  # (N,)
    if len(labels) != len(images):
        raise DitPruneError(f"{len(images)} images but {len(labels)} conditioning labels")
    predicted = classifier.predict(images).cpu()  # (N,)
    agrees = predicted == labels  # (N,)
    return ClassAgreement(float(agrees.double().mean()) if len(agrees) else float("nan"),
                          predicted, agrees)


@dataclass(frozen=True)
class NoiseControlImages:
    images: torch.Tensor  # (N, C, H, W) "before" + matched noise, clamped
    target_rms: torch.Tensor  # (N,) RMS change between before and after (per image or global)
    realized_rms: torch.Tensor  # (N,) RMS of the noise actually added (after clamping)


def noise_control_images(
    before: torch.Tensor, after: torch.Tensor, seed: int = 0, per_image: bool = True,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> NoiseControlImages:
    """`before` + Gaussian noise with the RMS of (after - before); same seeds, same order.

    `per_image`: match each image's own RMS change (default) or the global RMS over all pixels.
    The noise is drawn from one generator seeded with `seed` and rescaled so its RMS is exact
    before clamping to `value_range` (the range samples live in: [0, 1] for sample_images).

    Example:
        >>> b = torch.full((2, 1, 4, 4), 0.5)
        >>> a = b + torch.tensor([0.1, 0.0]).view(2, 1, 1, 1)
        >>> control = noise_control_images(b, a)
        >>> [round(float(v), 4) for v in control.realized_rms]
        [0.1, 0.0]
    """
    if before.shape != after.shape:
        raise DitPruneError(f"before {tuple(before.shape)} and after {tuple(after.shape)} must "
                            "be the same images on the same seeds")
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        raise DitPruneError("before/after images contain NaN or infinite values")
    n = len(before)
    change = (after.double() - before.double()).reshape(n, -1)  # (N, P)
    target = change.pow(2).mean(1).sqrt()  # (N,)
    if not per_image:
        target = torch.full_like(target, float(change.pow(2).mean().sqrt()))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(change.shape, generator=gen, dtype=torch.float64)  # (N, P)
    noise = noise / noise.pow(2).mean(1, keepdim=True).sqrt() * target[:, None]  # exact RMS
    noisy = (before.double().reshape(n, -1) + noise).clamp(*value_range)  # (N, P)
    realized = (noisy - before.double().reshape(n, -1)).pow(2).mean(1).sqrt()  # (N,)
    return NoiseControlImages(noisy.reshape(before.shape).to(before.dtype), target.float(),
                              realized.float())


def _interval(metrics: Mapping[str, Any], key: str, who: str) -> tuple[float, float]:
    if key not in metrics or metrics[key] is None:
        raise DitPruneError(f"verdict: {who} has no {key!r}")
    low, high = (float(v) for v in metrics[key])
    return low, high


def verdict(before: Mapping[str, Any], after: Mapping[str, Any],
            noise_control: Mapping[str, Any], fd_change: Mapping[str, Any] | None = None,
            equal_quality: Mapping[str, Any] | None = None) -> str:
    """"mitigated", or which tests failed ("; "-separated).

    * not beyond noise control: <measures> -- for the memorization rate and the copy rate, the
      after interval's upper end must lie strictly below the noise control interval's lower end;
    * quality lost: FD -- with `fd_change` (the paired bootstrap of FD_after / FD_before - 1 on
      the same seeds, `fid.paired_fd_change`): the upper end of its interval exceeds +10%, i.e.
      quality must be shown to hold, not merely not shown to be lost. Without it (older callers):
      the lower end of the after FD's own interval exceeds 1.1 x the before FD;
    * quality lost: class agreement -- after < before - 0.02 (skipped when either is None);
    * not beyond random at equal quality -- with `equal_quality` (from
      `equal_quality.random_at_fd`, plus `beats`): the after copy-rate interval does not lie
      entirely below random pruning's interval at the same FD.
    NaN values fail the test they enter.
    """
    beyond = []
    for key, label in (("memorization", "memorization rate"), ("copy", "copy rate")):
        after_high = _interval(after, f"{key}_interval", "after")[1]
        noise_low = _interval(noise_control, f"{key}_interval", "noise control")[0]
        if not after_high < noise_low:
            beyond.append(label)
    lost = []
    if fd_change is not None:
        if not float(fd_change["interval"][1]) <= FD_TOLERANCE:
            lost.append("FD")
    else:
        fd_before = float(before.get("fd", math.nan))
        fd_low = _interval(after, "fd_interval", "after")[0] if after.get("fd_interval") else \
            float(after.get("fd", math.nan))
        if not fd_low <= (1 + FD_TOLERANCE) * fd_before:
            lost.append("FD")
    ca_before, ca_after = before.get("class_agreement"), after.get("class_agreement")
    if ca_before is not None and ca_after is not None and \
            not float(ca_after) >= float(ca_before) - CLASS_AGREEMENT_TOLERANCE - 1e-12:
        lost.append("class agreement")
    failures = []
    if beyond:
        failures.append("not beyond noise control: " + ", ".join(beyond))
    if lost:
        failures.append("quality lost: " + ", ".join(lost))
    if equal_quality is not None and not equal_quality.get("beats"):
        failures.append("not beyond random at equal quality")
    return "; ".join(failures) if failures else MITIGATED

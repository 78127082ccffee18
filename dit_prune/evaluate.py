"""The evaluator: memorization (ratio test + copy rate), FD, precision/recall, class agreement.

`evaluate_samples` is what `dit-prune eval` and `dit-prune run` call on generated images in
[0, 1]; everything it needs that does not depend on the samples (training and held-out images,
feature network, copy detector, held-out statistics, the calibrated copy threshold) is prepared
once in an `EvalContext` (`build_context`, or `digits_context` for the embedded default).

Scales: generated samples arrive in [0, 1] (as `sample_images` returns them) and are mapped to
[-1, 1], the scale of the training images, before any distance or network sees them.

Example:
    >>> ctx = digits_context()  # doctest: +SKIP
    >>> result = evaluate_samples(samples, labels, ctx)  # doctest: +SKIP
    >>> sorted(result.metrics)  # doctest: +SKIP
    ['class_agreement', 'copy_interval', 'copy_rate', 'fd', 'fd_interval', ...]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit_prune.data import check_images, digits_split
from dit_prune.errors import DitPruneError
from dit_prune.metrics.copydetect import (
    CopyDetector,
    CopyReport,
    calibrate_threshold,
    copy_report,
    load_copy_detector,
    nearest_cosine,
)
from dit_prune.metrics.features import FeatureExtractor, load_feature_extractor
from dit_prune.metrics.fid import FDResult, ReferenceSet, fd_report, reference_stats
from dit_prune.metrics.guards import class_agreement, noise_control_images
from dit_prune.metrics.memorization import MemorizationReport, memorization_report
from dit_prune.metrics.precision_recall import DEFAULT_K, precision_recall
from dit_prune.metrics.subsets import subset_metrics
from dit_prune.store.distributed import Processes, current_processes
from dit_prune.store.format import ReferenceStore
from dit_prune.store.reports import store_copy_report, store_memorization_report
from dit_prune.store.reuse import check_store
from dit_prune.store.search import store_nearest_cosine

METRIC_KEYS = ("memorization_rate", "memorization_interval", "copy_rate", "copy_interval", "fd",
               "fd_interval", "precision", "recall", "class_agreement", "num_samples")
NOISE_CONTROL_KEYS = ("memorization_rate", "memorization_interval", "copy_rate", "copy_interval")
FEATURES_DIR = "digits-features"
COPYDETECT_DIR = "digits-copydetect"


NEAR_COPY_THRESHOLD = 0.999  # a calibrated τ this high: held-out images copy training images


def near_copy_warning(threshold: float) -> str:
    """Why a copy threshold τ of ~1 makes the copy rate meaningless."""
    return (f"the copy threshold calibrated to τ = {threshold:.6f}: at least 1% of the held-out "
            "images are near-copies of training images (re-encoded or resized copies pass the "
            "exact-duplicate check), so copies go uncounted; use held-out images disjoint from "
            "the training set")


def no_classifier_warning(extractor: str) -> str:
    """Why class agreement is missing from a class-conditional evaluation, and what that costs."""
    return (f"class agreement not measured: the feature network `{extractor}` has no classifier "
            "head for the model's classes (a custom --features network gives features only), so "
            "the verdict's class-agreement guard is off")


def default_checkpoints_dir() -> Path:
    """`<repository>/checkpoints`, where the digits evaluation nets ship."""
    return Path(__file__).resolve().parents[1] / "checkpoints"


def evaluation_net_inputs(features: str | None, copy_detector: str | None) -> dict[str, str]:
    """The feature network and copy detector a command reads, as {option: path}: the given
    paths, or the shipped digits nets when left at their defaults, so that `--out` is checked
    against them too (an output may never sit inside an input).

    Example:
        >>> sorted(evaluation_net_inputs(None, "my-detector").items())[0][1]
        'my-detector'
    """
    root = default_checkpoints_dir()
    return {"--copy-detector": copy_detector or str(root / COPYDETECT_DIR),
            "--features": features or str(root / FEATURES_DIR)}


@dataclass(frozen=True)
class EvalContext:
    """Everything the evaluator needs that does not depend on the samples."""

    train_images: torch.Tensor  # (M, C, H, W) in [-1, 1], on `device`
    heldout_images: torch.Tensor  # (K, C, H, W) in [-1, 1]
    features: FeatureExtractor
    copy_detector: CopyDetector
    reference: ReferenceSet  # held-out feature statistics + a feature subset for P/R
    copy_threshold: float  # tau, calibrated on the held-out images against train_images
    heldout_copy_similarities: torch.Tensor  # (K,) held-out -> nearest training image
    train_embeddings: torch.Tensor  # (M, E) copy-detection embeddings of train_images
    classifier: Any | None  # has .predict(images) -> labels; None: no class agreement
    device: torch.device = torch.device("cpu")
    # named subsets of the training set (indices into train_images), each reported on its own
    subsets: dict[str, torch.Tensor] = field(default_factory=dict)
    # a reference store holding train_images and their embeddings (`dit-prune index`): the
    # ratio test and the copy rate search it instead of the tensors (same numbers)
    train_store: ReferenceStore | None = None
    # with a store under `accelerate launch`: the processes that split each search (all of
    # them evaluate the same samples in the same order, as `dit-prune run` does)
    processes: Processes | None = None

    def memorization(self, x: torch.Tensor, seed: int = 0,
                     progress: bool = False) -> MemorizationReport:
        """Ratio test of `x` (N, C, H, W) in [-1, 1] against the training images."""
        if self.train_store is not None:
            return store_memorization_report(x.to(self.device), self.train_store, seed=seed,
                                             progress=progress, processes=self.processes)
        return memorization_report(x.to(self.device), self.train_images, seed=seed,
                                   progress=progress)

    def copies(self, x: torch.Tensor, seed: int = 0) -> CopyReport:
        """Copy rate of `x` (N, C, H, W) in [-1, 1] at the context's tau."""
        if self.train_store is not None:
            return store_copy_report(x, self.train_store, self.copy_detector,
                                     threshold=self.copy_threshold, seed=seed,
                                     processes=self.processes)
        return copy_report(x, self.train_images, self.copy_detector,
                           threshold=self.copy_threshold, seed=seed,
                           train_embeddings=self.train_embeddings)

    @property
    def heldout_false_copy_rate(self) -> float:
        """Fraction of held-out real images called copies at tau (<= 1% by calibration)."""
        return float((self.heldout_copy_similarities >= self.copy_threshold).double().mean())

    def describe(self) -> dict[str, Any]:
        """Names and calibration, for reports."""
        return {
            "feature_extractor": self.features.name,
            "fd_name": "FID_inception" if self.features.name == "inception"
            else f"FD_{self.features.name}",
            "copy_detector": self.copy_detector.name,
            "copy_threshold": self.copy_threshold,
            "heldout_false_copy_rate": self.heldout_false_copy_rate,
            "num_train_images": len(self.train_images),
            "num_heldout_images": len(self.heldout_images),
            "reference_key": self.reference.key,
            **({"train_store": str(self.train_store.root.resolve()),
                "train_store_content_hash": self.train_store.content_hash}
               if self.train_store else {}),
        }


def build_context(
    train_images: torch.Tensor,
    heldout_images: torch.Tensor,
    features: FeatureExtractor,
    copy_detector: CopyDetector,
    classifier: Any | None | str = "features",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    subsets: dict[str, Any] | None = None,
    train_store: ReferenceStore | None = None,
) -> EvalContext:
    """Check the image sets, compute held-out statistics (cached) and calibrate tau.

    `classifier="features"` uses the feature network's `predict` when it has one (digitsnet).
    `subsets` names sets of training indices (e.g. the duplicated images) whose copy and
    memorization rates are reported on their own, with tau calibrated on the whole training set
    (`metrics.subsets`). `train_store`, a reference store of exactly `train_images` with
    embeddings by `copy_detector` (else a one-line DitPruneError, `store.reuse.check_store`),
    is searched instead of the tensors: same numbers, training set not re-embedded.

    Example:
        >>> ctx = build_context(train, heldout, extractor, detector)  # doctest: +SKIP
    """
    check_images(train_images, "training images")
    check_images(heldout_images, "held-out images", tuple(train_images.shape[1:]))
    if len(train_images) < 2:
        raise DitPruneError(f"the evaluator needs at least 2 training images, got "
                            f"{len(train_images)}")
    if train_store is not None:  # before any long work: its images, detector and shard files
        check_store(train_store, train_images, copy_detector)
    device = torch.device(device)
    reference = reference_stats(heldout_images, features, cache_dir, progress)
    processes = None
    if train_store is not None:  # the store's embeddings: no re-embedding, a bounded search
        processes = current_processes()
        fp = copy_detector.fingerprint
        train_emb = torch.cat([train_store.read_embeddings(fp, k)
                               for k in range(train_store.num_shards)])  # (M, E)
        held_sims, _ = store_nearest_cosine(copy_detector.embed(heldout_images), train_store,
                                            fp, processes=processes)  # (K,)
    else:
        train_emb = copy_detector.embed(train_images)  # (M, E)
        held_sims, _ = nearest_cosine(copy_detector.embed(heldout_images), train_emb)  # (K,)
    if classifier == "features":
        classifier = features if hasattr(features, "predict") else None
    return EvalContext(
        train_images=train_images.to(device),
        heldout_images=heldout_images,
        features=features,
        copy_detector=copy_detector,
        reference=reference,
        copy_threshold=calibrate_threshold(held_sims),
        heldout_copy_similarities=held_sims,
        train_embeddings=train_emb,
        classifier=classifier,
        device=device,
        subsets=_check_subsets(subsets or {}, len(train_images)),
        train_store=train_store,
        processes=processes,
    )


def _check_subsets(subsets: dict[str, Any], num_train: int) -> dict[str, torch.Tensor]:
    checked = {}
    for name, indices in subsets.items():
        idx = torch.as_tensor(list(indices), dtype=torch.long)  # (S,)
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= num_train:
            raise DitPruneError(f"training subset {name!r} must name indices in "
                                f"[0, {num_train - 1}]")
        checked[name] = idx
    return checked


def digits_context(
    train_images: torch.Tensor | None = None,
    heldout_images: torch.Tensor | None = None,
    checkpoints_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    subsets: dict[str, Any] | None = None,
) -> EvalContext:
    """The embedded default: digits-features + digits-copydetect from `checkpoints_dir`.

    Training images default to the whole 1,000-image pool, held-out images to the 797 held-out
    digits; pass a DiT's own training images (its checkpoint's pool indices) to evaluate it.
    """
    root = Path(checkpoints_dir) if checkpoints_dir else default_checkpoints_dir()
    split = digits_split()
    features = load_feature_extractor(root / FEATURES_DIR, device)
    detector = load_copy_detector(root / COPYDETECT_DIR, device)
    return build_context(
        split.pool_images if train_images is None else train_images,
        split.heldout_images if heldout_images is None else heldout_images,
        features, detector, "features", cache_dir, device, progress, subsets,
    )


@dataclass(frozen=True)
class Evaluation:
    """`metrics`: the JSON-ready dict (METRIC_KEYS, plus `subsets` when the context names any);
    the rest is for plots, reports and paired comparisons."""

    metrics: dict[str, Any]
    arrays: dict[str, np.ndarray]  # per-sample: ratios, nearest, similarities, ...
    memorization: MemorizationReport
    copy: CopyReport
    fd: FDResult
    warnings: list[str] = field(default_factory=list)
    features: torch.Tensor | None = None  # (N, D) extractor features, for paired comparisons


def to_model_scale(samples: torch.Tensor) -> torch.Tensor:
    """Generated images in [0, 1] -> [-1, 1] (the training images' scale), with checks."""
    if samples.ndim != 4:
        raise DitPruneError(f"samples: expected (N, C, H, W), got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise DitPruneError("samples contain NaN or infinite values")
    low, high = float(samples.min()), float(samples.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise DitPruneError(f"samples span [{low:.3g}, {high:.3g}]; evaluate_samples takes "
                            "images in [0, 1] (as sample_images returns them)")
    return (samples.float() * 2 - 1).clamp(-1, 1)  # (N, C, H, W); clamp rounding only


def evaluate_samples(
    samples: torch.Tensor,
    labels: torch.Tensor | None,
    context: EvalContext,
    seed: int = 0,
    fd_resamples: int = 200,
    k: int = DEFAULT_K,
    progress: bool = False,
) -> Evaluation:
    """Measure generated `samples` (N, C, H, W) in [0, 1] conditioned on `labels` (N,) or None.

    metrics: memorization_rate/_interval (ratio test), copy_rate/_interval (tau from the
    context), fd/_interval (against held-out statistics), precision, recall (k-NN, held-out),
    class_agreement (None without a classifier or labels), num_samples.
    """
    x = to_model_scale(samples)  # (N, C, H, W) in [-1, 1]
    shape = tuple(context.train_images.shape[1:])
    check_images(x, "samples", shape)
    if labels is not None and len(labels) != len(x):
        raise DitPruneError(f"{len(x)} samples but {len(labels)} labels")
    notes: list[str] = []
    mem = context.memorization(x, seed=seed, progress=progress)
    copy = context.copies(x, seed=seed)
    feats = context.features.features(x)  # (N, D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fd = fd_report(feats, context.reference.stats, context.features.name, fd_resamples, seed)
    notes += [str(w.message) for w in caught]
    if len(feats) > k and len(context.reference.features) > k:
        precision, recall = precision_recall(context.reference.features, feats, k)
    else:
        precision = recall = None
        notes.append(f"precision/recall need more than k={k} samples; got {len(feats)}")
    if context.copy_threshold >= NEAR_COPY_THRESHOLD:
        notes.append(near_copy_warning(context.copy_threshold))
    if labels is not None and context.classifier is None:
        notes.append(no_classifier_warning(context.features.name))
    agreement = None
    arrays: dict[str, np.ndarray] = {
        "ratios": mem.ratios.numpy(), "d1": mem.d1.numpy(), "d2": mem.d2.numpy(),
        "nearest": mem.nearest.numpy(), "memorized": mem.memorized.numpy(),
        "copy_similarities": copy.similarities.numpy(), "copy_nearest": copy.nearest.numpy(),
        "copies": copy.copies.numpy(),
    }
    if labels is not None and context.classifier is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        result = class_agreement(x, labels, context.classifier)
        agreement = result.rate
        arrays.update(labels=labels.numpy(), predicted=result.predicted.numpy())
    for note in notes:
        warnings.warn(note, stacklevel=2)
    metrics = {
        "memorization_rate": mem.rate,
        "memorization_interval": list(mem.interval),
        "copy_rate": copy.rate,
        "copy_interval": list(copy.interval),
        "fd": fd.value,
        "fd_interval": list(fd.interval),
        "precision": precision,
        "recall": recall,
        "class_agreement": agreement,
        "num_samples": len(x),
    }
    if context.subsets:
        metrics["subsets"] = {name: subset_metrics(arrays, idx, seed)
                              for name, idx in context.subsets.items()}
    return Evaluation(metrics, arrays, mem, copy, fd, notes, feats)


def evaluate_noise_control(
    before: torch.Tensor, after: torch.Tensor, context: EvalContext, seed: int = 0,
    per_image: bool = True,
) -> dict[str, Any]:
    """Both memorization measures on `before` + noise matching the before->after RMS change.

    `before`, `after`: (N, C, H, W) in [0, 1] on the same seeds. Returns NOISE_CONTROL_KEYS plus
    `noise_rms` (mean realized RMS, [0, 1] scale) and `target_rms`.
    """
    control = noise_control_images(before, after, seed, per_image, (0.0, 1.0))
    x = to_model_scale(control.images)  # (N, C, H, W)
    mem = context.memorization(x, seed=seed)
    copy = context.copies(x, seed=seed)
    return {
        "memorization_rate": mem.rate,
        "memorization_interval": list(mem.interval),
        "copy_rate": copy.rate,
        "copy_interval": list(copy.interval),
        "noise_rms": float(control.realized_rms.mean()),
        "target_rms": float(control.target_rms.mean()),
    }

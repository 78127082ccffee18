"""The whole before/after experiment of `dit-prune run`, as one function.

Example:
    >>> cfg = RunConfig("checkpoints/digits-memorized", out="runs/demo")  # doctest: +SKIP
    >>> report = run_experiment(cfg)  # doctest: +SKIP
    >>> report["verdict"]  # doctest: +SKIP
    'not beyond noise control: memorization rate'
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dit_prune.checkpoint import LoadedDiT, load_dit
from dit_prune.commands.common import pick_device
from dit_prune.data import check_fits_model, digits_split, load_image_folder
from dit_prune.errors import DitPruneError
from dit_prune.evaluate import (
    EvalContext,
    Evaluation,
    build_context,
    evaluate_noise_control,
    evaluate_samples,
)
from dit_prune.metrics.bootstrap import shared_resamples
from dit_prune.metrics.equal_quality import (
    RandomPoint,
    beats_random,
    copy_cut_ratio,
    random_at_fd,
)
from dit_prune.metrics.fid import paired_fd_change
from dit_prune.metrics.guards import verdict
from dit_prune.metrics.netio import weights_fingerprint
from dit_prune.metrics.subsets import target_copy_rate
from dit_prune.prediction import Prediction
from dit_prune.pruning import prune_units, select_units
from dit_prune.pruning.recovery_data import GENERATED_NOVEL, recovery_images
from dit_prune.pruning.selection import model_mode_kinds
from dit_prune.run.config import RunConfig
from dit_prune.run.measure import latency_seconds, macs_and_params
from dit_prune.run.recovery import RunRecovery, prepare_recovery
from dit_prune.run.retrigger import retrigger_probe
from dit_prune.run.shards import ShardStore
from dit_prune.run.text import is_text_checkpoint
from dit_prune.sampling import sample_images
from dit_prune.scorers import (
    CalibrationData,
    get_scorer,
    load_scores,
    save_scores,
    scoring_code_fingerprint,
)
from dit_prune.scorers.calibration import refuse_heldout_duplicates
from dit_prune.store.format import ReferenceStore, open_store
from dit_prune.store.reuse import check_store
from dit_prune.units import enumerate_units


@dataclass
class Arm:
    """One evaluated model on the run's seeds: its metrics, images and evaluation."""

    name: str
    metrics: dict[str, Any]
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    evaluation: Evaluation


@dataclass(frozen=True)
class RunInputs:
    """Everything validated before any long work starts."""

    loaded: LoadedDiT
    train_images: torch.Tensor  # (M, C, H, W) in [-1, 1]
    train_labels: torch.Tensor | None
    heldout_images: torch.Tensor  # (K, C, H, W)
    heldout_labels: torch.Tensor | None
    device: torch.device
    # (R, C, H, W) in [-1, 1]; None: no recovery, or generated-novel (drawn by the run)
    recovery_images: torch.Tensor | None = None
    recovery_labels: torch.Tensor | None = None
    # text-to-image runs: a dit_prune.run.text.TextRun (labels are then caption labels)
    text: Any = None
    train_store: ReferenceStore | None = None  # --train-store, opened, its images checked


def prepare_inputs(cfg: RunConfig) -> RunInputs:
    """Load and check the checkpoint and the data sets; raises DitPruneError on bad input."""
    loaded = load_dit(cfg.checkpoint)
    meta = loaded.meta
    if not meta.num_classes and is_text_checkpoint(cfg.checkpoint):
        from dit_prune.run.text import text_run_inputs

        return text_run_inputs(cfg, loaded)
    if not meta.num_classes:
        raise DitPruneError("dit-prune run needs a class-conditional DiT or a text-to-image "
                            "pipeline directory")
    if meta.num_classes != cfg.num_classes:
        raise DitPruneError(f"the checkpoint has {meta.num_classes} classes, the run was given "
                            f"{cfg.num_classes}")
    if cfg.train:
        folder = load_image_folder(cfg.train)
        train_images, train_labels = folder.images, folder.labels
    else:
        train_images, train_labels, _ = recovery_images(meta.extra, "train")
    if cfg.heldout:
        folder = load_image_folder(cfg.heldout)
        heldout_images, heldout_labels = folder.images, folder.labels
    else:
        split = digits_split()
        heldout_images, heldout_labels = split.heldout_images, split.heldout_labels
    expected = (meta.channels, meta.image_size, meta.image_size)
    named = ((f"training images (--train {cfg.train})" if cfg.train else "training images",
              train_images),
             (f"held-out images (--heldout {cfg.heldout})" if cfg.heldout else "held-out images",
              heldout_images))
    for (what, images), labels in zip(named, (train_labels, heldout_labels), strict=True):
        if tuple(images.shape[1:]) != expected and meta.pipeline_dir is None:
            raise DitPruneError(f"{what} are {tuple(images.shape[1:])} but the model makes "
                                f"{expected} (C, H, W)")
        if meta.pipeline_dir is None:  # labels within the model's classes, before sampling
            check_fits_model(images, labels, loaded.model, what)
    refuse_heldout_duplicates(train_images, heldout_images)  # before sampling, not at scoring
    recovery, recovery_labels = _recovery_data(cfg, meta.extra, train_images, train_labels)
    if cfg.recover == "finetune" and recovery_labels is None:
        raise DitPruneError(f"fine-tuning needs labelled images, but {cfg.recover_data} has none "
                            "(use class subfolders, or --recover distill)")
    if recovery is not None and tuple(recovery.shape[1:]) != tuple(train_images.shape[1:]):
        raise DitPruneError(f"recovery images ({cfg.recover_data}) are "
                            f"{tuple(recovery.shape[1:])} but the training images are "
                            f"{tuple(train_images.shape[1:])}")
    if recovery is not None and meta.pipeline_dir is None:  # labels too, before sampling
        check_fits_model(recovery, recovery_labels, loaded.model,
                         f"recovery images (--recover-data {cfg.recover_data})")
    store = open_store(cfg.train_store) if cfg.train_store else None
    if store is not None:  # its images now; the copy detector's embeddings in build_context
        check_store(store, train_images)
    return RunInputs(loaded, train_images, train_labels, heldout_images, heldout_labels,
                     pick_device(cfg.device), recovery, recovery_labels, train_store=store)


def _recovery_data(cfg: RunConfig, extra: dict[str, Any], train_images: torch.Tensor,
                   train_labels: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The images recovery trains on: none without recovery (or generated-novel, which the run
    draws from the unpruned model once its copy detector is ready), the run's training images for
    'train', otherwise what `recovery_images` finds (unused digits, held-out, a folder)."""
    if cfg.recover == "none" or cfg.recover_data == GENERATED_NOVEL:
        return None, None
    if cfg.recover_data == "train":
        return train_images, train_labels
    images, labels, _ = recovery_images(extra, cfg.recover_data)
    return images, labels


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # dit_prune/


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Collect the warnings dit_prune raises inside the block (FD on too few samples, ...):
    each message once, in the yielded list (for the report), and printed once to stderr as
    `warning: ...`. Other libraries' warnings are shown as usual."""
    found: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.filterwarnings("always", category=UserWarning, module=r"dit_prune(\.|$)")

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
            if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(
                    PACKAGE_DIR):
                text = str(message)
                if text not in found:
                    found.append(text)
                    tqdm.write(f"warning: {text}", file=sys.stderr)  # clear of the bars
                return
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield found


def run_experiment(cfg: RunConfig, inputs: RunInputs | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run every stage and return the report dict (also used for report.json); its `warnings`
    lists what the measurements warned about, each once (`collected_warnings`). The bootstrap
    intervals of its arms share their resample counts (`shared_resamples`: same numbers, one
    multinomial draw per sample count instead of one per interval)."""
    with collected_warnings() as found, shared_resamples():
        result = _run_experiment(cfg, inputs, progress)
    result["warnings"] = found
    return result


def _run_experiment(cfg: RunConfig, inputs: RunInputs | None,
                    progress: bool) -> dict[str, Any]:
    inputs = inputs or prepare_inputs(cfg)
    if cfg.recover != "none" and inputs.recovery_images is None and \
            cfg.recover_data != GENERATED_NOVEL:
        raise DitPruneError("these inputs were prepared for a run without recovery; call "
                            "prepare_inputs with the recovery's config")
    run_dir = Path(cfg.out)
    base, scheduler, meta = inputs.loaded
    base = base.to(inputs.device).eval()
    seeds, text = cfg.seed_list(), inputs.text
    labels = text.seed_labels(seeds) if text else cfg.labels()  # (N,) caption labels for text
    classes = text.seed_classes(seeds) if text else labels  # what class agreement checks
    condition = text.condition if text else _unconditioned
    store = ShardStore(run_dir / "samples", cfg.shard_size)
    target = target_subset(cfg, meta.extra, len(inputs.train_images))
    check_reachable(cfg, base)  # before any sampling, for every caller (scripts too)
    context = build_context(inputs.train_images, inputs.heldout_images, *evaluation_nets(cfg),
                            cache_dir=run_dir / "cache", device=inputs.device,
                            subsets={target[0]: target[1]} if target else None,
                            train_store=inputs.train_store)
    latent = text is not None and text.latent
    decode = text.decode if latent else None  # latent: the VAE
    shape = text.model_shape if latent else None  # (c, h, w) of a latent model's input
    sampler = Sampler(cfg, scheduler, store, labels, seeds, progress, condition, decode, shape)
    before = _evaluate("before", sampler(base, "before", meta.weights_sha256), classes, context)
    kinds = list(model_mode_kinds(cfg.budget_mode, base))  # both/params: heads and neurons
    units = enumerate_units(base, kinds)
    data = scoring_data(inputs, target)
    scores = _cached_scores(run_dir / "scores" / cfg.scorer, cfg.scorer,
                            {"seed": cfg.seed, **cfg.scorer_options}, base, units, data,
                            scheduler, meta.weights_sha256, progress, condition)
    base_cost = macs_and_params(base)
    with condition(base):
        base_latency = latency_seconds(base, scheduler, cfg, labels, shape=shape)
    before.metrics.update(params=base_cost["params"], macs=base_cost["macs"],
                          latency_s=base_latency)
    probe = retrigger_probe(cfg, inputs, target, context)  # None: --retrigger-targets 0
    if probe is not None:
        with condition(base):
            before.metrics.update(probe(base))
    recovery = prepare_recovery(cfg, inputs, base, context, sampler, target, before)

    def measured(model: nn.Module, tag: str, timed: bool = True, attacked: bool = True) -> Arm:
        """Evaluate a pruned model; `timed`: measure its latency, `attacked`: its re-trigger
        success (both only for the table's arms)."""
        arm = _evaluate(tag, sampler(model, tag, weights_fingerprint(model)), classes, context)
        cost = macs_and_params(model)
        with condition(model):
            latency = latency_seconds(model, scheduler, cfg, labels, shape=shape) if timed \
                else None
            if attacked and probe is not None:
                arm.metrics.update(probe(model))
        arm.metrics.update(params=cost["params"], macs=cost["macs"], latency_s=latency)
        return arm

    control = None  # the unpruned model given the same recovery, on the same seeds
    if recovery is not None:
        control_arm = measured(recovery.apply(copy.deepcopy(base), "control"), "control")
        control = {"arm": control_arm,
                   "fd_change": _fd_change(before, control_arm, context, cfg.seed)}
    first_seed = cfg.random_seeds[0]
    randoms: dict[tuple[int, float], Arm] = {}
    random_plans: dict[tuple[int, float], Any] = {}
    for random_seed in cfg.random_seeds:
        seed_scores = _cached_scores(run_dir / "scores" / f"random-s{random_seed}", "random",
                                     {"seed": random_seed}, base, units, data, scheduler,
                                     meta.weights_sha256, progress, condition)
        for budget in tqdm(cfg.random_budget_list(), desc=f"random seed {random_seed}",
                           disable=not progress):
            model, plan = _pruned_copy(base, units, seed_scores, budget, cfg, recovery,
                                       f"random_s{random_seed}_{budget:g}")
            randoms[random_seed, budget] = measured(  # latency: only the table's random arm
                model, f"random_s{random_seed}_{budget:g}", timed=random_seed == first_seed,
                attacked=random_seed == first_seed and budget in cfg.budgets)
            random_plans[random_seed, budget] = plan
    target_name = target[0] if target else "all"
    curve = [RandomPoint(s, b, arm.metrics["fd"], target_copy_rate(arm.metrics, target_name)[0])
             for (s, b), arm in randoms.items()]
    entries = []
    for budget in tqdm(cfg.budgets, desc="budgets", disable=not progress):
        entry: dict[str, Any] = {"budget": budget}
        model, entry["after_plan"] = _pruned_copy(base, units, scores, budget, cfg, recovery,
                                                  f"after_{budget:g}")
        entry["model"] = model
        entry["after"] = after = measured(model, f"after_{budget:g}")
        if (first_seed, budget) not in randoms:  # random at the same budget, for the table
            random_model, random_plans[first_seed, budget] = _pruned_copy(
                base, units, _cached_scores(run_dir / "scores" / f"random-s{first_seed}",
                                            "random", {"seed": first_seed}, base, units, data,
                                            scheduler, meta.weights_sha256, progress, condition),
                budget, cfg, recovery, f"random_s{first_seed}_{budget:g}")
            randoms[first_seed, budget] = measured(random_model,
                                                   f"random_s{first_seed}_{budget:g}")
        entry["random_baseline"] = randoms[first_seed, budget]
        entry["random_baseline_plan"] = random_plans[first_seed, budget]
        entry["noise_control"] = evaluate_noise_control(before.images, after.images,
                                                        context, seed=cfg.seed)
        entry["fd_change"] = _fd_change(before, after, context, cfg.seed)
        entry["equal_quality"] = equal_quality_entry(before.metrics, after.metrics, curve,
                                                     target_name, entry["fd_change"])
        entry["verdict"] = verdict(before.metrics, after.metrics, entry["noise_control"],
                                   entry["fd_change"], entry["equal_quality"])
        random_arm = entry["random_baseline"]
        entry["random_fd_change"] = _fd_change(before, random_arm, context, cfg.seed)
        entry["random_verdict"] = verdict(
            before.metrics, random_arm.metrics,
            evaluate_noise_control(before.images, random_arm.images, context, seed=cfg.seed),
            entry["random_fd_change"])
        entries.append(entry)
    return {"before": before, "entries": entries, "context": context, "config": cfg,
            "meta": meta, "seeds": seeds, "units": units,
            "labels": labels if classes is None else classes,  # text: the digit, not the caption
            "random_curve": curve, "target": target_name,
            "retrigger": probe.describe() if probe is not None else None,
            "recovery": recovery.describe() if recovery is not None else None,
            "control": control, "text": text,
            "prediction": Prediction.from_scheduler(scheduler).kind}  # the sampler's steps


def scoring_data(inputs: RunInputs, target: tuple[str, list[int]] | None) -> CalibrationData:
    """What scorers contrast with held-out images: the targeted training images (the duplicated
    ones) when the run targets a subset, else the whole training set; in the transformer's
    input space (a latent text-to-image run's encoded images)."""
    images, labels, heldout = inputs.train_images, inputs.train_labels, inputs.heldout_images
    if inputs.text is not None and inputs.text.latent:
        images, heldout = inputs.text.model_train, inputs.text.model_heldout
    if target is not None:
        idx = torch.as_tensor(target[1], dtype=torch.long)  # (S,)
        images, labels = images[idx], None if labels is None else labels[idx]
    return CalibrationData(images, labels, heldout, inputs.heldout_labels)


def target_subset(cfg: RunConfig, extra: dict[str, Any],
                  num_train: int) -> tuple[str, list[int]] | None:
    """("duplicated", training positions) when the run counts copies of the duplicated images,
    None when it counts copies of any training image."""
    data = extra.get("data") if isinstance(extra, dict) else None
    duplicated = data.get("duplicated") if isinstance(data, dict) and not cfg.train else None
    if cfg.target == "all" or (cfg.target == "auto" and not duplicated):
        return None
    if not duplicated:
        raise DitPruneError("--target duplicated: the checkpoint records no duplicated images "
                            "(train it with dit-prune train --duplicate)")
    positions = [int(i) for i in duplicated.get("train_positions", [])]
    if not positions or min(positions) < 0 or max(positions) >= num_train:
        raise DitPruneError("the checkpoint's duplicated training positions are missing or "
                            "invalid")
    return "duplicated", positions


def equal_quality_entry(before: dict[str, Any], after: dict[str, Any],
                        curve: list[RandomPoint], target: str,
                        fd_change: dict[str, Any] | None) -> dict[str, Any]:
    """Random's copy rate on `target` ("all" or a subset name) at the after model's FD, the
    rule and the copy-cut ratio. `fd_change` (the paired FD change vs before) bounds the
    scorer's FD from above where its FD is below a whole random path (`random_at_fd`)."""
    before_rate = target_copy_rate(before, target)[0]
    upper = None if fd_change is None else before["fd"] * (1 + float(fd_change["interval"][1]))
    random = random_at_fd(curve, before["fd"], before_rate, after["fd"], upper)
    after_rate, after_interval = target_copy_rate(after, target)
    return {**random.to_json(), "target": target,
            "scorer_rate": after_rate, "scorer_interval": after_interval,
            "beats": beats_random(after_interval, random),
            "copy_cut_ratio": copy_cut_ratio(before_rate, after_rate, random),
            # what a method leaving no copies at this FD would get: above it no method can go
            "max_cut_ratio": copy_cut_ratio(before_rate, 0.0, random),
            "num_random_seeds": len(random.per_seed)}


def _fd_change(before: Arm, after: Arm, context: EvalContext, seed: int) -> dict[str, Any]:
    change = paired_fd_change(before.evaluation.features, after.evaluation.features,
                              context.reference.stats, seed=seed)
    return {"relative": change.relative, "interval": list(change.interval),
            "num_resamples": change.num_resamples}


class Sampler:
    """Draws (or reloads) the run's images for a model under a tag, with one seed per image."""

    def __init__(self, cfg: RunConfig, scheduler: Any, store: ShardStore,
                 labels: torch.Tensor, seeds: list[int], progress: bool = True,
                 condition: Callable[[nn.Module], AbstractContextManager] | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 shape: tuple[int, int, int] | None = None) -> None:
        self.cfg, self.scheduler, self.store = cfg, scheduler, store
        self.labels, self.seeds, self.progress = labels, seeds, progress
        self.condition = condition or _unconditioned  # text runs: caption labels
        self.decode = decode  # latent text runs: the pipeline's VAE decoder
        self.shape = shape  # latent text runs: (c, h, w) of one model input

    def __call__(self, model: nn.Module, tag: str, model_hash: str,
                 labels: torch.Tensor | None = None,
                 seeds: list[int] | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] for the run's seeds and labels, or the given ones."""
        cfg = self.cfg
        fingerprint = f"{model_hash}|{cfg.steps}|{cfg.sampler}|{cfg.guidance_scale}"

        def draw(labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
            with self.condition(model):
                return sample_images(model, self.scheduler, labels, seeds, steps=cfg.steps,
                                     guidance_scale=cfg.guidance_scale, sampler=cfg.sampler,
                                     batch_size=cfg.batch_size, decode=self.decode,
                                     progress=False, shape=self.shape)

        return self.store.sample(tag, draw, self.labels if labels is None else labels,
                                 self.seeds if seeds is None else seeds, fingerprint,
                                 self.progress)


def _unconditioned(model: nn.Module) -> AbstractContextManager:
    """The class-conditional runs' condition: none (labels go to the model as they are)."""
    return nullcontext()


def _evaluate(name: str, images: torch.Tensor, labels: torch.Tensor | None,
              context: EvalContext) -> Arm:
    evaluation = evaluate_samples(images, labels, context)
    return Arm(name, dict(evaluation.metrics), images, evaluation)


def _pruned_copy(base: nn.Module, units: list, scores: torch.Tensor, budget: float,
                 cfg: RunConfig, recovery: RunRecovery | None,
                 tag: str) -> tuple[nn.Module, Any]:
    model = copy.deepcopy(base)
    chosen = select_units(units, scores, budget, mode=cfg.budget_mode, model=model)
    plan = prune_units(model, chosen)
    if recovery is not None:
        model = recovery.apply(model, tag)
    return model.eval(), plan


def check_reachable(cfg: RunConfig, model: nn.Module) -> None:
    """Refuse (one line, `select_units`) a scorer or random budget that the block rule cannot
    reach on `model`: every block keeps one unit of each kind. `params` budgets are capped by
    their own rule and are not checked here."""
    if cfg.budget_mode == "params":
        return
    units = enumerate_units(model, list(model_mode_kinds(cfg.budget_mode, model)))
    for budget in (*cfg.budgets, *cfg.random_budget_list()):
        select_units(units, [0.0] * len(units), budget, mode=cfg.budget_mode, model=model)


def _cached_scores(folder: Path, name: str, options: dict[str, Any], model: nn.Module,
                   units: list, data: CalibrationData, scheduler: Any, model_hash: str,
                   progress: bool,
                   condition: Callable[[nn.Module], AbstractContextManager] | None = None
                   ) -> torch.Tensor:
    key = {"scorer": name, "options": options, "model": model_hash,
           "units": [u.to_json() for u in units], "code": scoring_code_fingerprint()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    from dit_prune.store.distributed import partial_state

    state = partial_state()
    if state.is_main_process and not _cache_hit(folder, digest, units):
        scorer = get_scorer(name, progress=progress, **options)
        started = time.perf_counter()
        with (condition or _unconditioned)(model):
            result = scorer.compute(model, units, data, scheduler)
        save_scores(folder, units, result.scores,
                    {"scorer": name, "options": options, "cache_key": digest,
                     "seconds": round(time.perf_counter() - started, 2)}, raw=result.raw,
                    model={"weights_sha256": model_hash})
    state.wait_for_everyone()  # other processes read what the main process scored
    return load_scores(folder).scores


def _cache_hit(folder: Path, digest: str, units: list) -> bool:
    if not (folder / "scores.json").is_file():
        return False
    saved = load_scores(folder)
    return saved.config.get("cache_key") == digest and saved.units == units


def evaluation_nets(cfg: RunConfig) -> tuple[Any, Any]:
    """(feature extractor, copy detector) of the run: its options, else the shipped digits nets."""
    from dit_prune.evaluate import default_checkpoints_dir
    from dit_prune.metrics.copydetect import load_copy_detector
    from dit_prune.metrics.features import load_feature_extractor

    root = default_checkpoints_dir()
    features = load_feature_extractor(cfg.features or root / "digits-features")
    detector = load_copy_detector(cfg.copy_detector or root / "digits-copydetect")
    return features, detector

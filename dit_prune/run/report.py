"""Turn the experiment's results into report.json, report.md, the pictures and a summary.

report.json carries the keys of docs/definitions.md#report-keys at the top level for the first
budget, and every budget under "budgets".

Example:
    >>> fmt_rate(0.25, [0.2, 0.3])
    '25.0% [20.0, 30.0]'
    >>> fmt_rate(0.65, [None, None])
    '65.0% [no interval]'
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dit_prune.checkpoint import atomic_write_text
from dit_prune.metrics.subsets import target_copy_rate
from dit_prune.run.figures import before_after_grid
from dit_prune.run.measure import LATENCY_BATCH
from dit_prune.run.tradeoff import tradeoff_plot

METRIC_ROWS = (
    ("memorization_rate", "memorization rate (ratio test)"),
    ("copy_rate", "copy rate (copy detector)"),
    ("fd", "FD"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("class_agreement", "class agreement"),
    ("params", "parameters"),
    ("macs", "MACs / forward"),
    ("latency_s", f"latency, {LATENCY_BATCH} images (s)"),  # median of LATENCY_REPEATS draws
)


def build_report(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready report (docs/definitions.md#report-keys, first budget; all budgets listed)."""
    cfg, ctx, before = result["config"], result["context"], result["before"]
    names = ctx.describe()
    budgets = [_budget_entry(e) for e in result["entries"]]
    first = budgets[0]
    control = result.get("control")  # the unpruned model given the same recovery
    return _plain({
        "scorer": cfg.scorer,
        "budget": first["budget"],
        "budget_mode": cfg.budget_mode,
        "units_removed": first["units_removed"],
        "feature_extractor": names["feature_extractor"],
        "fd_name": names["fd_name"],
        "copy_detector": names["copy_detector"],
        "copy_threshold": names["copy_threshold"],
        "heldout_false_copy_rate": names["heldout_false_copy_rate"],
        "num_samples": len(result["seeds"]),
        "seeds": cfg.to_json()["seeds"],
        "sampler": cfg.sampler,
        "prediction": result.get("prediction", "epsilon"),  # flow: the scheduler's Euler steps
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "recover": cfg.recover,
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": result["meta"].weights_sha256,
        "num_train_images": names["num_train_images"],
        "num_heldout_images": names["num_heldout_images"],
        "before": before.metrics,
        "after": first["after"],
        "noise_control": first["noise_control"],
        "random_baseline": first["random_baseline"],
        "verdict": first["verdict"],
        "random_verdict": first["random_verdict"],
        "fd_change": first["fd_change"],
        "equal_quality": first["equal_quality"],
        "target": result["target"],
        "random_seeds": list(cfg.random_seeds),
        "random_curve": [asdict(p) for p in result["random_curve"]],
        "retrigger": result.get("retrigger"),
        "recovery": result.get("recovery"),
        "control": control["arm"].metrics if control else None,
        "control_fd_change": control["fd_change"] if control else None,
        "budgets": budgets,
        "text": _text_description(result),
        "train_store": _store_description(ctx),
        "warnings": run_warnings(result, names),
    })


def _text_description(result: dict[str, Any]) -> dict[str, Any] | None:
    """What a text-to-image run conditioned on (None for a class-conditional run)."""
    text = result.get("text")
    if text is None:
        return None
    return {"num_rows": len(text.rows), "num_distinct_prompts": len(set(text.rows.captions)),
            "classes_known": text.row_classes is not None,
            "latent": bool(getattr(text, "latent", False))}


def _store_description(context: Any) -> dict[str, Any] | None:
    """The `--train-store` the ratio test and the copy rate searched: its absolute path and its
    manifest's content hash (None without a store)."""
    store = getattr(context, "train_store", None)
    if store is None:
        return None
    return {"path": str(Path(store.root).resolve()), "content_hash": store.content_hash}


def _store_lines(report: dict[str, Any]) -> list[str]:
    """report.md's line on the `--train-store` that both measures searched (none without)."""
    store = report.get("train_store")
    if not store:
        return []
    return [f"- Training images: the ratio test and the copy rate searched the reference store "
            f"`{store['path']}` (`--train-store`, content hash `{store['content_hash']}`)."]


def run_warnings(result: dict[str, Any], names: dict[str, Any]) -> list[str]:
    """The run's warnings, each once: those the measurements raised (`result["warnings"]`) and
    the copy threshold's calibration on too few held-out images."""
    from dit_prune.evaluate import no_classifier_warning
    from dit_prune.metrics.copydetect import calibration_warning

    found = list(result.get("warnings") or [])
    note = calibration_warning(int(names["num_heldout_images"]))
    if note:
        found.append(note)
    before = getattr(result.get("before"), "metrics", None) or {}
    if "class_agreement" in before and before["class_agreement"] is None \
            and result.get("text") is None:
        found.append(no_classifier_warning(str(names.get("feature_extractor"))))
    return list(dict.fromkeys(found))


def _budget_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "budget": entry["budget"],
        "units_removed": entry["after_plan"].counts,
        # which units, unpruned numbering: [kind, block, index] each
        "removed": [u.to_json() for u in entry["after_plan"].removed],
        "after": entry["after"].metrics,
        "random_baseline": entry["random_baseline"].metrics,
        "noise_control": entry["noise_control"],
        "verdict": entry["verdict"],
        "random_verdict": entry["random_verdict"],
        "fd_change": entry["fd_change"],
        "random_fd_change": entry["random_fd_change"],
        "equal_quality": entry["equal_quality"],
    }


def _plain(value: Any) -> Any:
    """Tuples, numpy and torch scalars -> JSON types; NaN and infinities -> None (JSON has none).
    """
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic) or (hasattr(value, "item") and
                                         getattr(value, "ndim", 1) == 0):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def has_interval(interval: Any) -> bool:
    """True for an interval [low, high] of two finite numbers (None/NaN: none computed)."""
    return bool(interval) and all(_finite(v) for v in interval)


def fmt_budget(budget: float) -> str:
    """0.2 -> '20%'; a unit count (>= 1) -> '3'."""
    return f"{int(budget)}" if budget >= 1 else f"{100 * budget:g}%"


def fmt_rate(rate: Any, interval: Any = None, no_interval: str = "[no interval]") -> str:
    """'25.0% [20.0, 30.0]'; an interval that could not be computed (None/NaN bounds) is
    printed as `no_interval`."""
    if not _finite(rate):
        return "n/a"
    text = f"{100 * rate:.1f}%"
    if has_interval(interval):
        text += f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    elif interval:
        text += f" {no_interval}"
    return text


def fmt_random_rate(eq: dict[str, Any]) -> str:
    """Random's rate at equal quality; one random seed gives no interval over seeds."""
    seeds = eq.get("num_random_seeds", len(eq.get("per_seed") or ()))
    return fmt_rate(eq["rate"], eq["interval"],
                    "— (one seed: no interval)" if seeds == 1 else "— (no interval)")


def fmt_ratio(ratio: Any) -> str:
    """The copy-cut ratio: '2.50×', '—' when undefined (None/NaN/inf)."""
    return f"{ratio:.2f}×" if _finite(ratio) else "—"


def _fd_text(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "n/a"


def _cell(metrics: dict[str, Any] | None, key: str) -> str:
    if metrics is None or metrics.get(key) is None:
        return "—"
    value = metrics[key]
    if key in ("memorization_rate", "copy_rate"):
        return fmt_rate(value, metrics.get(key.replace("rate", "interval")))
    if key == "fd":
        interval = metrics.get("fd_interval")
        return _fd_text(value) + (f" [{interval[0]:.2f}, {interval[1]:.2f}]"
                                  if has_interval(interval) else "")
    if key in ("precision", "recall", "class_agreement"):
        return f"{value:.3f}"
    if key in ("params", "macs"):
        return f"{int(value):,}"
    return f"{value:.2f}"


def verdict_sentence(report: dict[str, Any]) -> str:
    removed = ", ".join(f"{n} {k}{'s' if n != 1 else ''}"
                        for k, n in report["units_removed"].items())
    budget = removed if report["budget"] >= 1 else \
        f"{fmt_budget(report['budget'])} of {report['budget_mode']} ({removed})"
    if report["verdict"] == "mitigated":
        what = "memorization was **mitigated**: both measures fell below the noise control " \
               "and the quality guards held"
    else:
        what = f"**not mitigated** ({report['verdict']})" + noise_floor_note(report)
    return (f"Pruning {budget} chosen by `{report['scorer']}`: {what}. "
            f"Random units at the same budget: {report['random_verdict']}. "
            + equal_quality_sentence(report, report["equal_quality"], report["fd_change"]))


def noise_floor_note(report: dict[str, Any]) -> str:
    """Why "not beyond noise control" cannot be passed at this sample count: the noise
    control's interval reaches 0 for a measure, so no "after" interval can lie strictly below
    it (guards.verdict). Empty when the verdict did not fail that way.

    Example:
        >>> noise_floor_note({"verdict": "not beyond noise control: copy rate",
        ...                   "noise_control": {"memorization_interval": [0.01, 0.03],
        ...                                     "copy_interval": [0.0, 0.004]}})[:45]
        ': the noise control leaves no copy rate to go'
    """
    if "not beyond noise control" not in str(report.get("verdict")):
        return ""
    noise = report.get("noise_control") or {}
    floor = [label for key, label in (("memorization", "memorization rate"),
                                      ("copy", "copy rate"))
             if has_interval(noise.get(f"{key}_interval"))
             and float(noise[f"{key}_interval"][0]) <= 0.0]
    if not floor:
        return ""
    return (f": the noise control leaves no {' or '.join(floor)} to go below (its interval "
            "reaches 0: noise as large as the samples' change already removes those copies), "
            "so no pruned model can pass this test at this sample count")


def equal_quality_sentence(report: dict[str, Any], eq: dict[str, Any],
                           fd_change: dict[str, Any]) -> str:
    """One sentence: the scorer's target copy rate against random pruning's at the same FD."""
    which = "copies of the duplicated images" if eq["target"] == "duplicated" else "copies"
    beats = "**beats random at equal quality**" if eq["beats"] else \
        "**does not beat random at equal quality**"
    ratio = eq["copy_cut_ratio"]
    cut = f"; it removes {ratio:.1f}× the copies random removes" if _finite(ratio) else ""
    ceiling = eq.get("max_cut_ratio")
    if _finite(ceiling):
        cut += (f" (at this quality no method can exceed {ceiling:.1f}×, the ratio of one that "
                "leaves no copy)")
    elif _finite(eq.get("rate")) and \
            eq["rate"] >= target_copy_rate(report["before"], eq["target"])[0]:
        cut = "; random pruning removes no copies at this quality, so no ratio is given"
    clamped = ""
    if eq.get("unmatched"):
        clamped = (" (the FD lies below every point of some random path, even up to the upper "
                   "end of the scorer's FD interval: random has no point at this quality, so no "
                   "win can be claimed; its best-FD point is shown)")
    elif eq["clamped"]:
        clamped = (" (the FD lies below every point of some random path: there random's best "
                   f"up to {report['fd_name']} {_fd_text(eq.get('fd_upper'))}, the upper end of "
                   "the scorer's paired FD interval, was used)")
    if eq.get("censored"):
        clamped += (" (random's paths stop at a better FD than the scorer's: no win can be "
                    "claimed; add larger --random-budgets)")
    return (f"At equal quality ({which}): {fmt_rate(eq['scorer_rate'], eq['scorer_interval'])} "
            f"at {report['fd_name']} {_fd_text(eq['fd'])} ({_pct(fd_change['relative'])} "
            f"{_pct_interval(fd_change['interval'])} paired vs before); random pruning at the "
            f"same {report['fd_name']}: {fmt_random_rate(eq)} over "
            f"{eq['num_random_seeds']} random seed{'s' if eq['num_random_seeds'] != 1 else ''}"
            f"{clamped}: the scorer {beats}{cut}.")


def removed_text(removed: list[list[Any]], most: int = 24) -> str:
    """'head 2.0, head 2.1' for the first `most` removed units, then how many more.

    Example:
        >>> removed_text([["head", 2, 0], ["neuron", 1, 7]])
        'head 2.0, neuron 1.7'
    """
    names = [f"{kind} {block}.{index}" for kind, block, index in removed[:most]]
    more = f" and {len(removed) - most} more" if len(removed) > most else ""
    return (", ".join(names) + more) if names else "none recorded"


def _pct(value: Any) -> str:
    return f"{100 * value:+.1f}%" if _finite(value) else "n/a"


def _pct_interval(interval: Any) -> str:
    if not has_interval(interval):
        return "[no interval]"
    return f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]"


def _subset(metrics: dict[str, Any] | None, target: str) -> dict[str, Any] | None:
    return (metrics or {}).get("subsets", {}).get(target)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the verdict sentence first, then the before/after table and what was measured."""
    fd_name = report["fd_name"]
    control = report.get("control")  # the unpruned model given the same recovery
    arms = ("before", "after", "random_baseline") + (("control",) if control else ())
    lines = [f"# dit-prune run: {report['checkpoint']}", "", verdict_sentence(report), "",
             f"## Budget {report['budget']:g} ({report['budget_mode']})", "",
             "| | before | after | random, same budget | "
             + ("control: unpruned + same recovery | " if control else "") + "noise control |",
             "|---|---|---|---|---|" + ("---|" if control else "")]
    target = report["target"]
    for key, label in METRIC_ROWS:
        label = fd_name if key == "fd" else label
        lines.append(f"| {label} | " + " | ".join(_cell(report[arm], key) for arm in arms)
                     + f" | {_cell(report['noise_control'], key)} |")
        if key in ("memorization_rate", "copy_rate") and target != "all":
            sub = f"{label.split(' (')[0]}, {target} images only"
            lines.append(f"| {sub} | " + " | ".join(
                _cell(_subset(report[arm], target), key) for arm in arms) + " | — |")
        if key == "copy_rate" and report.get("retrigger"):
            lines.append(retrigger_row(report))
        if key == "fd":
            changes = [report["fd_change"], report["budgets"][0]["random_fd_change"]]
            if control:
                changes.append(report["control_fd_change"])
            lines.append(f"| {fd_name} change vs before (paired 95%) | — | " + " | ".join(
                f"{_pct(c['relative'])} {_pct_interval(c['interval'])}" for c in changes)
                + " | — |")
    random_budgets = sorted({p["budget"] for p in report["random_curve"]})
    lines += ["", "## Random pruning at equal quality", "",
              f"Random units were pruned at budgets {', '.join(f'{b:g}' for b in random_budgets)}"
              f" with random seeds {', '.join(map(str, report['random_seeds']))}. For each seed, "
              "random's copy rate at the scorer's quality is the lowest copy rate on its path "
              "(the unpruned model, then its random models in budget order, joined by straight "
              f"segments) among the points with {fd_name} at most the scorer's: random at equal "
              "or better quality. Where the scorer's FD lies below a seed's whole path "
              "(clamped), that seed's lowest copy rate up to the upper end of the scorer's "
              "paired FD interval is used: random at a quality the scorer's measurement cannot "
              "tell from its own; when even that reaches no point (unmatched), no win can be "
              "claimed. The interval is Student-t over seeds. The rule: the scorer's "
              "interval lies entirely below random's. The ceiling is the copy cut vs random of "
              "a method that leaves no copy at the scorer's quality: before / (before − random "
              "at equal quality); no method can exceed it there.", "",
              f"| budget | {fd_name} after | copies after | random at the same {fd_name} | "
              "per random seed | copy cut vs random | ceiling (no copy left) | beats random |",
              "|---|---|---|---|---|---|---|---|"]
    for b in sorted(report["budgets"], key=lambda b: b["budget"]):
        eq = b["equal_quality"]
        lines.append(
            f"| {b['budget']:g} | {_fd_text(eq['fd'])} | "
            f"{fmt_rate(eq['scorer_rate'], eq['scorer_interval'])} | "
            f"{fmt_random_rate(eq)}{' (clamped)' if eq['clamped'] else ''}"
            f"{' (unmatched)' if eq.get('unmatched') else ''}"
            f"{' (censored)' if eq.get('censored') else ''} | "
            f"{', '.join(fmt_rate(v) for v in eq['per_seed'])} | "
            f"{fmt_ratio(eq['copy_cut_ratio'])} | {fmt_ratio(eq.get('max_cut_ratio'))} | "
            f"{'yes' if eq['beats'] else 'no'} |")
    lines += ["", "## Units removed", "", "Unpruned numbering, `kind block.index` (report.json: "
              "`budgets[i].removed`).", ""]
    lines += [f"- budget {b['budget']:g}: {removed_text(b.get('removed', []))}"
              for b in sorted(report["budgets"], key=lambda b: b["budget"])]
    if len(report["budgets"]) > 1:
        lines += ["", "## All budgets", "",
                  "| budget | removed | memorization after | copy after | "
                  f"{fd_name} after | memorization random | copy random | {fd_name} random | "
                  "noise control (memorization / copy) | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for b in sorted(report["budgets"], key=lambda b: b["budget"]):
            removed = ", ".join(f"{n} {k}{'s' if n != 1 else ''}"
                                for k, n in b["units_removed"].items())
            lines.append(
                f"| {b['budget']:g} | {removed} | {_cell(b['after'], 'memorization_rate')} | "
                f"{_cell(b['after'], 'copy_rate')} | {_cell(b['after'], 'fd')} | "
                f"{_cell(b['random_baseline'], 'memorization_rate')} | "
                f"{_cell(b['random_baseline'], 'copy_rate')} | "
                f"{_cell(b['random_baseline'], 'fd')} | "
                f"{_cell(b['noise_control'], 'memorization_rate')} / "
                f"{_cell(b['noise_control'], 'copy_rate')} | {b['verdict']} |")
    noise_rms = report["noise_control"].get("noise_rms")
    lines += [
        "", "## What was measured", "",
        f"- {report['num_samples']} samples, seeds {report['seeds']}{_conditioning(report)} "
        f"{_sampler_name(report)} {report['steps']} steps, guidance {report['guidance_scale']},"
        " one generator per image: before, after and random share every seed.",
        f"- Memorization: ratio test d1/d2 < 1/3 against the {report['num_train_images']} "
        "training images, pixel space; bootstrap 95% intervals.",
        f"- Copy rate: `{report['copy_detector']}` embedding, threshold "
        f"τ = {report['copy_threshold']:.4f} (99th percentile of {report['num_heldout_images']} "
        f"held-out images{_maximum_note(report)}; their false-copy rate "
        f"{fmt_rate(report['heldout_false_copy_rate'])}).",
        *_store_lines(report),
        f"- {fd_name}: Fréchet distance on `{report['feature_extractor']}` features against the "
        "held-out images (bootstrap interval); precision/recall with k-NN manifolds; "
        f"{_agreement_sentence(report)}.",
        "- Noise control: the before samples plus Gaussian noise with the RMS of the "
        "before→after change, matched per image (mean RMS "
        f"{f'{noise_rms:.4f}' if _finite(noise_rms) else 'n/a'} on the [0, 1] scale).",
        f"- {recovery_sentence(report)}",
        *([f"- {retrigger_sentence(report)}"] if report.get("retrigger") else []),
        "", "![before / after](samples_before_after.png)", "",
    ]
    lines += ["![trade-off](tradeoff.png)", ""]
    if report.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(lines)


def _sampler_name(report: dict[str, Any]) -> str:
    """The sampler the run's steps were: DDIM / DDPM, or a flow-matching scheduler's own Euler
    steps (`make_sampling_scheduler` keeps it whatever --sampler says)."""
    if report.get("prediction") == "flow":
        return "flow-matching Euler"
    return str(report["sampler"]).upper()


def _conditioning(report: dict[str, Any]) -> str:
    """What each seed was conditioned on: its class, or (text-to-image) a training caption."""
    text = report.get("text")
    if not text:
        return " (class = seed mod classes),"
    decoded = " latents decoded by the pipeline's VAE;" if text.get("latent") else ""
    return (f": seed s samples the caption of training row π(s mod R), π a fixed permutation of "
            f"the R = {text['num_rows']} training rows ({text['num_distinct_prompts']} distinct "
            f"captions);{decoded}")


def _maximum_note(report: dict[str, Any]) -> str:
    """', that is their maximum (see Warnings)' when too few held-out images calibrated tau."""
    from dit_prune.metrics.copydetect import calibration_warning

    return ", that is their maximum: see Warnings" if calibration_warning(
        int(report["num_heldout_images"])) else ""


def _agreement_sentence(report: dict[str, Any]) -> str:
    """How class agreement was measured, or why it was not."""
    if report["before"].get("class_agreement") is None:
        why = "the caption folders give no classes" if report.get("text") else \
            (f"the feature network `{report['feature_extractor']}` has no classifier head for "
             "the model's classes, so the verdict's class-agreement guard is off")
        return f"class agreement not measured: {why}"
    if report.get("text"):
        return (f"class agreement: the `{report['feature_extractor']}` classifier's class "
                "against the class of the training row whose caption was sampled")
    return f"class agreement by the `{report['feature_extractor']}` classifier"


def retrigger_cell(metrics: dict[str, Any] | None, interval: bool = True) -> str:
    """'90.0% [70.0, 100.0] (floor 0.0%)': copied targets re-triggered, held-out floor."""
    if not metrics or metrics.get("retrigger_rate") is None:
        return "—"
    bounds = metrics.get("retrigger_interval") if interval else None
    return (f"{fmt_rate(metrics['retrigger_rate'], bounds)} "
            f"(floor {fmt_rate(metrics['retrigger_floor'])})")


def retrigger_row(report: dict[str, Any]) -> str:
    """The table row: re-trigger success of before / after / random, held-out floor beside."""
    r = report["retrigger"]
    sampler = "Euler" if report.get("prediction") == "flow" else "DDIM"
    label = (f"re-trigger success ({r['attack_steps']} Adam steps on the noise, "
             f"{r['ddim_steps']} {sampler} steps)")
    arms = ("before", "after", "random_baseline") + (("control",) if report.get("control")
                                                     else ())
    return f"| {label} | " + " | ".join(retrigger_cell(report[arm]) for arm in arms) + " | — |"


def recovery_sentence(report: dict[str, Any]) -> str:
    """One sentence: the recovery every pruned model (and the control) was given."""
    recovery = report.get("recovery")
    if not recovery:
        return "Recovery after pruning: none."
    options, data = recovery["options"], recovery["data"]
    text = (f"Recovery after pruning: {recovery['method']}, {options.get('steps')} steps, seed "
            f"{options.get('seed')}")
    if recovery["method"] == "finetune":
        text += ", t uniform over the whole noise schedule (the training recipe)"
    else:
        text += f", distillation at t in [{options.get('t_min')}, {options.get('t_max')}]"
    if data.get("source") == "generated-novel":
        text += (f", on samples of the unpruned model that the copy detector calls novel: "
                 f"{data['num_images']} of {data['num_drawn']} kept (seeds {data.get('seeds')}; "
                 f"{data['num_dropped']} copies of {data['distinct_copied']} training images "
                 f"dropped at τ = {data['threshold']:.4f})")
    else:
        text += f", on {data.get('num_images')} {data.get('source')} images"
    if recovery["method"] == "adversarial":
        targets = recovery.get("targets", {})
        text += (f"; adversarial: {options.get('inner_steps')} warm-started attack steps per "
                 f"step (fresh noise every {options.get('restart_every')}, "
                 f"{options.get('ddim_steps')} DDIM steps) on "
                 f"{len(targets.get('positions', []))} copied training images "
                 f"({targets.get('source')}), hinge weight {options.get('weight')} to pixel MSE "
                 f"margin {options.get('margin')}")
        if options.get("embedding_lr"):
            text += f", class embedding searched too (lr {options['embedding_lr']:g})"
    return (text + ". The control column is the unpruned model given the same recovery, on "
            "the same seeds.")


def retrigger_sentence(report: dict[str, Any]) -> str:
    """One sentence saying what the re-trigger row measured (targets, budget, seed, cost)."""
    r = report["retrigger"]
    source = "duplicated training images" if r["source"] == "duplicated" else \
        "training images (a seeded sample)"
    sampler = "flow-matching Euler" if report.get("prediction") == "flow" else "DDIM"
    return (f"Re-trigger success (Kowalczuk et al. 2025): for {r['targets']} {source} and "
            f"{r['heldout_targets']} held-out images, the initial noise was optimised with Adam "
            f"(lr {r['lr']:g}, {r['attack_steps']} steps, prior weight {r['prior_weight']:g}) "
            f"through a differentiable {r['ddim_steps']}-step {sampler} sampler given the "
            f"target's {'caption' if report.get('text') else 'class'}, seed {r['seed']}; a "
            "success when the sample's nearest image (pixel L2, training images and held-out "
            "targets) is the target and its copy "
            f"similarity is ≥ τ = {r['copy_threshold']:.4f}. The held-out success is the floor "
            "(noise optimisation without memorization); intervals are bootstrap over targets; "
            f"{r['models_attacked']} models attacked in {r['seconds']:.0f} s. Reported beside "
            "the verdict, not part of it.")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The one-screen summary printed at the end of `dit-prune run`."""
    fd = report["fd_name"]
    arms = ("before", "after", "random_baseline") + (("control",) if report.get("control")
                                                     else ())
    rows = [verdict_sentence(report).replace("**", ""), "",
            f"{'':28}{'before':>24}{'after':>24}{'random':>24}"
            + (f"{'unpruned + recovery':>24}" if report.get("control") else "")]
    for key, label in METRIC_ROWS[:6]:
        label = fd if key == "fd" else label
        rows.append(f"{label:28}" + "".join(f"{_cell(report[arm], key):>24}" for arm in arms))
    if report["target"] != "all":
        rows.append(f"{'copies, ' + report['target']:28}" + "".join(
            f"{_cell(_subset(report[arm], report['target']), 'copy_rate'):>24}"
            for arm in arms))
    if report.get("retrigger"):
        rows.append(f"{'re-trigger (held-out floor)':28}" + "".join(
            f"{retrigger_cell(report[arm], interval=False):>24}" for arm in arms))
    rows.append(f"{'noise control':28}{'':24}"
                f"{'mem ' + fmt_rate(report['noise_control']['memorization_rate']):>24}"
                f"{'copy ' + fmt_rate(report['noise_control']['copy_rate']):>24}")
    return rows


def write_outputs(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write report.json, report.md, samples_before_after.png and (several budgets) tradeoff.png."""
    report = build_report(result)
    if result.get("text") is not None:  # text-to-image: copies per prompt
        from dit_prune.run.prompts import prompt_section

        report["prompts"] = prompt_section(result)
    before, entry = result["before"], result["entries"][0]
    after = entry["after"]
    nearest = result["context"].train_images[before.evaluation.memorization.nearest].cpu()
    before_after_grid(before.images, after.images, nearest,
                      before.evaluation.memorization.memorized,
                      after.evaluation.memorization.memorized, result["labels"],
                      result["seeds"], run_dir / "samples_before_after.png",
                      title=f"{report['scorer']}, budget {report['budget']:g}")
    tradeoff_plot(report, run_dir / "tradeoff.png")
    markdown = render_markdown(report)
    if "prompts" in report:
        from dit_prune.run.prompts import render_prompts

        markdown += render_prompts(report["prompts"])
    atomic_write_text(run_dir / "report.md", markdown)
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=2))
    return report

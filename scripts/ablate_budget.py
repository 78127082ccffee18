"""Scorers × budgets × unit kinds (× recovery): memorization, copy rate and FD against random
pruning at the same budget, mean ± std over scoring/random seeds, with a Pareto plot per kind.

Every run goes through `run_experiment` (same sampling seeds for before, after, random and the
noise control). Runs of one (kind, recovery, seed) share a folder, so the before and random arms
and the reference statistics are computed once; reports are cached, so reruns only add what
is missing.

Recovery arms (`--recover distill,finetune:unused`) also get a control: the unpruned model given
the same fine-tuning. Scorers may carry options: `taylor-gap+quality_weight=0.5`.

Usage (the commands behind docs/results.md are listed there):
    OMP_NUM_THREADS=1 python scripts/ablate_budget.py --out runs/ablate_budget \
        --scorers taylor-gap,cond-gap,ye2025,magnitude --budgets 0.05,0.1,0.2,0.3 --modes heads \
        --recover none,distill,finetune:unused --pruning-seeds 0,1,2 --seeds 0-999 --steps 25
    OMP_NUM_THREADS=1 python scripts/ablate_budget.py --smoke --out /tmp/ablate_smoke
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    aggregate,
    base_parser,
    check_budgets,
    check_positive,
    check_scorers,
    fmt,
    limit_threads,
    mean_std,
    new_figure,
    parse_list,
    parse_scorer_spec,
    parse_script_args,
    run_cached,
    run_script,
    save_figure,
    timed,
    write_json,
    write_table,
)
from tqdm.auto import tqdm  # noqa: E402

SMOKE_SCORER_OPTIONS = {"batches": 1, "max_images": 16}


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/ablate_budget")
    parser.add_argument("--scorers", default="taylor-gap,ye2025,magnitude",
                        help="scorers to compare ('random' is always the baseline arm); a "
                        "scorer may carry options, e.g. 'taylor-gap+quality_weight=0.5'")
    parser.add_argument("--budgets", default="0.1,0.2")
    parser.add_argument("--modes", default="heads,neurons", help="heads, neurons and/or both")
    parser.add_argument("--recover", default="none",
                        help="comma list of none/finetune/distill, each optionally with the "
                        "images it trains on, e.g. finetune:unused (default: the training images)")
    parser.add_argument("--recover-steps", type=int, default=200)
    parser.add_argument("--tag", default="budget", help="name of the table / plot files")
    args = parse_script_args(parser, argv, {
        "seeds": "0-29", "steps": 5, "pruning_seeds": "0", "scorers": "magnitude",
        "budgets": "0.25", "modes": "heads", "recover": "none,finetune:unused",
        "recover_steps": 5})
    check_scorers(parser, args.scorers, "--scorers")
    check_budgets(parser, args.budgets, "--budgets")
    check_positive(parser, args.recover_steps, "--recover-steps")
    return args


def run_grid(args: Any) -> list[dict[str, Any]]:
    """Every (mode, recovery, seed, scorer) report, each tagged with its grid position."""
    from dit_prune.errors import DitPruneError
    from dit_prune.run import RunConfig
    from dit_prune.run.experiment import prepare_inputs

    out = Path(args.out)
    scorers = [s for s in parse_list(args.scorers) if s != "random"]
    budgets = tuple(parse_list(args.budgets, float))
    options = SMOKE_SCORER_OPTIONS if args.smoke else {}
    grid = [(mode, rec, seed, scorer) for mode in parse_list(args.modes)
            for rec in parse_list(args.recover) for seed in parse_list(args.pruning_seeds, int)
            for scorer in scorers]
    inputs: dict[str, Any] = {}  # prepared once per recovery (its images are part of them)
    records = []
    for mode, rec, seed, scorer in tqdm(grid, desc="ablate_budget"):
        name, own = parse_scorer_spec(scorer)
        method, _, source = rec.partition(":")
        cfg = RunConfig(checkpoint=args.checkpoint, out=str(out / "runs" / mode /
                                                            rec.replace(":", "-") /
                                                            f"seed{seed}"),
                        scorer=name, budgets=budgets, budget_mode=mode, seeds=args.seeds,
                        steps=args.steps, scorer_options={**options, **own}, recover=method,
                        seed=seed, device="cpu",
                        **({} if method == "none" else {"recover_data": source or "train",
                                                         "recover_steps": args.recover_steps}))
        path = out / "reports" / f"{mode}_{rec.replace(':', '-')}_{scorer}_seed{seed}.json"
        if rec not in inputs and not path.is_file():
            inputs[rec] = prepare_inputs(cfg)
        try:
            report = run_cached(cfg, path, inputs.get(rec))
        except DitPruneError as exc:  # e.g. ye2025 scores heads only
            print(f"skipped {scorer} on {mode}: {exc}")
            continue
        records.append({"mode": mode, "recover": rec, "seed": seed, "scorer": scorer,
                        "report": report})
    return records


def recovery_controls(args: Any) -> list[dict[str, Any]]:
    """The unpruned model given each fine-tuning recovery of the grid (same steps, data and
    seed), on the same sampling seeds: what recovery does without any pruning. Distillation is
    left out: the unpruned model distilled from itself is the unpruned model."""
    import copy
    import json

    from dit_prune.evaluate import build_context, evaluate_samples
    from dit_prune.pruning import recover
    from dit_prune.run import RunConfig
    from dit_prune.run.experiment import evaluation_nets, prepare_inputs
    from dit_prune.sampling import sample_images

    out, rows = Path(args.out), []
    for rec in parse_list(args.recover):
        method, _, source = rec.partition(":")
        if method != "finetune":
            continue
        inputs = None  # the same for every seed: loaded once, and only if a seed is missing
        for seed in parse_list(args.pruning_seeds, int):
            path = out / "reports" / f"unpruned_{rec.replace(':', '-')}_seed{seed}.json"
            if not path.is_file():
                cfg = RunConfig(checkpoint=args.checkpoint, out=str(out / "controls"),
                                seeds=args.seeds, steps=args.steps, recover=method,
                                recover_data=source or "train", recover_steps=args.recover_steps,
                                seed=seed, device="cpu")
                inputs = inputs or prepare_inputs(cfg)
                base, scheduler, _ = inputs.loaded
                model = recover(method, copy.deepcopy(base), inputs.recovery_images,
                                inputs.recovery_labels, steps=cfg.recover_steps, seed=seed,
                                progress=False).model.eval()
                images = sample_images(model, scheduler, cfg.labels(), cfg.seed_list(),
                                       steps=cfg.steps, progress=False)  # (N, C, H, W)
                context = build_context(inputs.train_images, inputs.heldout_images,
                                        *evaluation_nets(cfg), cache_dir=out / "controls" / "cache")
                metrics = evaluate_samples(images, cfg.labels(), context).metrics
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"recover": rec, "seed": seed, "metrics": metrics},
                                           default=float))
            rows.append(json.loads(path.read_text()))
    return rows


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, recovery, budget, scorer incl. random), aggregated over seeds."""
    groups: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        for b in rec["report"]["budgets"]:
            for arm, name in (("after", rec["scorer"]), ("random_baseline", "random")):
                key = (rec["mode"], rec["recover"], b["budget"], name)
                group = groups.setdefault(key, {"seeds": {}, "verdicts": {}, "removed": None,
                                                "diff": {}, "noise": {}})
                group["seeds"][rec["seed"]] = b[arm]
                group["verdicts"][rec["seed"]] = b["verdict" if arm == "after"
                                                   else "random_verdict"]
                group["removed"] = b["units_removed"]
                nc = b["noise_control"]
                group.setdefault("copy_pass", {})[rec["seed"]] = \
                    b[arm]["copy_interval"][1] < nc["copy_interval"][0]
                if arm == "after":
                    group["noise"][rec["seed"]] = nc
                    group["diff"][rec["seed"]] = b["after"]["copy_rate"] - \
                        b["random_baseline"]["copy_rate"]
    rows = []
    for (mode, rec, budget, name), g in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], kv[0][3] == "random", kv[0][3])):
        seeds = sorted(g["seeds"])
        rows.append({
            "mode": mode, "recover": rec, "budget": budget, "scorer": name, "seeds": seeds,
            "units_removed": g["removed"],
            "stats": aggregate([g["seeds"][s] for s in seeds]),
            "noise_copy": mean_std(g["noise"][s]["copy_rate"] for s in g["noise"]),
            "noise_mem": mean_std(g["noise"][s]["memorization_rate"] for s in g["noise"]),
            "copy_minus_random": mean_std(g["diff"].values()) if g["diff"] else None,
            "mitigated": sum(v == "mitigated" for v in g["verdicts"].values()),
            "copy_below_noise": sum(g["copy_pass"].values()),
            "verdicts": [g["verdicts"][s] for s in seeds],
        })
    return rows


def table_rows(rows: list[dict[str, Any]], before: dict[str, Any]) -> list[list[str]]:
    one = {k: (before[k], 0.0, 1) for k in ("memorization_rate", "copy_rate", "fd", "precision",
                                              "recall", "class_agreement")}
    lines = [["—", "—", "0", "unpruned", "0"] + [fmt(one[k], k)
                                                  for k in one] + ["—", "—", "—", "—"]]
    for r in rows:
        s = r["stats"]
        removed = ", ".join(f"{n} {k}s" for k, n in r["units_removed"].items())
        diff = r["copy_minus_random"]
        lines.append([
            r["mode"], r["recover"], f"{r['budget']:g}", f"**{r['scorer']}**", removed,
            *[fmt(s[k], k) for k in ("memorization_rate", "copy_rate", "fd", "precision",
                                     "recall", "class_agreement")],
            fmt(r["noise_copy"], "copy_rate") if r["scorer"] != "random" else "—",
            fmt(diff, "copy_rate").replace("%", " pts") if diff else "—",
            f"{r['copy_below_noise']}/{len(r['seeds'])}" if r["scorer"] != "random" else "—",
            f"{r['mitigated']}/{len(r['seeds'])}",
        ])
    return lines


HEADER = ["units", "recovery", "budget", "scorer", "removed", "memorization (ratio)",
          "copy rate", "FD_digitsnet", "precision", "recall", "class agr.",
          "noise-control copy", "copy − random", "copy < noise", "mitigated"]


def pareto_plot(rows: list[dict[str, Any]], before: dict[str, Any], path: Path,
                title: str) -> Path:
    """Copy rate and memorization rate against FD, one line per scorer over budgets."""
    fig, axes = new_figure(3, ratios=(1, 1, 0.55))
    scorers = sorted({r["scorer"] for r in rows}, key=lambda n: (n == "random", n))
    for ax, key, label in zip(axes[:2], ("copy_rate", "memorization_rate"),
                              ("copy rate (copy detector)", "memorization rate (ratio test)"),
                              strict=True):
        ax.scatter([before["fd"]], [100 * before[key]], marker="*", s=160, color="k",
                   label="unpruned", zorder=5)
        for name in scorers:
            mine = sorted((r for r in rows if r["scorer"] == name), key=lambda r: r["budget"])
            xs = [r["stats"]["fd"][0] for r in mine]
            ys = [100 * r["stats"][key][0] for r in mine]
            ax.errorbar(xs, ys, xerr=[r["stats"]["fd"][1] for r in mine],
                        yerr=[100 * r["stats"][key][1] for r in mine], marker="o", capsize=3,
                        linestyle="--" if name == "random" else "-", label=name)
            for r, x, y in zip(mine, xs, ys, strict=True):
                ax.annotate(f"{r['budget']:g}", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.axvline(1.1 * before["fd"], color="grey", linestyle=":", label="FD +10% guard")
        ax.fill_between([0.9 * before["fd"], 1.1 * before["fd"]], 0, 50 * before[key],
                        color="green", alpha=0.12, label="goal: rate halved, FD within 10%")
        ax.set_xlabel("FD_digitsnet (lower is better)")
        ax.set_ylabel(f"{label}, %")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[2].axis("off")  # the third panel holds the legend, clear of the data
    axes[2].legend(handles, labels, loc="center left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    limit_threads()
    done = timed("ablate_budget")
    records = run_grid(args)
    rows = summarize(records)
    before = records[0]["report"]["before"]
    out = Path(args.out)
    n = records[0]["report"]["num_samples"]
    notes = [f"{n} samples (seeds {args.seeds}), DDIM {args.steps} steps; mean ± std over "
             f"scoring/random seeds {args.pruning_seeds}; before, after, random and noise control "
             "share every sampling seed.",
             "copy − random: paired difference of copy rates (scorer minus random, same seed).",
             "copy < noise: seeds whose copy-rate interval lies entirely below the noise "
             "control's (the copy half of the verdict).",
             "mitigated: seeds whose verdict is 'mitigated' (both rates below the noise control's "
             "interval, FD within 10%, class agreement within 2 points)."]
    table = write_table(out / f"{args.tag}_table.md", HEADER, table_rows(rows, before),
                        title=f"Budget ablation ({args.checkpoint})", notes=notes)
    plots = []
    for mode in parse_list(args.modes):
        for rec in parse_list(args.recover):
            mine = [r for r in rows if r["mode"] == mode and r["recover"] == rec]
            name = f"{args.tag}_pareto_{mode}_{rec.replace(':', '-')}.png"
            plots.append(pareto_plot(mine, before, out / name,
                                     f"{mode}, recovery {rec}: mean ± std over seeds "
                                     f"{args.pruning_seeds}, {n} samples"))
    controls = recovery_controls(args)
    if controls:
        control_rows = []
        for rec in sorted({c["recover"] for c in controls}):
            mine = [c["metrics"] for c in controls if c["recover"] == rec]
            stats = aggregate(mine)
            control_rows.append([f"unpruned + {rec}", len(mine)] + [
                fmt(stats[k], k) for k in ("memorization_rate", "copy_rate", "fd",
                                           "class_agreement")])
        write_table(out / f"{args.tag}_recovery_controls.md",
                    ["model", "seeds", "memorization (ratio)", "copy rate", "FD_digitsnet",
                     "class agr."], control_rows,
                    title="Recovery without pruning (control)",
                    notes=[f"same {args.recover_steps} recovery steps, data and seeds as the "
                           "pruned arms; same sampling seeds."])
    write_json(out / f"{args.tag}_summary.json", {"before": before, "rows": rows,
                                                  "recovery_controls": controls})
    done()
    print(table.read_text())
    return {"table": table, "plots": plots, "rows": rows}


if __name__ == "__main__":
    run_script(main, "ablate_budget")

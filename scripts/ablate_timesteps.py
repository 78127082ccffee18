"""How the timestep distribution used for scoring changes what gets pruned and the outcome.

One scorer, one unit kind, the given budgets; the scorer's `timesteps` option is varied
(uniform, Ye et al. 2025's Beta(0.8, 2) = mostly small t, only large t, only small t). Reports
copy rate, memorization rate and FD against random (same budget, same sampling seeds), mean ± std
over scoring seeds, and the overlap (Jaccard) of the pruned sets between distributions.

Usage:
    OMP_NUM_THREADS=1 python scripts/ablate_timesteps.py --out runs/ablate_timesteps \
        --scorer taylor-gap --mode heads --budgets 0.2 \
        --timesteps "uniform;beta:0.8,2;uniform:700,1000;uniform:0,100" --pruning-seeds 0,1,2
    OMP_NUM_THREADS=1 python scripts/ablate_timesteps.py --smoke --out /tmp/timesteps_smoke
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    aggregate,
    base_parser,
    check_budgets,
    check_scorers,
    fmt,
    limit_threads,
    mean_std,
    new_figure,
    parse_list,
    parse_script_args,
    run_cached,
    run_script,
    save_figure,
    timed,
    write_json,
    write_table,
)
from tqdm.auto import tqdm  # noqa: E402

KEYS = ("memorization_rate", "copy_rate", "fd", "class_agreement")


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/ablate_timesteps")
    parser.add_argument("--scorer", default="taylor-gap")
    parser.add_argument("--mode", default="heads", help="heads, neurons or both")
    parser.add_argument("--budgets", default="0.2")
    parser.add_argument("--timesteps", default="uniform;beta:0.8,2;uniform:700,1000;uniform:0,100",
                        help="';'-separated timestep distributions (scorer option syntax)")
    args = parse_script_args(parser, argv, {
        "seeds": "0-29", "steps": 5, "pruning_seeds": "0",
        "timesteps": "uniform;uniform:700,1000", "budgets": "0.25"})
    check_scorers(parser, args.scorer, "--scorer")
    check_budgets(parser, args.budgets, "--budgets")
    return args


def slug(spec: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "_", spec.lower()).strip("_")


def chosen_units(run_dir: Path, scorer: str, budget: float, mode: str,
                 checkpoint: str) -> set[Any]:
    """The units the run pruned at `budget`, recomputed from its cached scores."""
    from dit_prune.checkpoint import load_dit
    from dit_prune.pruning import select_units
    from dit_prune.scorers import load_scores

    saved = load_scores(run_dir / "scores" / scorer)
    model = load_dit(checkpoint).model
    return set(select_units(saved.units, saved.scores, budget, mode=mode, model=model))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dit_prune.run import RunConfig
    from dit_prune.run.experiment import prepare_inputs

    args = parse_args(argv)
    limit_threads()
    done = timed("ablate_timesteps")
    out = Path(args.out)
    budgets = tuple(parse_list(args.budgets, float))
    dists = [d.strip() for d in args.timesteps.split(";") if d.strip()]
    seeds = parse_list(args.pruning_seeds, int)
    options = {"batches": 1, "max_images": 16} if args.smoke else {}
    reports: dict[tuple[str, int], dict[str, Any]] = {}
    chosen: dict[tuple[str, int, float], set[Any]] = {}
    inputs = None
    for dist, seed in tqdm(list(itertools.product(dists, seeds)), desc="ablate_timesteps"):
        run_dir = out / "runs" / slug(dist) / f"seed{seed}"
        cfg = RunConfig(checkpoint=args.checkpoint, out=str(run_dir), scorer=args.scorer,
                        budgets=budgets, budget_mode=args.mode, seeds=args.seeds,
                        steps=args.steps, scorer_options={**options, "timesteps": dist},
                        seed=seed, device="cpu")
        path = out / "reports" / f"{slug(dist)}_seed{seed}.json"
        if inputs is None and not path.is_file():
            inputs = prepare_inputs(cfg)
        reports[dist, seed] = run_cached(cfg, path, inputs)
        for budget in budgets:
            chosen[dist, seed, budget] = chosen_units(run_dir, args.scorer, budget, args.mode,
                                                      args.checkpoint)
    before = next(iter(reports.values()))["before"]
    rows, summary = [], []
    for budget in budgets:
        for dist in [*dists, "random"]:
            arm = "random_baseline" if dist == "random" else "after"
            per_seed = []
            for seed in seeds:
                rep = reports[dists[0] if dist == "random" else dist, seed]
                per_seed.append(next(b for b in rep["budgets"] if b["budget"] == budget))
            stats = aggregate([b[arm] for b in per_seed], KEYS)
            verdict_key = "random_verdict" if dist == "random" else "verdict"
            mitigated = sum(b[verdict_key] == "mitigated" for b in per_seed)
            noise = mean_std(b["noise_control"]["copy_rate"] for b in per_seed)
            rows.append([f"{budget:g}", f"`{dist}`", *[fmt(stats[k], k) for k in KEYS],
                         "—" if dist == "random" else fmt(noise, "copy_rate"),
                         f"{mitigated}/{len(seeds)}"])
            summary.append({"budget": budget, "timesteps": dist, "stats": stats,
                            "mitigated": mitigated, "noise_copy": noise})
    overlap_rows = []
    for budget in budgets:
        for a, b in itertools.combinations(dists, 2):
            jac = mean_std(len(chosen[a, s, budget] & chosen[b, s, budget]) /
                           max(1, len(chosen[a, s, budget] | chosen[b, s, budget]))
                           for s in seeds)
            overlap_rows.append([f"{budget:g}", f"`{a}`", f"`{b}`", fmt(jac, "jaccard")])
    n = next(iter(reports.values()))["num_samples"]
    notes = [f"scorer `{args.scorer}`, {args.mode}; {n} samples (seeds {args.seeds}), DDIM "
             f"{args.steps} steps; mean ± std over scoring seeds {args.pruning_seeds} (random: "
             "random units, same seeds). Before: memorization "
             f"{100 * before['memorization_rate']:.1f}%, copy {100 * before['copy_rate']:.1f}%, "
             f"FD {before['fd']:.1f}."]
    table = write_table(out / "timesteps_table.md",
                        ["budget", "timesteps", "memorization (ratio)", "copy rate",
                         "FD_digitsnet", "class agr.", "noise-control copy", "mitigated"],
                        rows, title="Scoring timesteps", notes=notes)
    overlap = write_table(out / "timesteps_overlap.md",
                          ["budget", "timesteps A", "timesteps B", "Jaccard of pruned units"],
                          overlap_rows, title="Do the distributions prune the same units?")
    plot = _plot(summary, before, out / "timesteps.png")
    write_json(out / "timesteps_summary.json", {"before": before, "rows": summary})
    done()
    print(table.read_text() + "\n" + overlap.read_text())
    return {"table": table, "overlap": overlap, "plot": plot}


def _plot(summary: list[dict[str, Any]], before: dict[str, Any], path: Path) -> Path:
    fig, axes = new_figure(1, width=6.0)
    ax = axes[0]
    ax.scatter([before["fd"]], [100 * before["copy_rate"]], marker="*", s=160, color="k",
               label="unpruned")
    for row in summary:
        s = row["stats"]
        ax.errorbar([s["fd"][0]], [100 * s["copy_rate"][0]], xerr=[s["fd"][1]],
                    yerr=[100 * s["copy_rate"][1]], marker="s" if row["timesteps"] == "random"
                    else "o", capsize=3, label=f"{row['timesteps']} @ {row['budget']:g}")
    ax.axvline(1.1 * before["fd"], color="grey", linestyle=":", label="FD +10% guard")
    ax.set_xlabel("FD_digitsnet")
    ax.set_ylabel("copy rate, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, "ablate_timesteps")

"""The two regimes: scorers against random pruning at equal FD, over training and scoring seeds.

For each checkpoint, every scorer runs at every budget with every scoring seed through
`run_experiment`, in one folder per checkpoint, so the unpruned arm and the random arms (random
seeds × random budgets) are sampled once and shared. Each run's report holds the copy rate the
run targets (the duplicated images of a `--duplicate` checkpoint, else all copies), the paired FD
change, random's copy rate at the same FD and the verdict. Tables give mean ± std over scoring
seeds per checkpoint, and the count of (seed, budget) runs that are mitigated and beat random.

Usage (the commands behind docs/results.md are listed there):
    OMP_NUM_THREADS=1 python scripts/regimes.py --out runs/regimes \
        --checkpoints checkpoints/digits-duplicated,runs/dup-models/dup-s1,runs/dup-models/dup-s2 \
        --scorers cond-gap,taylor-gap,activation-contrast --budgets 2,3,4 --pruning-seeds 0,1,2 \
        --seeds 0-999 --steps 25
    OMP_NUM_THREADS=1 python scripts/regimes.py --smoke --out /tmp/regimes_smoke
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    base_parser,
    check_budgets,
    check_checkpoints,
    check_positive,
    check_scorers,
    int_list,
    limit_threads,
    mean_std,
    parse_list,
    parse_scorer_spec,
    parse_script_args,
    run_cached,
    run_script,
    timed,
    write_json,
    write_table,
)

SMOKE_SCORER_OPTIONS = {"batches": 1, "max_images": 16}


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/regimes", checkpoint=False)
    parser.add_argument("--checkpoints", "--checkpoint", dest="checkpoints",
                        default="checkpoints/digits-duplicated",
                        help="comma list of checkpoints (each gets its own folder)")
    parser.add_argument("--scorers", default="cond-gap,taylor-gap,activation-contrast",
                        help="comma list of scorers, each optionally with options "
                             "(e.g. taylor-gap+quality_weight=0.5)")
    parser.add_argument("--budgets", default="2,3,4", help="head counts or fractions")
    parser.add_argument("--random-seeds", default="0,1,2",
                        help="seeds of the random pruning draws each scorer is judged against")
    parser.add_argument("--random-budgets", default=None,
                        help="budgets of the random arms (default: --budgets)")
    parser.add_argument("--budget-mode", default="heads",
                        choices=("heads", "neurons", "both", "params"),
                        help="which units the budgets count (as dit-prune run --budget-mode)")
    parser.add_argument("--retrigger-targets", type=int, default=10,
                        help="re-trigger attack targets per arm; 0 turns the attack off")
    parser.add_argument("--from-reports", action="store_true",
                        help="only tabulate the stored reports (whatever scoring code made them; "
                             "each row names its digest), run nothing")
    args = parse_script_args(parser, argv, {
        "seeds": "0-29", "steps": 5, "pruning_seeds": "0", "random_seeds": "0,1",
        "budgets": "2"})
    check_checkpoints(parser, args.checkpoints, "--checkpoints")
    check_scorers(parser, args.scorers, "--scorers")
    check_budgets(parser, args.budgets, "--budgets")
    if args.random_budgets:
        check_budgets(parser, args.random_budgets, "--random-budgets")
    int_list(parser, args.random_seeds, "--random-seeds")
    check_positive(parser, args.retrigger_targets, "--retrigger-targets", low=0)
    return args


def main(argv: list[str] | None = None) -> int:
    from dit_prune.pruning.selection import parse_budgets
    from dit_prune.run.config import RunConfig

    args = parse_args(argv)
    limit_threads()
    out = Path(args.out)
    budgets = parse_budgets(args.budgets)
    random_budgets = parse_budgets(args.random_budgets) if args.random_budgets else None
    rows, summary, codes = [], [], set()
    for checkpoint in parse_list(args.checkpoints):
        folder = out / Path(checkpoint).name
        for spec in parse_list(args.scorers):
            name, options = parse_scorer_spec(spec)
            if args.smoke:
                options = {**SMOKE_SCORER_OPTIONS, **options}
            reports = []
            for seed in parse_list(args.pruning_seeds, int):
                cfg = RunConfig(checkpoint=checkpoint, out=str(folder), scorer=name,
                                budgets=budgets, seeds=args.seeds, steps=args.steps,
                                scorer_options=options, seed=seed,
                                random_seeds=tuple(parse_list(args.random_seeds, int)),
                                random_budgets=random_budgets,
                                budget_mode=args.budget_mode,
                                retrigger_targets=args.retrigger_targets)
                done = timed(f"{folder.name} {spec} seed {seed}")
                path = folder / "reports" / f"{spec}-s{seed}.json"
                if args.from_reports:
                    if not path.is_file():
                        raise SystemExit(f"{path}: no stored report (run without --from-reports)")
                    report = json.loads(path.read_text())
                else:
                    report = run_cached(cfg, path)
                reports.append(rejudge(report))
                done()
            rows += table_rows(folder.name, spec, reports)
            codes.update(str(r.get("scoring_code")) for r in reports)
            summary.append({"checkpoint": checkpoint, "scorer": spec, "reports": [
                {"seed": s, "budgets": r["budgets"], "before": r["before"],
                 "target": r["target"]} for s, r in zip(parse_list(args.pruning_seeds, int),
                                                        reports, strict=True)]})
    header = ["checkpoint", "scorer", "budget", "copies before", "copies after",
              "FD change (paired)", "random at same FD", "copy cut vs random",
              "ceiling (no copy left)", "beats random", "mitigated"]
    write_table(out / "regimes.md", header, rows)
    with open(out / "regimes.md", "a") as table:
        table.write(f"\nScoring code of these reports: {', '.join(sorted(codes))}\n")
    write_json(out / "regimes.json", summary)
    print((out / "regimes.md").read_text())
    return 0


def rejudge(report: dict[str, Any]) -> dict[str, Any]:
    """Recompute each budget's equal-quality comparison and verdict from the stored numbers with
    the current rules, so a cached report is judged as a new one would be."""
    from dit_prune.metrics.equal_quality import RandomPoint
    from dit_prune.metrics.guards import verdict
    from dit_prune.run.experiment import equal_quality_entry

    curve = [RandomPoint(**p) for p in report["random_curve"]]
    for entry in report["budgets"]:
        entry["equal_quality"] = equal_quality_entry(report["before"], entry["after"], curve,
                                                     report["target"], entry["fd_change"])
        entry["verdict"] = verdict(report["before"], entry["after"], entry["noise_control"],
                                   entry["fd_change"], entry["equal_quality"])
    return report


def table_rows(model: str, scorer: str, reports: list[dict[str, Any]]) -> list[list[str]]:
    """One row per budget: mean ± std over scoring seeds, and how many seeds pass each test."""
    from dit_prune.metrics.subsets import target_copy_rate

    rows = []
    for i, budget in enumerate(b["budget"] for b in reports[0]["budgets"]):
        entries = [r["budgets"][i] for r in reports]
        eqs = [e["equal_quality"] for e in entries]
        before = [target_copy_rate(r["before"], r["target"])[0] for r in reports]
        rows.append([
            model, scorer, f"{budget:g}", _pct(mean_std(before)),
            _pct(mean_std(eq["scorer_rate"] for eq in eqs)),
            _pct(mean_std(e["fd_change"]["relative"] for e in entries), signed=True),
            _pct(mean_std(eq["rate"] for eq in eqs)),
            _ratio(mean_std(eq["copy_cut_ratio"] for eq in eqs)),
            _ratio(mean_std(eq["max_cut_ratio"] for eq in eqs)),
            f"{sum(eq['beats'] for eq in eqs)}/{len(eqs)}",
            f"{sum(e['verdict'] == 'mitigated' for e in entries)}/{len(entries)}",
        ])
    return rows


def _pct(stat: tuple[float, float, int], signed: bool = False) -> str:
    mean, std, n = stat
    sign = "+" if signed else ""
    return f"{100 * mean:{sign}.1f} ± {100 * std:.1f}%" if n > 1 else f"{100 * mean:{sign}.1f}%"


def _ratio(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    return f"{mean:.1f} ± {std:.1f}×" if n > 1 else f"{mean:.1f}×"


if __name__ == "__main__":
    run_script(main, "regimes")

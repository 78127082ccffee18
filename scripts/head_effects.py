"""Why the trade-off: the measured effect of removing each attention head on its own, how well a
scorer ranks heads by that effect, and what an oracle that knows every single-head effect can
reach at a budget.

For every head h, the model with h removed (structurally) samples the selection seeds; the copy
rate, memorization rate and FD are compared with the unpruned model on the same seeds. The
scorer's scores (mean over scoring seeds) are set against the measured copy drops (Spearman). Two
oracles then pick heads at the budget from the measured single-head effects, and the chosen set is
pruned and measured together on the evaluation seeds, which the selection never saw (with the
noise control and the verdict):
- `oracle: copy`: the heads whose removal lowers the copy rate most;
- `oracle: copy, FD-feasible`: the same among heads whose own FD rise is at most
  `--fd-share` of the unpruned FD (so that the set stays within the 10% guard if effects add);
- `<scorer>, FD-feasible`: the scorer's top heads among those same FD-feasible heads.

Usage:
    OMP_NUM_THREADS=1 python scripts/head_effects.py --out runs/head_effects --seeds 0-999 \
        --steps 25 --pruning-seeds 0,1,2 --budget 0.2
    OMP_NUM_THREADS=1 python scripts/head_effects.py --smoke --out /tmp/head_effects_smoke
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    base_parser,
    check_positive,
    check_scorers,
    digits_calibration,
    limit_threads,
    mean_std,
    new_figure,
    parse_list,
    parse_script_args,
    run_script,
    save_figure,
    timed,
    write_json,
    write_table,
)
from tqdm.auto import tqdm  # noqa: E402

INFEASIBLE = -1e9  # score of a head the FD-feasible oracle may not pick


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/head_effects")
    parser.add_argument("--scorer", default="taylor-gap")
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of heads (oracles)")
    parser.add_argument("--fd-share", type=float, default=0.03,
                        help="largest single-head FD rise (fraction of unpruned FD) the "
                        "FD-feasible oracle accepts")
    parser.add_argument("--select-seeds", default="1000-1999",
                        help="sampling seeds on which single-head effects are measured (keep "
                        "them apart from --seeds, on which the oracle sets are evaluated)")
    parser.add_argument("--max-heads", type=int, default=0, help="measure only the first N heads "
                        "(0 = all)")
    args = parse_script_args(parser, argv, {
        "seeds": "0-29", "steps": 5, "pruning_seeds": "0", "max_heads": 4,
        "select_seeds": "1000-1029"})
    from dit_prune.errors import DitPruneError
    from dit_prune.sampling import parse_seeds

    try:
        parse_seeds(args.select_seeds, "--select-seeds")
    except DitPruneError as exc:
        parser.error(str(exc))
    check_scorers(parser, args.scorer, "--scorer")
    check_positive(parser, args.max_heads, "--max-heads", low=0)
    return args


class Measurer:
    """Samples a model on `seeds` (cached shards, the run's `Sampler`) and evaluates it; the
    unpruned model's images and metrics are `before_images` / `before`."""

    def __init__(self, args: Any, out: Path, seeds: str, loaded: Any, data: Any) -> None:
        from dit_prune.evaluate import build_context
        from dit_prune.run import RunConfig
        from dit_prune.run.experiment import Sampler, evaluation_nets
        from dit_prune.run.shards import ShardStore

        cfg = RunConfig(checkpoint=args.checkpoint, out=str(out), seeds=seeds, steps=args.steps)
        self.base, self.scheduler, _ = loaded
        self.seeds, self.labels = cfg.seed_list(), cfg.labels()  # labels: (N,)
        self.context = build_context(data.train_images, data.heldout_images,
                                     *evaluation_nets(cfg), cache_dir=out / "cache")
        store = ShardStore(out / f"samples_{seeds}", cfg.shard_size)
        self.sampler = Sampler(cfg, self.scheduler, store, self.labels, self.seeds,
                               progress=False)
        self.before_images, self.before = self.measure(self.base.eval(), "before")

    def measure(self, model: torch.nn.Module, tag: str) -> tuple[torch.Tensor, dict[str, Any]]:
        from dit_prune.evaluate import evaluate_samples
        from dit_prune.metrics.netio import weights_fingerprint

        images = self.sampler(model, tag, weights_fingerprint(model))  # (N, C, H, W) in [0, 1]
        return images, dict(evaluate_samples(images, self.labels, self.context).metrics)

    def pruned(self, units: list[Any]) -> torch.nn.Module:
        from dit_prune.pruning import prune_units

        model = copy.deepcopy(self.base)
        prune_units(model, units)
        return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from dit_prune.checkpoint import load_dit
    from dit_prune.evaluate import evaluate_noise_control
    from dit_prune.metrics.guards import verdict
    from dit_prune.pruning import select_units
    from dit_prune.scorers import get_scorer
    from dit_prune.units import HEAD, enumerate_units

    args = parse_args(argv)
    limit_threads()
    done = timed("head_effects")
    out = Path(args.out)
    loaded = load_dit(args.checkpoint)
    data = digits_calibration(loaded.meta)
    m = Measurer(args, out, args.select_seeds, loaded, data)
    judge = Measurer(args, out, args.seeds, loaded, data)
    units = enumerate_units(m.base, (HEAD,))
    measured = units[: args.max_heads] if args.max_heads else units
    effects = []
    for unit in tqdm(measured, desc="heads"):
        _, metrics = m.measure(m.pruned([unit]), f"head_{unit.block}_{unit.index}")
        effects.append({key: metrics[key] - m.before[key]
                        for key in ("copy_rate", "memorization_rate", "fd", "class_agreement")})
    seeds = parse_list(args.pruning_seeds, int)
    extra = {"batches": 1, "max_images": 16} if args.smoke else {}
    runs = torch.stack([get_scorer(args.scorer, progress=False, seed=s, **extra).compute(
        m.base, units, data, m.scheduler).scores for s in seeds])  # (S, U)
    score = runs.mean(0)[: len(measured)]  # (H,)
    copy_drop = torch.tensor([-e["copy_rate"] for e in effects])  # (H,)
    fd_rise = torch.tensor([e["fd"] for e in effects])  # (H,)
    rho_copy = float(spearmanr(score, copy_drop).statistic)
    rho_fd = float(spearmanr(copy_drop, fd_rise).statistic)

    feasible = fd_rise <= args.fd_share * m.before["fd"]
    blocked = torch.full_like(copy_drop, INFEASIBLE)  # (H,)
    oracles = {"oracle: copy": copy_drop.clone(),
               "oracle: copy, FD-feasible": torch.where(feasible, copy_drop, blocked),
               f"{args.scorer}, FD-feasible": torch.where(feasible, score.double(),
                                                          blocked.double())}
    chosen_rows, oracle_results = [], {}
    for name, values in oracles.items():
        chosen = select_units(measured, values, args.budget, mode="heads", model=m.base)
        tag = name.replace(": ", "_").replace(", ", "_")
        images, metrics = judge.measure(m.pruned(chosen), tag)
        noise = evaluate_noise_control(judge.before_images, images, judge.context)
        result = {"heads": [f"{u.block}.{u.index}" for u in chosen], "metrics": metrics,
                  "noise_control": noise, "verdict": verdict(judge.before, metrics, noise)}
        oracle_results[name] = result
        fd_change = 100 * (metrics["fd"] / judge.before["fd"] - 1)
        picked = [measured.index(u) for u in chosen]
        result["additive_copy_drop"] = float(copy_drop[picked].sum())
        result["additive_fd_rise"] = float(fd_rise[picked].sum())
        joint_drop = judge.before["copy_rate"] - metrics["copy_rate"]
        chosen_rows.append([name, ", ".join(result["heads"]),
                            f"{100 * result['additive_copy_drop']:.1f} / {100 * joint_drop:.1f}",
                            f"{100 * result['additive_fd_rise'] / m.before['fd']:+.0f}% / "
                            f"{fd_change:+.0f}%",
                            f"{100 * metrics['memorization_rate']:.1f}%",
                            f"{100 * metrics['copy_rate']:.1f}%",
                            f"{100 * noise['copy_rate']:.1f}%",
                            f"{metrics['fd']:.1f} ({fd_change:+.0f}%)",
                            f"{metrics['class_agreement']:.3f}", result["verdict"]])

    rows = []
    for unit, e, s in sorted(zip(measured, effects, score.tolist(), strict=True),
                             key=lambda t: t[1]["copy_rate"]):
        rows.append([f"{unit.block}.{unit.index}", f"{s:+.2f}", f"{100 * e['copy_rate']:+.1f}",
                     f"{100 * e['memorization_rate']:+.1f}", f"{e['fd']:+.2f}",
                     f"{e['class_agreement']:+.3f}", "yes" if e["fd"] <= args.fd_share *
                     m.before["fd"] else "no"])
    n = len(m.seeds)
    b = m.before
    notes = [f"{n} samples (selection seeds {args.select_seeds}), DDIM {args.steps} steps; "
             "unpruned: copy rate "
             f"{100 * b['copy_rate']:.1f}%, memorization {100 * b['memorization_rate']:.1f}%, "
             f"FD_digitsnet {b['fd']:.2f}.",
             f"score: `{args.scorer}` (robust z), mean over scoring seeds {args.pruning_seeds}.",
             f"Spearman(score, measured copy drop) = {rho_copy:.2f}; Spearman(copy drop, FD rise) "
             f"= {rho_fd:.2f} over {len(measured)} heads.",
             f"FD-feasible: the head's own FD rise ≤ {100 * args.fd_share:g}% of the unpruned FD."]
    table = write_table(out / "head_effects_table.md",
                        ["head (block.index)", "score", "Δ copy rate (pts)",
                         "Δ memorization (pts)", "Δ FD", "Δ class agr.", "FD-feasible"], rows,
                        title="Removing one head at a time", notes=notes)
    oracle_table = write_table(out / "head_effects_oracles.md",
                               ["selection", "heads removed",
                                "copy drop, pts: sum of single / joint",
                                "FD change: sum of single / joint",
                                "memorization (ratio)", "copy rate",
                                "noise-control copy", "FD_digitsnet", "class agr.", "verdict"],
                               chosen_rows, title=f"Oracle selections at {args.budget:g} of heads",
                               notes=[f"chosen on seeds {args.select_seeds}, measured on seeds "
                                      f"{args.seeds} ({len(judge.seeds)} samples); unpruned "
                                      f"there: copy rate {100 * judge.before['copy_rate']:.1f}%, "
                                      "memorization "
                                      f"{100 * judge.before['memorization_rate']:.1f}%, FD "
                                      f"{judge.before['fd']:.2f}."])
    plot = _plot(effects, score, m.before, args, out / "head_effects.png")
    write_json(out / "head_effects_summary.json", {
        "before_selection": m.before, "before": judge.before,
        "heads": [u.to_json() for u in measured], "effects": effects,
        "score": score.tolist(), "spearman_score_copy_drop": rho_copy,
        "spearman_copy_drop_fd_rise": rho_fd, "oracles": oracle_results})
    done()
    print(table.read_text() + "\n" + oracle_table.read_text())
    return {"table": table, "oracles": oracle_table, "plot": plot, "rho_copy": rho_copy}


def _plot(effects: list[dict[str, float]], score: torch.Tensor, before: dict[str, Any],
          args: Any, path: Path) -> Path:
    fig, axes = new_figure(2)
    drop = [-100 * e["copy_rate"] for e in effects]
    rise = [100 * e["fd"] / before["fd"] for e in effects]
    points = axes[0].scatter(rise, drop, c=score.tolist(), cmap="viridis", s=40)
    fig.colorbar(points, ax=axes[0], label=f"{args.scorer} score")
    axes[0].axvline(100 * args.fd_share, color="grey", linestyle=":",
                    label=f"FD-feasible ≤ {100 * args.fd_share:g}%")
    axes[0].set_xlabel("FD rise when the head is removed, % of unpruned")
    axes[0].set_ylabel("copy-rate drop, points")
    axes[0].legend(fontsize=7)
    axes[1].scatter(score.tolist(), drop, s=40)
    axes[1].set_xlabel(f"{args.scorer} score (mean over seeds {args.pruning_seeds})")
    axes[1].set_ylabel("copy-rate drop, points")
    mean, std, _ = mean_std(drop)
    axes[1].set_title(f"single-head copy-rate drop: {mean:.1f} ± {std:.1f} points", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, "head_effects")

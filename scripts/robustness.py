"""Can a pruned model be made to copy again? (in the spirit of Kowalczuk et al. 2025, "Finding
Dori"): optimise the initial noise for K Adam steps, through a differentiable DDIM sampler, so
that the sample reaches a given target image; success = the sample's nearest reference image
(pixel L2) is the target *and* the copy detector calls it a copy (similarity ≥ τ).

Targets: training images (can the model be pushed to copy them?) and held-out images the model
never saw (the floor: what noise optimisation reaches without memorization). The reference set
for "nearest" is the training images plus the held-out targets. Models: unpruned, pruned by the
scorer, pruned at random (same budget).

Usage:
    OMP_NUM_THREADS=1 python scripts/robustness.py --out runs/robustness --scorer taylor-gap \
        --mode heads --budget 0.2 --targets 20 --attack-steps 40 --ddim-steps 8 \
        --pruning-seeds 0
    OMP_NUM_THREADS=1 python scripts/robustness.py --smoke --out /tmp/robustness_smoke
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    base_parser,
    check_positive,
    check_scorers,
    digits_calibration,
    fmt,
    limit_threads,
    mean_std,
    new_figure,
    parse_list,
    parse_script_args,
    run_script,
    save_figure,
    scored_and_pruned,
    timed,
    write_json,
    write_table,
)
from tqdm.auto import tqdm  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/robustness")
    parser.add_argument("--scorer", default="taylor-gap")
    parser.add_argument("--mode", default="heads")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--targets", type=int, default=20, help="training and held-out targets")
    parser.add_argument("--attack-steps", type=int, default=40, help="K Adam steps on the noise")
    parser.add_argument("--ddim-steps", type=int, default=8, help="steps of the sampler attacked")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--prior-weight", type=float, default=1.0,
                        help="weight of the penalty keeping the noise's mean 0 and std 1")
    args = parse_script_args(parser, argv, {
        "targets": 4, "attack_steps": 3, "ddim_steps": 3, "pruning_seeds": "0"})
    check_scorers(parser, args.scorer, "--scorer")
    for flag in ("targets", "attack_steps", "ddim_steps"):
        check_positive(parser, getattr(args, flag), "--" + flag.replace("_", "-"))
    return args


def pruned_models(base: torch.nn.Module, args: Any, seed: int, data: Any,
                  scheduler: Any) -> dict[str, torch.nn.Module]:
    """{'<scorer> <budget>': ..., 'random <budget>': ...} pruned copies of base."""
    return {f"{name} {args.budget:g}": scored_and_pruned(base, name, seed, args.budget, args.mode,
                                                         data, scheduler, args.smoke)
            for name in (args.scorer, "random")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dit_prune.checkpoint import load_dit
    from dit_prune.evaluate import default_checkpoints_dir
    from dit_prune.metrics.copydetect import calibrate_threshold, load_copy_detector
    from dit_prune.metrics.retrigger import AttackBudget, attack_success, choose_targets

    args = parse_args(argv)
    limit_threads()
    done = timed("robustness")
    out = Path(args.out)
    base, scheduler, meta = load_dit(args.checkpoint)
    data = digits_calibration(meta)
    train, train_labels = data.train_images, data.train_labels  # (M, C, H, W), (M,)
    heldout, heldout_labels = data.heldout_images, data.heldout_labels  # (K, C, H, W), (K,)
    detector = load_copy_detector(default_checkpoints_dir() / "digits-copydetect")
    targets = choose_targets(train, train_labels, heldout, heldout_labels, args.targets, seed=0)
    rest = torch.ones(len(heldout), dtype=torch.bool)  # held-out images that are not targets
    rest[targets.heldout_index] = False
    with torch.no_grad():  # τ: 99th percentile of the other held-out images' nearest similarity
        emb_ref = F.normalize(detector.embed(train), dim=1)  # (M, E)
        emb_rest = F.normalize(detector.embed(heldout[rest]), dim=1)  # (K', E)
        threshold = float(calibrate_threshold((emb_rest @ emb_ref.T).max(1).values))
    results: dict[str, dict[str, list[float]]] = {}
    for seed in parse_list(args.pruning_seeds, int):
        budget = AttackBudget(targets=args.targets, attack_steps=args.attack_steps,
                              ddim_steps=args.ddim_steps, lr=args.lr,
                              prior_weight=args.prior_weight, seed=seed)
        models = {"unpruned": base.eval(), **pruned_models(base, args, seed, data, scheduler)}
        for name, model in tqdm(models.items(), desc=f"attack, seed {seed}", leave=False):
            result = attack_success(model, scheduler, targets, budget, detector, threshold)
            for kind, mask in (("train", ~result.heldout), ("held-out", result.heldout)):
                entry = results.setdefault(f"{name}|{kind}", {"success": [], "mse": []})
                entry["success"].append(float(result.success[mask].float().mean()))
                entry["mse"].append(float(result.mse[mask].mean()))
    rows = []
    for key, entry in results.items():
        name, kind = key.split("|")
        rows.append([name, kind, fmt(mean_std(entry["success"]), "copy_rate"),
                     fmt(mean_std(entry["mse"]), "mse")])
    notes = [f"{args.targets} training and {args.targets} held-out targets; noise optimised "
             f"with Adam (lr {args.lr}) for K = {args.attack_steps} steps through DDIM "
             f"{args.ddim_steps} steps; success = nearest reference is the target and copy "
             f"similarity ≥ τ = {threshold:.3f}; pruning: {args.mode} {args.budget:g}; "
             f"mean ± std over pruning seeds {args.pruning_seeds}."]
    table = write_table(out / "robustness_table.md",
                        ["model", "targets", "attack success", "final MSE to target"], rows,
                        title="Can noise optimisation make the model copy again?", notes=notes)
    plot = _plot(results, out / "robustness.png")
    write_json(out / "robustness_summary.json", {"results": results, "threshold": threshold,
                                                  "args": vars(args)})
    done()
    print(table.read_text())
    return {"table": table, "plot": plot, "results": results}


def _plot(results: dict[str, dict[str, list[float]]], path: Path) -> Path:
    fig, axes = new_figure(1, width=6.0)
    ax = axes[0]
    names = list(dict.fromkeys(k.split("|")[0] for k in results))
    for offset, kind in ((-0.2, "train"), (0.2, "held-out")):
        stats = [mean_std(results[f"{n}|{kind}"]["success"]) for n in names]
        ax.bar([i + offset for i in range(len(names))], [100 * s[0] for s in stats], width=0.4,
               yerr=[100 * s[1] for s in stats], capsize=3, label=f"{kind} targets")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("attack success, %")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


if __name__ == "__main__":
    run_script(main, "robustness")

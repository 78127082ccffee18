"""Every head subset up to a size, measured: what the best possible head selection can reach.

A scorer picks k heads; an oracle that has *measured* every k-subset picks the best one. This
script removes every subset of 1..k attention heads (structurally), samples each pruned model on
the selection seeds, and records the copy rate on the run's target (the duplicated images when
the checkpoint records some), FD and class agreement. Two things follow:
- random pruning at k heads is a uniform draw over the k-subsets, so the enumeration *is*
  random's exact distribution (on these seeds);
- the best subset per (k, FD limit) bounds every head scorer from above (up to the selection
  seeds' noise: the chosen subsets are re-measured on seeds the selection never saw, with
  `dit-prune run --scorer given`, judged against random at equal quality).

Results go to `<out>/subsets.jsonl` one line per subset as they are measured, so an interrupted
enumeration continues where it stopped; `<out>/head_subsets.md` and `.png` summarize.

Usage:
    OMP_NUM_THREADS=1 python scripts/head_subsets.py --checkpoint checkpoints/digits-duplicated \
        --out runs/head_subsets --seeds 1000-1299 --steps 25 --max-size 3
    OMP_NUM_THREADS=1 python scripts/head_subsets.py --smoke --out /tmp/head_subsets_smoke
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation_common import (  # noqa: E402
    base_parser,
    check_positive,
    float_list,
    limit_threads,
    new_figure,
    parse_script_args,
    run_script,
    save_figure,
    timed,
    write_json,
    write_table,
)
from tqdm.auto import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> Any:
    parser = base_parser(__doc__.splitlines()[0], "runs/head_subsets")
    parser.set_defaults(checkpoint=str(REPO / "checkpoints" / "digits-duplicated"),
                        seeds="1000-1299")
    parser.add_argument("--max-size", type=int, default=3,
                        help="largest subset size k (subsets that would empty a block are "
                        "skipped)")
    parser.add_argument("--fd-limits", default="0,5,10",
                        help="FD rises (%% of unpruned) at which the best subsets are listed")
    args = parse_script_args(parser, argv, {"seeds": "1000-1029", "steps": 5, "max_size": 1})
    check_positive(parser, args.max_size, "--max-size")
    float_list(parser, args.fd_limits, "--fd-limits")
    return args


def check_paths(args: Any) -> None:
    """The output may not be, contain or lie inside the checkpoint (one-line SystemExit)."""
    ck, out = Path(args.checkpoint).resolve(), Path(args.out).resolve()
    if ck.exists() and (out == ck or ck in out.parents or out in ck.parents):
        raise SystemExit(f"head_subsets: --out {args.out} overlaps the checkpoint "
                         f"{args.checkpoint}: choose another folder")


def check_resume(args: Any, path: Path, checkpoint_sha256: str) -> None:
    """Record what the enumeration measures next to it, or refuse to continue one made with
    other options (its rows would be mislabelled)."""
    settings = {"checkpoint_sha256": checkpoint_sha256, "seeds": args.seeds,
                "steps": args.steps}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            changed = ", ".join(k for k in settings if stored.get(k) != settings[k])
            raise SystemExit(f"head_subsets: {path.parent} holds subsets measured with another "
                             f"{changed}; choose another --out or delete it")
    else:
        path.write_text(json.dumps(settings, indent=1) + "\n")


class SubsetMeter:
    """Samples a model pruned of a head subset on fixed seeds and measures it (no image cache:
    thousands of models are measured once each)."""

    def __init__(self, args: Any) -> None:
        from dit_prune.evaluate import build_context
        from dit_prune.run import RunConfig
        from dit_prune.run.experiment import evaluation_nets, prepare_inputs, target_subset
        from dit_prune.units import HEAD, enumerate_units

        self.cfg = cfg = RunConfig(checkpoint=args.checkpoint, out=str(args.out),
                                   seeds=args.seeds, steps=args.steps)
        inputs = prepare_inputs(cfg)
        self.base, self.scheduler, meta = inputs.loaded
        self.base.eval()
        self.seeds, self.labels = cfg.seed_list(), cfg.labels()  # labels: (N,)
        target = target_subset(cfg, meta.extra, len(inputs.train_images))
        self.target = target[0] if target else "all"
        self.context = build_context(inputs.train_images, inputs.heldout_images,
                                     *evaluation_nets(cfg), cache_dir=Path(args.out) / "cache",
                                     subsets={target[0]: target[1]} if target else None)
        self.heads = enumerate_units(self.base, (HEAD,))
        self.weights_sha256 = meta.weights_sha256
        self.per_block = Counter(unit.block for unit in self.heads)  # heads in each block

    def removable(self, subset: tuple[int, ...]) -> bool:
        """Whether removing `subset` leaves every block at least one head."""
        taken = Counter(self.heads[i].block for i in subset)
        return all(taken[block] < count for block, count in self.per_block.items())

    def measure(self, subset: tuple[int, ...]) -> dict[str, float]:
        """Copy rate on the target, FD and class agreement of the model without `subset`."""
        from dit_prune.evaluate import evaluate_samples
        from dit_prune.metrics.subsets import target_copy_rate
        from dit_prune.pruning import prune_units
        from dit_prune.sampling import sample_images

        model = copy.deepcopy(self.base)
        if subset:
            prune_units(model, [self.heads[i] for i in subset])
        images = sample_images(model.eval(), self.scheduler, self.labels, self.seeds,
                               steps=self.cfg.steps, progress=False)  # (N, C, H, W) in [0, 1]
        metrics = evaluate_samples(images, self.labels, self.context).metrics
        rate, interval = target_copy_rate(dict(metrics), self.target)
        return {"copy_rate": rate, "copy_interval": interval, "fd": float(metrics["fd"]),
                "class_agreement": float(metrics["class_agreement"])}


def head_name(unit: Any) -> str:
    return f"{unit.block}.{unit.index}"


def enumerate_subsets(meter: SubsetMeter, max_size: int, path: Path) -> list[dict[str, Any]]:
    """Every subset of 0..max_size heads measured, read back from `path` where already done."""
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[tuple(row["subset"])] = row
    subsets = [s for k in range(max_size + 1)
               for s in itertools.combinations(range(len(meter.heads)), k)
               if meter.removable(s)]
    todo = [s for s in subsets if s not in done]
    with path.open("a") as log:
        for subset in tqdm(todo, desc="head subsets"):
            started = time.perf_counter()
            row = {"subset": list(subset), "heads": [head_name(meter.heads[i]) for i in subset],
                   **meter.measure(subset), "seconds": round(time.perf_counter() - started, 2)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            done[subset] = row
    return [done[s] for s in subsets]


def summarize(rows: list[dict[str, Any]], args: Any, meter: SubsetMeter,
              out: Path) -> dict[str, Any]:
    """Per size: random's distribution (all subsets) and the best subsets within FD limits."""
    import numpy as np

    before = next(r for r in rows if not r["subset"])
    fd0, c0 = before["fd"], before["copy_rate"]
    limits = [float(x) for x in args.fd_limits.split(",") if x.strip()]
    table, best = [], {}
    for k in range(1, args.max_size + 1):
        sized = [r for r in rows if len(r["subset"]) == k]
        rates = np.array([r["copy_rate"] for r in sized])  # (C(H, k),)
        rises = np.array([100 * (r["fd"] / fd0 - 1) for r in sized])  # (C(H, k),)
        for limit in limits:
            feasible = [r for r, rise in zip(sized, rises, strict=True) if rise <= limit]
            pick = min(feasible, key=lambda r: r["copy_rate"], default=None)
            # random at k heads restricted to the same quality: the subsets random could have
            # drawn whose FD is at most the pick's (its equal-or-better-quality draws)
            if pick is None:
                table.append([k, f"≤ {limit:+g}%", "—", "—", "—", "—", "—", "0"])
                continue
            pick_rise = 100 * (pick["fd"] / fd0 - 1)
            same_q = rates[rises <= pick_rise]
            cut = (c0 - pick["copy_rate"]) / max(c0 - float(same_q.mean()), 1e-9)
            best[f"{k}@{limit:g}"] = {**pick, "fd_rise": pick_rise,
                                      "random_same_quality_mean": float(same_q.mean()),
                                      "cut_vs_random": cut}
            table.append([k, f"≤ {limit:+g}%", ", ".join(pick["heads"]),
                          f"{100 * pick['copy_rate']:.1f}%", f"{pick_rise:+.1f}%",
                          f"{pick['class_agreement']:.3f}",
                          f"{100 * same_q.mean():.1f}% ({len(same_q)} subsets)",
                          f"{len(feasible)}"])
        table.append([k, "all subsets (random)", f"{len(sized)} subsets",
                      f"{100 * rates.mean():.1f}% (min {100 * rates.min():.1f}%)",
                      f"{rises.mean():+.1f}% (median {np.median(rises):+.1f}%)", "—", "—", "—"])
    n = len(meter.seeds)
    notes = [f"{n} samples (seeds {args.seeds}, class = seed mod 10), DDIM {args.steps} steps; "
             f"copies counted on `{meter.target}`; unpruned: copies {100 * c0:.1f}%, "
             f"FD_digitsnet {fd0:.2f}, class agreement {before['class_agreement']:.3f}.",
             "best: the subset with the fewest copies among those whose FD rise is within the "
             "limit (selected on these seeds: optimistic; re-measure on fresh seeds).",
             "random at equal or better quality: the mean copy rate of all k-subsets whose FD "
             "is at most the best subset's (random's draws at that quality); cut ratio = "
             "(before − best) / (before − that mean)."]
    md = write_table(out / "head_subsets.md",
                     ["heads removed (k)", "FD limit", "best subset", "copies", "FD change",
                      "class agr.", "random k-subsets at ≤ that FD: mean copies",
                      "feasible subsets"], table,
                     title=f"Every head subset up to {args.max_size} heads", notes=notes)
    plot = _plot(rows, fd0, c0, args, out / "head_subsets.png")
    write_json(out / "head_subsets_summary.json",
               {"before": before, "best": best, "num_subsets": len(rows),
                "seeds": args.seeds, "steps": args.steps, "target": meter.target})
    return {"table": md, "plot": plot, "best": best}


def _plot(rows: list[dict[str, Any]], fd0: float, c0: float, args: Any, path: Path) -> Path:
    fig, axes = new_figure(1, width=6.5, height=4.5)
    ax = axes[0]
    for k, color in zip(range(1, args.max_size + 1), ("tab:blue", "tab:orange", "tab:green",
                                                     "tab:red", "tab:purple"), strict=False):
        sized = [r for r in rows if len(r["subset"]) == k]
        ax.scatter([100 * (r["fd"] / fd0 - 1) for r in sized],
                   [100 * r["copy_rate"] for r in sized], s=8, alpha=0.5, color=color,
                   label=f"{k} head{'s' if k > 1 else ''} ({len(sized)} subsets)")
    ax.scatter([0], [100 * c0], marker="*", s=150, color="black", label="unpruned", zorder=3)
    ax.axvline(10, color="grey", linestyle=":", label="FD +10%")
    ax.set_xscale("symlog", linthresh=20)
    ax.set_xlabel("FD change, % of unpruned (symlog)")
    ax.set_ylabel("copies of the target images, %")
    ax.set_title(f"every head subset ({args.seeds}, DDIM {args.steps})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dit_prune.errors import DitPruneError

    args = parse_args(argv)
    limit_threads()
    done = timed("head_subsets")
    out = Path(args.out)
    check_paths(args)
    try:
        meter = SubsetMeter(args)
    except DitPruneError as exc:
        raise SystemExit(f"head_subsets: {exc}") from None
    if args.max_size >= len(meter.heads):
        raise SystemExit(f"head_subsets: --max-size {args.max_size} is not below the model's "
                         f"{len(meter.heads)} heads")
    out.mkdir(parents=True, exist_ok=True)
    check_resume(args, out / "subsets.config.json", meter.weights_sha256)
    total = sum(math.comb(len(meter.heads), k) for k in range(args.max_size + 1))
    print(f"{len(meter.heads)} heads, {total} subsets of 0..{args.max_size} (those that would "
          "empty a block are skipped)", flush=True)
    rows = enumerate_subsets(meter, args.max_size, out / "subsets.jsonl")
    result = summarize(rows, args, meter, out)
    done()
    print(result["table"].read_text())
    return result


if __name__ == "__main__":
    run_script(main, "head_subsets")

"""The prompt section of a text-to-image run's report: copy rates per prompt and prompt group.

Each sample of a text-to-image run comes from one training caption (`dit_prune.run.text`). For
the before, after and random arms (first budget; the random arm is the run's first random seed,
`random_seed` in the section, as in the report's main table) it counts the samples the copy
detector calls copies, per prompt, and over two groups: the memorized prompts the checkpoint
records (the embedded model's captions of their own) and every other prompt. The prompts
listed first are the most copied before pruning, each with the training image its copies are
nearest to.

Example:
    >>> section = prompt_section(result)  # doctest: +SKIP
    >>> section["groups"]["memorized"]["before"]["copy_rate"]  # doctest: +SKIP
    0.9
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

ARMS = ("before", "after", "random")


def prompt_section(result: dict[str, Any], top: int = 10) -> dict[str, Any]:
    """JSON-ready per-prompt and per-group copy counts of a text-to-image run's result."""
    text = result["text"]
    rows = text.seed_rows(result["seeds"])  # (N,)
    prompts = [text.rows.captions[int(r)] for r in rows]
    own = text.unique[rows]  # (N,) each sample's own training image
    entry = result["entries"][0]
    arms = {"before": result["before"], "after": entry["after"],
            "random": entry["random_baseline"]}
    copies = {name: arm.evaluation.copy.copies.cpu().bool() for name, arm in arms.items()}
    nearest = {name: arm.evaluation.copy.nearest.cpu() for name, arm in arms.items()}
    memorized = set(text.memorized_captions)
    groups: dict[str, Any] = {}
    for group, keep in (("memorized", [p in memorized for p in prompts]),
                        ("other", [p not in memorized for p in prompts])):
        mask = torch.tensor(keep, dtype=torch.bool)  # (N,)
        if not mask.any():
            continue
        groups[group] = {"num_samples": int(mask.sum()), "num_prompts":
                         len({p for p, k in zip(prompts, keep, strict=True) if k})}
        for name in ARMS:
            hit = copies[name][mask]
            own_hit = hit & (nearest[name][mask] == own[mask])
            groups[group][name] = {"copy_rate": float(hit.float().mean()),
                                   "own_image_copy_rate": float(own_hit.float().mean())}
    per_prompt = []
    for prompt in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
        row: dict[str, Any] = {"prompt": prompt, "num_samples": len(idx),
                               "memorized": prompt in memorized}
        for name in ARMS:
            row[f"copies_{name}"] = int(copies[name][idx].sum())
        hits = idx[copies["before"][idx]]
        if len(hits):
            position = Counter(nearest["before"][hits].tolist()).most_common(1)[0][0]
            row["nearest_training_image"] = int(position)
            row["nearest_file"] = _file_of(text, int(position))
        per_prompt.append(row)
    per_prompt.sort(key=lambda r: (-r["copies_before"] / r["num_samples"], -r["num_samples"],
                                   r["prompt"]))
    return {"groups": groups, "most_copied": per_prompt[:top],
            "num_distinct_prompts": len(per_prompt),
            "random_seed": int(result["config"].random_seeds[0])}


def _file_of(text: Any, position: int) -> str | None:
    """The file of a distinct training image (its first row's), when rows name files."""
    if not text.rows.files:
        return None
    first = int((text.unique == position).nonzero()[0])
    return text.rows.files[first]


def render_prompts(section: dict[str, Any]) -> str:
    """The report.md section of `prompt_section`."""
    seed = section.get("random_seed")
    random = "random" if seed is None else f"random (seed {seed})"
    lines = ["", "## Prompts (text-to-image)", "",
             "In this run a sample's class (and a re-trigger target's) is its caption: seed s "
             "samples the caption of training row π(s mod R), a fixed permutation of the R rows "
             "(docs/text_to_image.md).", "",
             "Copy rate of the samples of each prompt group (copy detector; *own image*: the "
             "copy is of the training image the prompt was trained with):", "",
             f"| prompts | samples | before | after | {random} |", "|---|---|---|---|---|"]
    for group, data in section["groups"].items():
        cells = [f"{data[a]['copy_rate']:.1%} (own {data[a]['own_image_copy_rate']:.1%})"
                 for a in ARMS]
        lines.append(f"| {group} ({data['num_prompts']}) | {data['num_samples']} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"Most-copied prompts before pruning (of {section['num_distinct_prompts']}):",
              "", f"| prompt | memorized | samples | copies before | after | {random} | nearest "
              "training image |", "|---|---|---|---|---|---|---|"]
    for row in section["most_copied"]:
        near = row.get("nearest_file") or row.get("nearest_training_image", "—")
        lines.append(f"| {row['prompt']} | {'yes' if row['memorized'] else 'no'} | "
                     f"{row['num_samples']} | {row['copies_before']} | {row['copies_after']} | "
                     f"{row['copies_random']} | {near} |")
    return "\n".join(lines) + "\n"

"""Forward latency of every transformer family, unpruned and pruned, against the fraction of
FLOPs the pruning removes.

Each family is built at the widths of a released checkpoint (random weights, diffusers' own
initialisation) with only a few blocks, so that it fits the time of a CPU run; the block
counts are printed with the results. For each fraction f, f of the units of every kind of every
block are removed (seeded random choice; Lumina2 removes whole key/value groups, the only
removal its grouped-query attention allows at these fractions), cumulatively on one model in
the original numbering, and one forward (batch 1, 256 image tokens, 128 text tokens where the
family takes a text sequence) is timed `--repeats` times after one warm-up. FLOPs are counted
with `torch.utils.flop_counter.FlopCounterMode` over one forward of the whole model (matmuls,
attention with the math backend, convolutions; element-wise work is not counted).

Reports, per family and fraction: FLOPs removed, the parameter drop, median wall and median
process CPU time (the steadier on a shared machine), and the pruned/unpruned ratios.

Example:
    $ OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_family_latency.py --families flux \
        --fractions 0,0.25,0.5 --repeats 3 --out /tmp/family_latency.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dit_prune.pruning import count_parameters, prune_units
from dit_prune.pruning.inputs import example_inputs
from dit_prune.units import Unit, adapter_for, enumerate_units

IMAGE_SIDE_TOKENS = 16  # 16 x 16 = 256 image tokens
TEXT_TOKENS = 128

# family -> (released checkpoint whose widths are used, blocks built / blocks released, builder)
FAMILIES: dict[str, tuple[str, str, Callable[[], nn.Module]]] = {
    "dit": ("DiT-XL/2-256", "2 / 28", lambda: diffusers.DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, num_layers=2,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
    "pixart": ("PixArt-α-512", "2 / 28", lambda: diffusers.PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        num_layers=2, sample_size=32, patch_size=2, cross_attention_dim=1152,
        caption_channels=4096)),
    "sd3.5": ("SD3.5-medium", "2 / 24", lambda: diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96,
        dual_attention_layers=(0, 1), qk_norm="rms_norm")),
    "flux": ("FLUX.1-dev", "1+2 / 19+38", lambda: diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "qwenimage": ("Qwen-Image", "1 / 60", lambda: diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))),
    "sana": ("Sana-1600M (1.5 qk norm)", "2 / 20", lambda: diffusers.SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
        num_layers=2, num_cross_attention_heads=20, cross_attention_head_dim=112,
        cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, sample_size=16,
        patch_size=1, qk_norm="rms_norm_across_heads")),
    "hunyuan": ("HunyuanDiT-v1.2", "2 / 40", lambda: diffusers.HunyuanDiT2DModel(
        num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2,
        sample_size=32, hidden_size=1408, num_layers=2, mlp_ratio=4.3637,
        cross_attention_dim=1024, cross_attention_dim_t5=2048, pooled_projection_dim=1024,
        text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False)),
    "cogview4": ("CogView4-6B", "1 / 28", lambda: diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=128,
        num_attention_heads=32, text_embed_dim=4096, time_embed_dim=512, condition_dim=256,
        sample_size=32, rope_axes_dim=(256, 256))),
    "lumina2": ("Lumina-Image-2.0", "1+1+1 / 2+2+26", lambda: diffusers.Lumina2Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, hidden_size=2304, num_layers=1,
        num_refiner_layers=1, num_attention_heads=24, num_kv_heads=8, multiple_of=256,
        cap_feat_dim=2304)),
}
PACKED = ("flux", "qwenimage")  # token-grid inputs: side is counted in tokens


def inputs_for(family: str, model: nn.Module) -> dict[str, Any]:
    """Batch-1 inputs with 256 image tokens and (text families) 128 text tokens."""
    patch = 1 if family in PACKED else int(model.config.patch_size)
    data = example_inputs(model, batch=1, seed=0, side=IMAGE_SIDE_TOKENS * patch)
    if family == "hunyuan" or "encoder_hidden_states" not in data:
        return data
    gen = torch.Generator().manual_seed(1)
    text = data["encoder_hidden_states"]  # (1, L, C_txt)
    data["encoder_hidden_states"] = torch.randn(1, TEXT_TOKENS, text.shape[-1], generator=gen)
    for key in ("encoder_hidden_states_mask", "encoder_attention_mask"):
        if key in data:
            data[key] = torch.ones(1, TEXT_TOKENS, dtype=data[key].dtype)  # (1, L)
    if "txt_ids" in data:
        data["txt_ids"] = torch.zeros(TEXT_TOKENS, 3)  # (L, 3)
    return data


def count_flops(model: nn.Module, data: dict[str, Any]) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(**data)
    return int(fc.get_total_flops())


def time_forward(model: nn.Module, data: dict[str, Any], repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of `repeats` forwards after a warm-up."""
    walls, cpus = [], []
    with torch.no_grad():
        model(**data)
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            model(**data)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def removal_order(model: nn.Module, family: str, seed: int) -> dict[tuple[int, str], list]:
    """Per (block, kind) of the unpruned model, its units in a seeded random order (Lumina2
    heads: whole key/value groups, as lists of units)."""
    adapter = adapter_for(model)
    rnd = random.Random(seed)
    present = enumerate_units(model, adapter.kinds)
    order: dict[tuple[int, str], list] = {}
    for key in sorted({(u.block, u.kind) for u in present}):
        pool = [u for u in present if (u.block, u.kind) == key]
        if family == "lumina2" and key[1] == "head":
            rep = model.config.num_attention_heads // model.config.num_kv_heads
            pool = [[u for u in pool if u.index // rep == g]
                    for g in sorted({u.index // rep for u in pool})]
        order[key] = rnd.sample(pool, len(pool))
    return order


def units_at(order: dict[tuple[int, str], list], fraction: float) -> list[Unit]:
    """The first round(fraction * count) entries of every (block, kind), one always kept:
    nested sets, so larger fractions top up smaller ones."""
    chosen: list[Unit] = []
    for entries in order.values():
        for entry in entries[: min(round(fraction * len(entries)), len(entries) - 1)]:
            chosen += entry if isinstance(entry, list) else [entry]
    return chosen


def run_family(family: str, fractions: list[float], repeats: int, seed: int) -> list[dict]:
    checkpoint, blocks, builder = FAMILIES[family]
    torch.manual_seed(seed)
    model = builder().eval()
    data = inputs_for(family, model)
    base_flops, base_params = count_flops(model, data), count_parameters(model)
    base_wall, base_cpu = time_forward(model, data, repeats)
    order = removal_order(model, family, seed)
    rows = []
    removed: set[Unit] = set()
    for fraction in fractions:
        if fraction > 0:
            extra = [u for u in units_at(order, fraction) if u not in removed]
            prune_units(model, extra)
            removed |= set(extra)
            flops, params = count_flops(model, data), count_parameters(model)
            wall, cpu = time_forward(model, data, repeats)
        else:
            flops, params, wall, cpu = base_flops, base_params, base_wall, base_cpu
        row = {
            "family": family, "widths_of": checkpoint, "blocks": blocks,
            "fraction_of_units": fraction, "units_removed": len(removed),
            "flops_removed": round(1 - flops / base_flops, 4),
            "gflops": round(flops / 1e9, 2), "params_removed": base_params - params,
            "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "wall_ratio": round(wall / base_wall, 3), "cpu_ratio": round(cpu / base_cpu, 3),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    del model
    gc.collect()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| family (widths of) | blocks built / released | units removed (each kind) "
             "| FLOPs removed | GFLOPs | CPU s | CPU ratio | wall ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} ({r['widths_of']}) | {r['blocks']} | "
                     f"{r['fraction_of_units']:.0%} | {r['flops_removed']:.1%} | {r['gflops']} | "
                     f"{r['cpu_s']:.3f} | {r['cpu_ratio']:.3f} | {r['wall_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--fractions", default="0,0.25,0.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        print(f"unknown families {unknown}; choose from {list(FAMILIES)}", file=sys.stderr)
        return 2
    fractions = sorted(float(f) for f in args.fractions.split(","))
    if fractions[0] != 0.0:
        fractions.insert(0, 0.0)
    rows = []
    for family in families:
        rows += run_family(family, fractions, args.repeats, args.seed)
    print(markdown(rows))
    if args.out is not None:
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows},
                                       indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

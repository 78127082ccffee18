"""Sharded, resumable sampling: each shard of seeds is written as one safetensors file.

An interrupted run keeps its finished shards; running again samples only the missing ones.
Under `accelerate launch` the shards are split across processes and gathered through the files.

Example:
    >>> store = ShardStore(Path("runs/x/samples"), shard_size=250)  # doctest: +SKIP
    >>> images = store.sample("before", model, scheduler, labels, seeds, ...)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dit_prune.checkpoint import atomic_write_with


@dataclass(frozen=True)
class ShardStore:
    root: Path
    shard_size: int

    def sample(
        self,
        tag: str,
        draw: Callable[[torch.Tensor, list[int]], torch.Tensor],
        labels: torch.Tensor,
        seeds: Sequence[int],
        fingerprint: str,
        progress: bool = True,
    ) -> torch.Tensor:
        """All images for `seeds` under `tag`, drawing only the shards not on disk yet.

        `draw(labels, seeds)` returns images in [0, 1]; `fingerprint` names the model and
        sampling settings, so shards of another model are never reused.
        """
        from dit_prune.store.distributed import partial_state

        state = partial_state()
        folder = self.root / tag
        folder.mkdir(parents=True, exist_ok=True)
        seeds = list(seeds)
        starts = list(range(0, len(seeds), self.shard_size))
        mine = [n for n in range(len(starts)) if n % state.num_processes == state.process_index]
        bar = tqdm(total=len(seeds), desc=f"sampling {tag}", unit="img", leave=False,
                   disable=not (progress and state.is_main_process))
        for number in mine:
            start = starts[number]
            path = folder / f"shard_{number:05d}.safetensors"
            stop = start + self.shard_size
            if not self._valid(path, fingerprint, seeds[start:stop]):
                images = draw(labels[start:stop], seeds[start:stop]).contiguous()  # (S, C, H, W)
                meta = {"fingerprint": fingerprint,
                        "seeds": ",".join(map(str, seeds[start:stop]))}
                atomic_write_with(path, lambda tmp, im=images, m=meta: save_file(
                    {"images": im}, str(tmp), metadata=m))
            bar.update(len(seeds[start:stop]) * state.num_processes)
        bar.close()
        state.wait_for_everyone()
        return torch.cat([
            load_file(str(folder / f"shard_{n:05d}.safetensors"))["images"]
            for n in range(len(starts))
        ])

    @staticmethod
    def _valid(path: Path, fingerprint: str, seeds: list[int]) -> bool:
        if not path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
        except Exception:  # noqa: BLE001 - a damaged shard is simply drawn again
            return False
        return meta.get("fingerprint") == fingerprint and \
            meta.get("seeds") == ",".join(map(str, seeds))

"""Captions encoded once by a pipeline's own `encode_prompt`, cached, and turned into the
keyword arguments of its transformer.

Each family's `encode_prompt` has its own signature and outputs (diffusers 0.3x–0.4x):

* PixArt-α / Σ: embeds (N, L, D), mask (N, L), negatives -> `encoder_hidden_states`,
  `encoder_attention_mask`, `added_cond_kwargs`.
* Sana: embeds (N, L, D), mask (N, L), negatives -> `encoder_hidden_states`,
  `encoder_attention_mask`.
* Stable Diffusion 3: embeds (N, L, D), negatives, pooled (N, P), negatives ->
  `encoder_hidden_states`, `pooled_projections`.
* Flux: embeds (N, L, D), pooled (N, P), text ids (L, 3) -> `encoder_hidden_states`,
  `pooled_projections`, `txt_ids`.

The cache holds one row per distinct caption and, last, the empty caption (the unconditional
input of classifier-free guidance, as these pipelines' negative prompt defaults to ""). Rows
are padded to one length; a padded mask row is 0 there.

Example:
    >>> from dit_prune.pipelines.digits_text import digits_text_pipeline
    >>> pipe = digits_text_pipeline(layers=1, heads=2, head_dim=8)
    >>> cache = CaptionCache.build(pipe, ["a red dog poster", "a handwritten digit one"])
    >>> cache.null_row, cache.rows(["a handwritten digit one", ""]).tolist()
    (2, [1, 2])
    >>> sorted(cache.model_kwargs(cache.rows(["a red dog poster"])))
    ['added_cond_kwargs', 'encoder_attention_mask', 'encoder_hidden_states']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dit_prune.errors import DitPruneError

PIXART, SANA, SD3, FLUX = "pixart", "sana", "sd3", "flux"
FAMILIES = (PIXART, SANA, SD3, FLUX)
DEFAULT_MAX_SEQUENCE_LENGTH = {PIXART: 120, SANA: 300, SD3: 256, FLUX: 512}


def text_family(pipe: Any) -> str:
    """The text-conditioning family of a pipeline, by its class name; a one-line
    DitPruneError for pipelines whose captions this package cannot encode."""
    name = type(pipe).__name__
    for prefix, family in (("PixArt", PIXART), ("Sana", SANA), ("StableDiffusion3", SD3),
                           ("Flux", FLUX)):
        if name.startswith(prefix):
            return family
    raise DitPruneError(f"captions of {name} are not supported; supported pipelines: PixArt-α/Σ, "
                        "Sana, Stable Diffusion 3, Flux")


@dataclass(frozen=True)
class CaptionCache:
    """Encoded captions: row i of each tensor is `captions[i]`; the last row is "".

    `row_tensors` maps a transformer keyword to a (R, ...) tensor indexed by row; `shared`
    holds keywords that are the same for every row (e.g. Flux's `txt_ids`, (L, 3)).
    """

    family: str
    captions: tuple[str, ...]
    row_tensors: dict[str, torch.Tensor]
    shared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, pipe: Any, captions: Sequence[str],
              max_sequence_length: int | None = None) -> CaptionCache:
        """Encode the distinct `captions` and "" with `pipe.encode_prompt` (no gradients)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise DitPruneError("captions must be a list of strings")
        family = text_family(pipe)
        distinct = [c for c in dict.fromkeys(captions) if c != ""]
        length = max_sequence_length or _default_length(pipe, family)
        rows, shared = _encode(pipe, family, distinct + [""], length)
        dtype = pipe.transformer.dtype
        rows = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rows.items()}
        return cls(family, tuple(distinct) + ("",), rows, shared)

    @property
    def null_row(self) -> int:
        """The row of the empty caption (the unconditional input)."""
        return len(self.captions) - 1

    def rows(self, captions: Sequence[str]) -> torch.Tensor:
        """Row of each caption, (N,) long; a caption not in the cache is a DitPruneError."""
        index = {c: i for i, c in enumerate(self.captions)}
        missing = [c for c in captions if c not in index]
        if missing:
            raise DitPruneError(f"caption not encoded: {missing[0]!r}")
        return torch.tensor([index[c] for c in captions], dtype=torch.long)

    def model_kwargs(self, rows: torch.Tensor) -> dict[str, Any]:
        """Transformer keywords (besides hidden_states and timestep) for caption rows (B,)."""
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        out: dict[str, Any] = {}
        for key, table in self.row_tensors.items():
            out[key] = table[rows.to(table.device)]  # (B, ...)
        out.update(self.shared)
        if self.family == PIXART:
            out["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return out

    def to(self, device: str | torch.device) -> CaptionCache:
        rows = {k: v.to(device) for k, v in self.row_tensors.items()}
        shared = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.shared.items()}
        return CaptionCache(self.family, self.captions, rows, shared)


def _default_length(pipe: Any, family: str) -> int:
    """The pipeline's own default maximum caption length (tokens), or the tokenizer's
    `model_max_length` when that is shorter (small local tokenizers)."""
    import inspect

    param = inspect.signature(pipe.encode_prompt).parameters.get("max_sequence_length")
    length = DEFAULT_MAX_SEQUENCE_LENGTH[family]
    if param is not None and isinstance(param.default, int):
        length = int(param.default)
    limit = getattr(getattr(pipe, "tokenizer", None), "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < length:
        length = limit
    return length


@torch.no_grad()
def _encode(pipe: Any, family: str, captions: list[str],
            length: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    device = pipe.transformer.device
    if family in (PIXART, SANA):
        options: dict[str, Any] = {"clean_caption": False}
        if family == SANA:
            options["complex_human_instruction"] = None
        embeds, mask, _, _ = pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, device=device,
            max_sequence_length=length, **options)  # (N, L, D), (N, L)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}, {}
    if family == SD3:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, device=device,
            do_classifier_free_guidance=False, max_sequence_length=length)  # (N, L, D), (N, P)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}, {}
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions, prompt_2=None, device=device, max_sequence_length=length)
    return ({"encoder_hidden_states": embeds, "pooled_projections": pooled},
            {"txt_ids": text_ids})  # (N, L, D), (N, P); (L, 3)

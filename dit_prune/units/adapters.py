"""Model-family adapters: where each unit kind lives inside a transformer block.

Every supported family (diffusers `DiTTransformer2DModel`, `PixArtTransformer2DModel`) uses
diffusers' `BasicTransformerBlock`: a unit is an input-channel slice of a down-projection
(`attn1.to_out[0]` for heads, `attn2.to_out[0]` for cross-attention heads, `ff.net[2]` for
neurons). Adding a family means adding one adapter file that registers itself in `ADAPTERS`.
A legacy `Transformer2DModel` instance counts as the class diffusers maps it to
(`dit_prune.legacy.family_name`).

Where a unit's channels lie (current numbering, unit at position p, width w):

| kind | up-projection rows | down-projection columns |
|---|---|---|
| head, cross_head | `[p·w, (p+1)·w)` of `to_q`, `to_k`, `to_v` | same range of `to_out[0]` |
| neuron | `p` of `ff.net[0].proj` (GEGLU/SwiGLU: `p` and `inner + p`) | `p` of `ff.net[2]` |

Example:
    >>> from dit_prune.models import new_dit
    >>> adapter = adapter_for(new_dit("tiny", 10, 8, 1))
    >>> adapter.kinds
    ('head', 'neuron')
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dit_prune.errors import DitPruneError
from dit_prune.legacy import family_name
from dit_prune.units.unit import CROSS_HEAD, HEAD, NEURON

KEPT_ATTRIBUTE = "dit_prune_kept"  # per-block {kind: original indices still present}
GLU_ACTIVATIONS = ("GEGLU", "SwiGLU")  # diffusers activations whose proj holds [value; gate]


@dataclass(frozen=True)
class BlockAdapter:
    """Finds the layers of one unit kind in a diffusers BasicTransformerBlock-based model."""

    family: str
    kinds: tuple[str, ...]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer_blocks)

    def attention(self, block: nn.Module, kind: str) -> nn.Module:
        """The Attention module holding heads of `kind` ('head' -> attn1, 'cross_head' -> attn2)."""
        if kind == HEAD:
            return block.attn1
        if kind == CROSS_HEAD and CROSS_HEAD in self.kinds:
            return block.attn2
        raise DitPruneError(f"{self.family} has no units of kind {kind!r}")

    def down_proj(self, block: nn.Module, kind: str) -> nn.Linear:
        """The Linear whose input channels are the units of `kind`."""
        if kind == NEURON:
            return block.ff.net[2]
        return self.attention(block, kind).to_out[0]

    def up_proj(self, block: nn.Module, kind: str) -> list[nn.Linear]:
        """The Linears whose output channels feed the units of `kind`."""
        if kind == NEURON:
            return [block.ff.net[0].proj]
        attn = self.attention(block, kind)
        return [attn.to_q, attn.to_k, attn.to_v]

    def is_glu(self, block: nn.Module, kind: str) -> bool:
        """True for neurons of a GEGLU/SwiGLU feed-forward: proj rows j and inner+j pair up."""
        return kind == NEURON and type(block.ff.net[0]).__name__ in GLU_ACTIVATIONS

    def up_rows(self, block: nn.Module, kind: str, positions: list[int]) -> list[int]:
        """Output rows of every up-projection that the units at `positions` own (sorted)."""
        width = self.width(block, kind)
        rows = [p * width + c for p in positions for c in range(width)]
        if self.is_glu(block, kind):
            inner = self.down_proj(block, kind).in_features
            rows += [inner + r for r in rows]  # the gate half: GEGLU/SwiGLU chunk(2, dim=-1)
        return sorted(rows)

    def down_columns(self, block: nn.Module, kind: str, positions: list[int]) -> list[int]:
        """Input columns of the down-projection that the units at `positions` own (sorted)."""
        width = self.width(block, kind)
        return sorted(p * width + c for p in positions for c in range(width))

    def up_rows_per_unit(self, block: nn.Module, kind: str) -> int:
        """Up-projection rows one unit owns: its width, twice that for GLU neurons."""
        return self.width(block, kind) * (2 if self.is_glu(block, kind) else 1)

    def width(self, block: nn.Module, kind: str) -> int:
        """Channels per unit: the head dimension for heads, 1 for neurons."""
        if kind == NEURON:
            return 1
        attn = self.attention(block, kind)
        return attn.inner_dim // attn.heads

    def count(self, block: nn.Module, kind: str) -> int:
        """Units of `kind` currently present in `block`."""
        return self.down_proj(block, kind).in_features // self.width(block, kind)

    def kept(self, block: nn.Module, kind: str) -> list[int]:
        """Original (unpruned) indices of the units present, in their current order."""
        recorded = getattr(block, KEPT_ATTRIBUTE, {}).get(kind)
        return list(recorded) if recorded is not None else list(range(self.count(block, kind)))

    def set_kept(self, block: nn.Module, kind: str, indices: list[int]) -> None:
        recorded = dict(getattr(block, KEPT_ATTRIBUTE, {}))
        recorded[kind] = [int(i) for i in indices]
        setattr(block, KEPT_ATTRIBUTE, recorded)


ADAPTERS: dict[str, BlockAdapter] = {
    "DiTTransformer2DModel": BlockAdapter("DiTTransformer2DModel", (HEAD, NEURON)),
    "PixArtTransformer2DModel": BlockAdapter(
        "PixArtTransformer2DModel", (HEAD, NEURON, CROSS_HEAD)
    ),
}


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The adapter of `model`'s family; a one-line error for anything unsupported."""
    adapter = ADAPTERS.get(family_name(model))
    if adapter is None or not hasattr(model, "transformer_blocks"):
        raise DitPruneError(
            f"unsupported model: {type(model).__name__} (supported: {', '.join(ADAPTERS)}, "
            f"and Transformer2DModel with norm_type ada_norm_zero or ada_norm_single)"
        )
    return adapter

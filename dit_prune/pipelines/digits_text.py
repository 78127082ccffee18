"""The embedded text-to-image pipeline: a pixel-space PixArt DiT with a tiny local T5.

`digits_text_pipeline` builds an untrained `PixArtSigmaPipeline` for the 8×8 digits: a
`PixArtTransformer2DModel` on pixels (patch 2, 16 tokens, ε-prediction, DDPM schedule), decoded
by `IdentityVAE`, conditioned on captions encoded by a one-layer `T5EncoderModel` with random,
frozen weights and a unigram tokenizer built locally over `CAPTION_WORDS`: nothing is
downloaded. `dit-prune train --model text` trains it (`dit_prune.text_training`).

Example:
    >>> pipe = digits_text_pipeline(layers=1, heads=2, head_dim=8)
    >>> type(pipe).__name__, tuple(pipe.tokenizer("a red dog poster").input_ids)
    ('PixArtSigmaPipeline', (3, 17, 28, 6, 1))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

from dit_prune.errors import DitPruneError
from dit_prune.pipelines.vae import IdentityVAE
from dit_prune.text_data import CAPTION_WORDS

MAX_SEQUENCE_LENGTH = 8  # tokens per caption (the longest digits caption has 5, with </s>)


def word_tokenizer(words: Sequence[str] = CAPTION_WORDS) -> Any:
    """A T5 (unigram) tokenizer whose vocabulary is <pad>, </s>, <unk> and `words`, built locally
    with the tokenizers library. Unknown words map to <unk> (id 2)."""
    from transformers import T5Tokenizer

    if len(set(words)) != len(words) or not words:
        raise DitPruneError("tokenizer words must be distinct and at least one")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH  # CaptionCache encodes up to this length
    return tokenizer


def small_t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0) -> Any:
    """A one-layer T5 encoder with random weights, frozen, in eval mode."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model,
                      num_layers=1, num_heads=2, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval().requires_grad_(False)


def digits_text_pipeline(
    seed: int = 0, layers: int = 4, heads: int = 4, head_dim: int = 32, text_dim: int = 32,
    sample_size: int = 8, channels: int = 1, num_train_timesteps: int = 1000,
) -> PixArtSigmaPipeline:
    """An untrained pixel-space PixArt-Σ pipeline for `channels`×`sample_size`² images.

    Transformer: `layers` blocks of `heads` × `head_dim` (self- and cross-attention, FF 4×),
    patch 2, one output per input channel (ε, no learned variance). Text encoder: T5 with
    `text_dim` channels over `CAPTION_WORDS`. Scheduler: DDPM, `num_train_timesteps` steps.
    """
    tokenizer = word_tokenizer()
    text_encoder = small_t5_encoder(len(tokenizer), text_dim, seed)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
        out_channels=channels, num_layers=layers, cross_attention_dim=heads * head_dim,
        sample_size=sample_size, patch_size=2, caption_channels=text_dim, norm_num_groups=1,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=IdentityVAE(),
        transformer=transformer, scheduler=DDPMScheduler(num_train_timesteps=num_train_timesteps),
    )

"""Tiny randomly initialised pipelines (nothing downloaded) for tests, benchmarks and examples.

Example:
    >>> pipe = tiny_pixart_pipeline()
    >>> type(pipe).__name__, pipe.tokenizer("a red cat").input_ids
    ('PixArtAlphaPipeline', [3, 20, 18, 1])
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)

from dit_prune.models import disable_block_label_dropout
from dit_prune.pipelines.dit import pixel_dit_pipeline

WORDS = ("a photo of the digit zero one two three four five six seven eight nine cat dog red "
         "blue green small large").split()


def tiny_vae(seed: int = 0, latent_channels: int = 4) -> AutoencoderKL:
    """AutoencoderKL with two 8-channel blocks: 16x16 RGB images <-> 8x8 latents."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=2, sample_size=16,
    ).eval()


def tiny_dit(
    seed: int = 0, in_channels: int = 4, num_classes: int = 10, learn_sigma: bool = True,
    layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8,
) -> DiTTransformer2DModel:
    """A small class-conditional DiT (per-block label dropout off)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels, num_layers=layers,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes, norm_num_groups=1,
    )
    disable_block_label_dropout(model)
    return model.eval()


def tiny_latent_dit_pipeline(seed: int = 0, num_classes: int = 10) -> DiTPipeline:
    """DiTPipeline: tiny latent DiT (8x8x4) + tiny AutoencoderKL (16x16 RGB) + DDIM."""
    return DiTPipeline(transformer=tiny_dit(seed, num_classes=num_classes), vae=tiny_vae(seed),
                       scheduler=DDIMScheduler())


def tiny_pixel_dit_pipeline(seed: int = 0, num_classes: int = 10) -> DiTPipeline:
    """DiTPipeline around a pixel-space DiT (8x8, 1 channel) with IdentityVAE."""
    model = tiny_dit(seed, in_channels=1, num_classes=num_classes, learn_sigma=False)
    return pixel_dit_pipeline(model, DDIMScheduler())


def tiny_tokenizer() -> object:
    """A T5 tokenizer (unigram) over a few words, built locally with the tokenizers library."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_t5_encoder(seed: int = 0, d_model: int = 16) -> object:
    """A one-layer T5 encoder with random weights (eval mode: no dropout)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=32, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def tiny_pixart_transformer(seed: int = 0, caption_channels: int = 16) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, caption_channels=caption_channels,
        norm_num_groups=1,
    ).eval()


def tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArtAlphaPipeline: tiny PixArt transformer + tiny T5 + local tokenizer + tiny VAE."""
    return PixArtAlphaPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5_encoder(seed), vae=tiny_vae(seed),
        transformer=tiny_pixart_transformer(seed), scheduler=DDIMScheduler(),
    )

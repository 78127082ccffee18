"""Tiny randomly initialised pipelines (nothing downloaded) for tests, benchmarks and examples:
class-conditional DiT, PixArt-α / Σ, Stable Diffusion 3, Flux and Sana, each with local
tokenizers (a few words, or single letters for CLIP) and one-layer text encoders.

Example:
    >>> pipe = tiny_pixart_pipeline()
    >>> type(pipe).__name__, pipe.tokenizer("a red cat").input_ids
    ('PixArtAlphaPipeline', [3, 20, 18, 1])
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
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


def tiny_pixart_sigma_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArtSigmaPipeline: tiny PixArt transformer + tiny T5 + local tokenizer + tiny VAE."""
    return PixArtSigmaPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5_encoder(seed), vae=tiny_vae(seed),
        transformer=tiny_pixart_transformer(seed), scheduler=DDPMScheduler(),
    )


def tiny_clip_tokenizer(max_length: int = 16) -> object:
    """A CLIP (BPE) tokenizer over single letters, built locally: every word is spelled out."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = max_length
    return tokenizer


def tiny_clip_encoder(seed: int = 0, projection: bool = True, max_length: int = 16) -> object:
    """A one-layer CLIP text encoder (16 channels) for `tiny_clip_tokenizer`, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
                            max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def tiny_kl_vae(seed: int = 0, latent_channels: int = 4) -> AutoencoderKL:
    """`tiny_vae` with a latent shift and scale, as SD3's and Flux's VAEs have."""
    vae = tiny_vae(seed, latent_channels)
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    return vae


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """StableDiffusion3Pipeline: tiny SD3 MMDiT (8x8x4 latents, patch 2), two tiny CLIP
    encoders (no T5: SD3 then uses zeros for it), tiny VAE, flow matching with shift 3."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_kl_vae(seed), text_encoder=tiny_clip_encoder(seed),
        tokenizer=tiny_clip_tokenizer(), text_encoder_2=tiny_clip_encoder(seed + 1),
        tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FluxPipeline: tiny Flux transformer (one double, one single block; 2x2-packed 1-channel
    latents), tiny CLIP + tiny T5 over the local word tokenizer, tiny VAE, flow matching.
    Flux has no sample size: pass height and width (e.g. 16) when generating."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                      num_heads=2, relative_attention_num_buckets=8)
    torch.manual_seed(seed)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_kl_vae(seed, latent_channels=1),
        text_encoder=tiny_clip_encoder(seed, projection=False), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=T5EncoderModel(config).eval(), tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )


def tiny_sana_pipeline(seed: int = 0) -> SanaPipeline:
    """SanaPipeline: tiny Sana linear-attention DiT (16x16x4 latents, patch 1), tiny Gemma-2
    encoder over the local word tokenizer, tiny AutoencoderDC (32x32 RGB), flow matching."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
        attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
        cross_attention_dim=8, caption_channels=8, sample_size=16,
    ).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.41,
    ).eval()
    torch.manual_seed(seed)
    encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(WORDS) + 3, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=512,
        pad_token_id=0)).eval()
    return SanaPipeline(tokenizer=tiny_tokenizer(), text_encoder=encoder, vae=vae,
                        transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

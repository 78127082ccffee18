"""An identity "VAE" for pixel-space DiTs, and moving images in and out of a pipeline's model space.

diffusers' `DiTPipeline` always decodes through `vae.decode(latents / scaling_factor)`. A
pixel-space DiT (our checkpoints: transformer + scheduler, no VAE) gets `IdentityVAE`, which
returns its input unchanged, so the stock pipeline generates, saves and reloads as usual
(`model_index.json` names it as `["dit_prune.pipelines.vae", "IdentityVAE"]`).

Example:
    >>> import torch
    >>> vae = IdentityVAE()
    >>> x = torch.randn(2, 1, 8, 8)
    >>> bool(torch.equal(vae.decode(x).sample, x)), vae.config.scaling_factor
    (True, 1.0)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput

from dit_prune.errors import DitPruneError


class IdentityVAE(ModelMixin, ConfigMixin):
    """Decoder and encoder that change nothing: pixel-space models in latent-model pipelines.

    `block_out_channels` has one entry so pipelines that derive a VAE scale factor from it
    (`2 ** (len(block_out_channels) - 1)`, PixArt) get 1: image side = model side.
    """

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (1,)):
        super().__init__()
        if len(block_out_channels) != 1:
            raise DitPruneError("IdentityVAE needs exactly one block_out_channels entry (scale 1)")
        # a buffer so that `.device` / `.dtype` resolve although there are no parameters
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> IdentityVAE:
        """Rebuild from the saved config alone (there are no weights to load)."""
        config = cls.load_config(str(pretrained_model_name_or_path))
        return cls.from_config(config)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Return `z` itself (N, C, H, W): pixel-space samples are already images in [-1, 1]."""
        return DecoderOutput(sample=z) if return_dict else (z,)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        """Return `x` itself wrapped like AutoencoderKL's output (`latent_dist.mode()` is `x`)."""
        dist = _PointDistribution(x)
        return _EncoderOutput(dist) if return_dict else (dist,)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return sample


class _PointDistribution:
    """The latent distribution of an identity encoder: all mass at the input."""

    def __init__(self, value: torch.Tensor):
        self.mean = value  # (N, C, H, W)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean


class _EncoderOutput:
    def __init__(self, dist: _PointDistribution):
        self.latent_dist = dist


def vae_shift_factor(pipe: Any) -> float:
    """The VAE's latent shift (SD3 / Flux VAEs; 0.0 when it has none)."""
    return float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)


def vae_scaling_factor(pipe: Any) -> float:
    """The pipeline VAE's latent scaling factor (1.0 for `IdentityVAE`)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise DitPruneError(f"{type(pipe).__name__} has no VAE; build it with an IdentityVAE")
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


@torch.no_grad()
def encode_images(pipe: Any, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> the transformer's input space:
    (latents - shift factor) x scaling factor, as the pipelines decode them back.

    Deterministic: uses the mode of the VAE's latent distribution (`AutoencoderKL`), or the
    latent itself for VAEs without one (Sana's `AutoencoderDC` returns `.latent`). For an
    `IdentityVAE` this is the images themselves. Use it to turn training/held-out images into
    scoring data.

    Example:
        >>> from dit_prune.pipelines import pixel_dit_pipeline
        >>> from dit_prune.models import new_dit
        >>> import diffusers
        >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
        >>> encode_images(pipe, torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 1, 8, 8])
    """
    if images.ndim != 4:
        raise DitPruneError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    vae = pipe.vae
    scale, shift = vae_scaling_factor(pipe), vae_shift_factor(pipe)
    param = next(iter(pipe.transformer.parameters()))
    expected = getattr(vae.config, "in_channels", None)
    if expected is not None and images.shape[1] != expected:
        raise DitPruneError(f"the VAE takes {expected}-channel images, got {images.shape[1]}")
    out: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(vae.device, vae.dtype)  # (B, C, H, W)
        encoded = vae.encode(chunk)
        dist = getattr(encoded, "latent_dist", None)
        latents = dist.mode() if dist is not None else encoded.latent  # (B, c, h, w)
        latents = (latents - shift) * scale  # (B, c, h, w)
        out.append(latents.to(param.device, param.dtype))
    return torch.cat(out) if out else images.new_zeros((0, *images.shape[1:]))


def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `encode_images`: transformer-space latents (B, c, h, w) -> images
    (B, C, H, W) in about [-1, 1] (not clamped), through `vae.decode(latents / scaling factor +
    shift factor)`, as the pipelines decode. Differentiable (the re-trigger attack backpropagates
    through it); the images come back on the latents' device, in float32.

    Example:
        >>> from dit_prune.pipelines.tiny import tiny_sd3_pipeline
        >>> pipe = tiny_sd3_pipeline()
        >>> decode_latents(pipe, torch.zeros(2, 4, 8, 8)).shape
        torch.Size([2, 3, 16, 16])
    """
    if latents.ndim != 4:
        raise DitPruneError(f"latents must be (B, c, h, w), got shape {tuple(latents.shape)}")
    vae = pipe.vae
    scale, shift = vae_scaling_factor(pipe), vae_shift_factor(pipe)
    z = (latents / scale + shift).to(vae.device, vae.dtype)  # (B, c, h, w)
    return vae.decode(z).sample.to(latents.device, torch.float32)  # (B, C, H, W)

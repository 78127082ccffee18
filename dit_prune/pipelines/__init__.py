"""The diffusers wrapper: score and prune a pipeline's transformer, get a normal pipeline back.

Supported: `DiTPipeline` with an `AutoencoderKL` (latent DiT), pixel-space DiTs (our
checkpoints, decoded by `IdentityVAE`), and `PixArtAlphaPipeline` with a T5 text encoder.
See docs/pipelines.md.

Example:
    >>> import diffusers, tempfile
    >>> from dit_prune.models import new_dit
    >>> from dit_prune.units import Unit
    >>> pipe = pixel_dit_pipeline(new_dit("tiny", 10, 8, 1), diffusers.DDIMScheduler())
    >>> pruned = prune_pipeline(pipe, [Unit("head", 0, 1), Unit("neuron", 1, 5)])
    >>> images = generate_decoded(pruned, [3, 7], seeds=[0, 1], steps=2, guidance_scale=2.0)
    >>> path = tempfile.mkdtemp() + "/pruned"
    >>> pruned.save_pretrained(path)
    >>> again = generate_decoded(load_pruned_pipeline(path), [3, 7], [0, 1], 2, 2.0)
    >>> bool(torch.equal(images, again))
    True
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the doctest above)

from dit_prune.pipelines.dit import (
    dit_null_class,
    dit_pipeline_from_checkpoint,
    num_classes,
    pixel_dit_pipeline,
)
from dit_prune.pipelines.generate import generate_decoded, pipeline_kind
from dit_prune.pipelines.io import load_pruned_pipeline, save_pipeline
from dit_prune.pipelines.measure import measure_memorization
from dit_prune.pipelines.prune import (
    PipelinePruneResult,
    copy_pipeline,
    prune_pipeline,
    score_and_prune_pipeline,
    score_units,
    sync_structure_config,
)
from dit_prune.pipelines.text import (
    EncodedCaptions,
    TextCalibrationData,
    encode_captions,
    null_label,
    text_calibration_data,
    text_conditioning,
)
from dit_prune.pipelines.vae import IdentityVAE, encode_images

__all__ = [
    "EncodedCaptions",
    "IdentityVAE",
    "PipelinePruneResult",
    "TextCalibrationData",
    "copy_pipeline",
    "dit_null_class",
    "dit_pipeline_from_checkpoint",
    "encode_captions",
    "encode_images",
    "generate_decoded",
    "load_pruned_pipeline",
    "measure_memorization",
    "null_label",
    "num_classes",
    "pipeline_kind",
    "pixel_dit_pipeline",
    "prune_pipeline",
    "save_pipeline",
    "score_and_prune_pipeline",
    "score_units",
    "sync_structure_config",
    "text_calibration_data",
    "text_conditioning",
]

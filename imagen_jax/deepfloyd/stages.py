"""IF stage directories as cascade stages: a `Stage` on IF's schedule, its params and spec.

Stage I (3 input channels) is a base stage at the config's `sample_size`; stage II (6 input
channels) is super-resolution by `lowres_factor` (IF-II: 64 -> 256, factor 4). Both use the
'deepfloyd' schedule (IF's discrete 1000-step cosine, `diffusion.discrete`) for the image and
for stage II's noise-conditioning augmentation, whose sampling level defaults to IF's
noise_level 250 (level 0.251: IF step n = 1000 t - 1). Sample them with IF's dynamic-
thresholding percentile (`IF_THRESHOLD_PERCENTILE`, 95) rather than the paper's 99.5.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

from imagen_jax.deepfloyd import IF_PREFIX, checkpoints
from imagen_jax.diffusion import discrete
from imagen_jax.errors import UserError
from imagen_jax.nn import deepfloyd_unet
from imagen_jax.stage import Stage, StageConfig, stage_spec

IF_TEXT_LENGTH = 77  # IF's T5 max length
IF_AUG_LEVEL = 0.251  # IF's default stage-II noise_level 250
IF_THRESHOLD_PERCENTILE = discrete.IF_THRESHOLD_PERCENTILE
IF_MAX_THRESHOLD = discrete.IF_MAX_THRESHOLD


def if_network_and_config(
  path: str,
  lowres_factor: int = 4,
  resolution: int | None = None,
  dtype: Any = jnp.float32,
  text_drop_prob: float = 0.0,
) -> tuple[deepfloyd_unet.DeepFloydStageNet, StageConfig]:
  """The network and stage recipe an IF stage dir describes (no weights read).

  Args:
    path: the stage dir (`if:` prefix allowed), holding unet/config.json.
    lowres_factor: stage II's upsampling factor (IF-II: 4).
    resolution: output resolution (default: the config's sample_size; the network is fully
      convolutional).
    dtype: the network's compute dtype (params stay float32).
    text_drop_prob: text dropout when fine-tuning. Default 0: our dropped condition is zeros
      while IF's null condition is T5(""), so fine-tuning leaves the unconditional branch as IF
      trained it rather than teaching it a second one.
  """
  path = path.removeprefix(IF_PREFIX)
  if not os.path.isdir(path):
    raise UserError(
      f"DeepFloyd IF stage dir {path!r} does not exist; pass if:PATH to a diffusers IF dir"
    )
  unet = checkpoints.network_from_config(checkpoints.read_config(path), dtype=dtype)
  sr = unet.in_channels == 6
  if not sr and unet.in_channels != 3:
    raise UserError(
      f"DeepFloyd IF stage {path!r} has in_channels={unet.in_channels}; IF stage I has 3, stage II 6"
    )
  resolution = resolution or unet.sample_size
  config = StageConfig(
    name=os.path.basename(os.path.normpath(path)) or "deepfloyd",
    resolution=resolution,
    lowres_resolution=resolution // lowres_factor if sr else None,
    schedule="deepfloyd",
    objective="eps",
    text_drop_prob=text_drop_prob,
    aug_schedule="deepfloyd",
    aug_sample_level=IF_AUG_LEVEL,
    sample_percentile=IF_THRESHOLD_PERCENTILE,
    sample_max_threshold=IF_MAX_THRESHOLD,
  )
  return deepfloyd_unet.DeepFloydStageNet(unet, lowres_factor if sr else None), config


def if_stage(
  path: str,
  lowres_factor: int = 4,
  resolution: int | None = None,
  dtype: Any = jnp.float32,
  max_length: int = IF_TEXT_LENGTH,
) -> tuple[Stage, dict[str, Any], dict[str, Any]]:
  """The Stage, params and spec of an IF stage dir (diffusers layout).

  Args:
    path: the stage dir (`if:` prefix allowed), holding unet/config.json and its weights.
    lowres_factor / resolution / dtype: as `if_network_and_config`.
    max_length: text length the stage is sampled with.

  Returns:
    (stage, params {'unet': ...}, its stage spec with the source dir and the pipeline's text
    encoder reference).
  """
  network, config = if_network_and_config(path, lowres_factor, resolution, dtype)
  path = path.removeprefix(IF_PREFIX)
  params = {"unet": checkpoints.load_params(path, network.unet)}
  spec = stage_spec(
    network,
    config,
    max_length,
    network.unet.encoder_hid_dim,
    source={"deepfloyd_dir": os.path.abspath(path)},
    encoder=pipeline_encoder(path, max_length),
  )
  return Stage(network, config), params, spec


def pipeline_encoder(path: str, max_length: int = IF_TEXT_LENGTH) -> dict[str, Any]:
  """The text-encoder reference of an IF stage dir (what `cascade` loads unless overridden).

  IF's T5 keeps its outputs at padding positions and its null condition is T5(""), so the
  reference says `zero_padding: False`. A full pipeline download (DeepFloyd/IF-I-XL-v1.0)
  holds the encoder as `text_encoder/` (Hugging Face T5, size read from its config.json) and
  `tokenizer/spiece.model`; both are referenced when present.
  """
  from imagen_jax.text import t5_checkpoints

  ref: dict[str, Any] = {"max_length": max_length, "dtype": "bfloat16", "zero_padding": False}
  text_encoder = os.path.join(path, "text_encoder")
  if os.path.isfile(os.path.join(text_encoder, "config.json")):
    try:
      ref["size"] = t5_checkpoints.hf_size_name(text_encoder)
    except ValueError as e:
      raise UserError(f"DeepFloyd IF dir {path!r}: {e}") from e
    ref["checkpoint"] = os.path.abspath(text_encoder)
  tokenizer = os.path.join(path, "tokenizer")
  if os.path.isfile(os.path.join(tokenizer, "spiece.model")):
    ref.update(vocab_file="spiece.model", data_dir=os.path.abspath(tokenizer))
  return ref

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

from imagen_jax.deepfloyd import checkpoints
from imagen_jax.diffusion import discrete
from imagen_jax.errors import UserError
from imagen_jax.nn import deepfloyd_unet
from imagen_jax.stage import Stage, StageConfig

IF_TEXT_LENGTH = 77  # IF's T5 max length
IF_AUG_LEVEL = 0.251  # IF's default stage-II noise_level 250
IF_THRESHOLD_PERCENTILE = discrete.IF_THRESHOLD_PERCENTILE
PREFIX = "if:"


def is_if_stage_dir(stage_dir: str) -> bool:
  """Whether a --stage_dirs entry names an IF stage (`if:PATH`)."""
  return stage_dir.startswith(PREFIX)


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
    lowres_factor: stage II's upsampling factor (IF-II: 4).
    resolution: output resolution (default: the config's sample_size; the network is fully
      convolutional).
    dtype: the network's compute dtype (params stay float32).
    max_length: text length the stage is sampled with.

  Returns:
    (stage, params {'unet': ...}, spec with name, text_dim, max_length and source).
  """
  path = path[len(PREFIX) :] if is_if_stage_dir(path) else path
  if not os.path.isdir(path):
    raise UserError(
      f"DeepFloyd IF stage dir {path!r} does not exist; pass if:PATH to a diffusers IF dir"
    )
  config = checkpoints.read_config(path)
  unet = checkpoints.network_from_config(config, dtype=dtype)
  sr = unet.in_channels == 6
  if not sr and unet.in_channels != 3:
    raise UserError(
      f"DeepFloyd IF stage {path!r} has in_channels={unet.in_channels}; IF stage I has 3, stage II 6"
    )
  resolution = resolution or unet.sample_size
  name = os.path.basename(os.path.normpath(path)) or "deepfloyd"
  stage_config = StageConfig(
    name=name,
    resolution=resolution,
    lowres_resolution=resolution // lowres_factor if sr else None,
    schedule="deepfloyd",
    objective="eps",
    aug_schedule="deepfloyd",
    aug_sample_level=IF_AUG_LEVEL,
  )
  network = deepfloyd_unet.DeepFloydStageNet(unet, lowres_factor if sr else None)
  params = {"unet": checkpoints.load_params(path, unet)}
  spec = {
    "name": name,
    "text_dim": unet.encoder_hid_dim,
    "max_length": max_length,
    "source": {"deepfloyd_dir": os.path.abspath(path)},
  }
  return Stage(network, stage_config), params, spec

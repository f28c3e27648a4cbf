"""Where a fresh run's weights come from: `train.train.init_from` (fine-tuning).

- `if:PATH`: a DeepFloyd IF stage dir (diffusers layout). The run's network and stage recipe
  are IF's own (`deepfloyd.stages.if_stage`) unless gin sets them; the weights are read
  straight into the parameter shardings.
- a MODEL_DIR of ours: the newest loadable checkpoint's EMA params (the network must be the
  same).

Only a run with no checkpoint of its own starts from them: once MODEL_DIR holds a step, the
job resumes from it (as t5x's initial checkpoint), so a preempted fine-tune continues.
"""

from __future__ import annotations

import os
from typing import Any

from flax import linen as nn
from flax import traverse_util

from imagen_jax import checkpoints
from imagen_jax.deepfloyd import IF_PREFIX
from imagen_jax.errors import UserError
from imagen_jax.inference import loaders
from imagen_jax.stage import StageConfig


def check_init_from(init_from: str | None) -> None:
  """UserError before any compile when `init_from` names nothing loadable."""
  problem = init_from and loaders.stage_dir_problem(init_from)
  if problem:
    raise UserError(
      f"train.train.init_from={init_from!r} {problem}; pass if:PATH (a DeepFloyd IF stage "
      "dir) or a MODEL_DIR holding checkpoints/"
    )


def network_and_stage(
  init_from: str | None, network: nn.Module | None, stage: StageConfig | None
) -> tuple[nn.Module, StageConfig]:
  """The run's network and stage recipe: gin's, else (for `if:PATH`) the IF dir's."""
  if (network is None or stage is None) and init_from and init_from.startswith(IF_PREFIX):
    from imagen_jax.deepfloyd import stages as if_stages

    if_network, if_config = if_stages.if_network_and_config(init_from)
    network = network if network is not None else if_network
    stage = stage if stage is not None else if_config
  if network is None or stage is None:
    missing = "network" if network is None else "stage"
    raise UserError(
      f"train.train.{missing} is not set; include a configs/stages/*.gin recipe, or set "
      "train.train.init_from='if:PATH' to fine-tune a DeepFloyd IF stage"
    )
  return network, stage


def initial_params(init_from: str, network: nn.Module, abstract_params: Any) -> Any:
  """The pretrained params, placed in the shardings `abstract_params` carries.

  Args:
    init_from: 'if:PATH' or a MODEL_DIR.
    network: the run's network (for IF: a `DeepFloydStageNet`).
    abstract_params: ShapeDtypeStructs (with shardings) of the run's params.
  """
  if init_from.startswith(IF_PREFIX):
    from imagen_jax.deepfloyd import checkpoints as if_checkpoints

    unet = getattr(network, "unet", None)
    if unet is None or set(abstract_params) != {"unet"}:
      raise UserError(
        f"train.train.init_from={init_from!r} is a DeepFloyd IF dir but the network is "
        f"{type(network).__name__}; leave train.train.network unset to use IF's"
      )
    flat = traverse_util.flatten_dict(abstract_params["unet"], sep="/")
    shardings = {k: v.sharding for k, v in flat.items()}
    path = init_from.removeprefix(IF_PREFIX)
    return {"unet": if_checkpoints.load_params(path, unet, shardings=shardings)}
  ckpt = checkpoints.Checkpointer(os.path.join(init_from, "checkpoints"), async_save=False)
  try:
    loaded = ckpt.load_newest(lambda s: ckpt.restore_ema_params(s, abstract_params))
  finally:
    ckpt.close()
  if loaded is None:
    raise UserError(f"train.train.init_from={init_from!r} has no finalized checkpoint")
  return loaded[1]

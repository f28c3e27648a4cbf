"""The parts of a training job's configuration, grouped by what they configure.

`train.train` (the gin face, bindings under `train.train.*`) takes them flat, as users' gin files
bind them, and groups them here; `training.job.run` and the loop read the groups.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from imagen_jax.training import evaluation


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How long the run is and where it starts."""

  model_dir: str  # checkpoints, TensorBoard events, metrics.jsonl, sample grids (local or gs://)
  num_train_steps: int  # the run's total steps: it stops there; rerunning continues
  seed: int = 0  # model RNG (init, noise, timesteps)
  max_steps_this_run: int | None = None  # stop this process early; the next launch continues
  init_from: str | None = None  # a fresh run's weights: 'if:PATH' or another MODEL_DIR


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the examples come from and in what order."""

  data_dir: str  # precomputed shards, or a TFDS dir with `text_encoder`
  seed: int = 0  # shuffling seed
  text_encoder: Any = None  # encode captions on the fly instead of reading embeddings
  tfds_name: str | None = None  # with `text_encoder`: the TFDS dataset in data_dir
  expected_encoder: dict | None = None  # identity the precomputed embeddings must match


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """The checkpoint policy (orbax, under MODEL_DIR/checkpoints)."""

  every: int = 5000
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  """What the run reports while it trains, and when it gives up."""

  log_every: int = 100  # console, TensorBoard and metrics.jsonl period (steps)
  max_consecutive_nonfinite: int = 20  # skipped updates in a row before the run stops
  sample_every: int = 0  # EMA sample grid period (0 = never)
  num_sample_images: int = 8
  sample_steps: int = 64
  sample_guidance_weight: float = 3.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """The validation loss of the EMA params at fixed times and noise (0 = off)."""

  every: int = 0
  batches: int = 4
  t_grid: tuple[float, ...] = evaluation.EVAL_T_GRID

  def checked_t_grid(self) -> tuple[float, ...]:
    """The t grid, after checking the settings (raises ValueError with the fix)."""
    return evaluation.check_eval_settings(self.every, self.batches, self.t_grid)

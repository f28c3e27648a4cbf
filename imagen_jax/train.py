"""`train.train`: the training job for one cascade stage as gin configures it.

`imagen-jax train --gin_file=configs/stages/base64.gin --gin_file=configs/runs/pretrain.gin
  --gin.MODEL_DIR="'/tmp/base64'" --gin.DATA="'/data/precomputed'"` calls `train(...)` with
everything bound by gin under `train.train.*` (the names users' gin files bind). It groups them
into `training.config` parts and runs `training.job.run`, which:
  1. validates the config (batch vs mesh, model dir, data) before compiling anything;
  2. opens the data and checks its shapes against the network;
  3. compiles one train step ahead of time (FLOPs and memory known before step 1);
  4. restores the newest loadable checkpoint and the data iterator's position, else initialises
     params, optimizer state and EMA straight into their shardings;
  5. trains, logging to the console and TensorBoard, writing sample grids, saving
     asynchronously; on SIGTERM/preemption it saves and exits cleanly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import optax
from flax import linen as nn
from jax.sharding import Mesh

from imagen_jax import parallel
from imagen_jax.stage import StageConfig
from imagen_jax.training import evaluation
from imagen_jax.training import job as job_lib
from imagen_jax.training import loop as run_loop
from imagen_jax.training import program as train_program
from imagen_jax.training.config import (
  CheckpointConfig,
  DataConfig,
  EvalConfig,
  MonitorConfig,
  RunConfig,
)
from imagen_jax.training.hooks import StepHook

EVAL_T_GRID = evaluation.EVAL_T_GRID  # the gin default of train.train.eval_t_grid
EVAL_PLOT = evaluation.EVAL_PLOT
TrainingError = run_loop.TrainingError  # what `imagen-jax train` reports as one line


# ================================================================================================
# The gin face of the job (`train.train.*`)
# ================================================================================================


def step_settings(
  batch_size: int,
  max_length: int = 128,
  text_dim: int = 4096,
  ema_decay: float = 0.9999,
  ema_warmup: bool = True,
  num_microbatches: int = 1,
  **unused: Any,
) -> train_program.StepSettings:
  """The compiled step's settings from `train`'s arguments (unused ones ignored), with `train`'s
  defaults: `imagen-jax compile` reads the same gin bindings through it."""
  del unused
  return train_program.StepSettings(
    batch_size, max_length, text_dim, ema_decay, ema_warmup, num_microbatches
  )


def train(
  *,
  model_dir: str,
  data_dir: str,
  stage: StageConfig | None = None,
  network: nn.Module | None = None,
  batch_size: int,
  num_train_steps: int,
  mesh: Mesh | parallel.MeshConfig | None = None,
  optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None,
  max_length: int = 128,
  text_dim: int = 4096,
  ema_decay: float = 0.9999,
  ema_warmup: bool = True,
  num_microbatches: int = 1,
  seed: int = 0,
  data_seed: int | None = None,
  checkpoint_every: int = 5000,
  keep_checkpoints: int = 3,
  async_checkpointing: bool = True,
  log_every: int = 100,
  sample_every: int = 0,
  num_sample_images: int = 8,
  sample_steps: int = 64,
  sample_guidance_weight: float = 3.0,
  max_consecutive_nonfinite: int = 20,
  text_encoder: Any = None,
  tfds_name: str | None = None,
  expected_encoder: dict | None = None,
  max_steps_this_run: int | None = None,
  eval_every: int = 0,
  eval_batches: int = 4,
  eval_t_grid: tuple[float, ...] = EVAL_T_GRID,
  init_from: str | None = None,
  hooks: Sequence[StepHook] = (),
) -> dict[str, float]:
  """Trains one cascade stage; resumes from MODEL_DIR's latest checkpoint automatically.

  Args:
    model_dir: where checkpoints, TensorBoard events and sample grids go (local or gs://).
    data_dir: precomputed shards (or a TFDS dir with `text_encoder` for on-the-fly text).
    stage: the stage's diffusion recipe (with `init_from='if:PATH'`: default IF's).
    network: the U-Net module (with `init_from='if:PATH'`: default IF's).
    batch_size: global batch size (all processes).
    num_train_steps: total steps of the run (the job stops there; rerunning continues).
    mesh: device mesh or a `parallel.MeshConfig` preset (default: all devices on the data axis).
    optimizer: (transformation, lr schedule) from `optim.make_optimizer`.
    max_length / text_dim: text sequence length and embedding width the data must have.
    ema_decay / ema_warmup: EMA of the params (paper 0.9999).
    num_microbatches: gradient accumulation steps per update.
    seed / data_seed: model RNG seed / shuffling seed (default: seed).
    checkpoint_every / keep_checkpoints / async_checkpointing: checkpoint policy.
    log_every: console + TensorBoard period (steps).
    sample_every: write an EMA sample grid every N steps (0 = never).
    num_sample_images / sample_steps / sample_guidance_weight: the sample grid's settings.
    max_consecutive_nonfinite: stop after this many skipped (non-finite) updates in a row.
    text_encoder: encode captions on the fly instead of reading precomputed embeddings.
    tfds_name: with `text_encoder`, the TFDS dataset name to read from data_dir.
    expected_encoder: text-encoder identity the precomputed embeddings must match (any subset
      of `TextEncoder.identity()`, e.g. {'size': 'xxl', 'max_length': 128}).
    max_steps_this_run: stop after this many steps in this process (for tests/preemptible
      slices); the run continues on the next launch.
    eval_every: every N steps, the EMA params' loss on the validation split at each time of
      `eval_t_grid` with fixed noise, to metrics.jsonl, TensorBoard and eval_loss.png (0 = off;
      data without a validation split logs one line and skips it).
    eval_batches: global batches of batch_size / num_microbatches examples per eval.
    eval_t_grid: the diffusion times evaluated (default: midpoints of 8 equal buckets).
    init_from: a fresh run's weights: 'if:PATH' (a DeepFloyd IF stage dir) or a MODEL_DIR
      (its newest EMA params); ignored once MODEL_DIR holds a checkpoint (the run resumes).
    hooks: `training.hooks.StepHook`s run after every step, e.g.
      `[@hooks.RecordExampleKeys()]` (configs/hooks/example_keys.gin: audits the data order)
      or the fault drill's (configs/hooks/fault_drill.gin).

  Returns:
    The last logged metrics.
  """
  return job_lib.run(
    job_lib.TrainJob(
      run=RunConfig(model_dir, num_train_steps, seed, max_steps_this_run, init_from),
      data=DataConfig(
        data_dir,
        seed if data_seed is None else data_seed,
        text_encoder,
        tfds_name,
        expected_encoder,
      ),
      step=step_settings(batch_size, max_length, text_dim, ema_decay, ema_warmup, num_microbatches),
      stage=stage,
      network=network,
      mesh=mesh,
      optimizer=optimizer,
      checkpoint=CheckpointConfig(checkpoint_every, keep_checkpoints, async_checkpointing),
      monitor=MonitorConfig(
        log_every,
        max_consecutive_nonfinite,
        sample_every,
        num_sample_images,
        sample_steps,
        sample_guidance_weight,
      ),
      eval=EvalConfig(eval_every, eval_batches, eval_t_grid),
      hooks=tuple(hooks),
    )
  )


@functools.cache
def configurable_train() -> Callable[..., dict]:
  """`train` as gin sees it (bindings under `train.train.*`)."""
  import gin

  return gin.get_configurable(train)

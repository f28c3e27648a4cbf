"""The training job for one cascade stage: gin-configured, mesh-sharded, resumable.

`imagen-jax train --gin_file=configs/stages/base64.gin --gin_file=configs/runs/pretrain.gin
  --gin.MODEL_DIR="'/tmp/base64'" --gin.DATA="'/data/precomputed'"` calls `train(...)` with
everything bound by gin. The job:
  1. validates the config (batch vs mesh, model dir, data) before compiling anything;
  2. builds the mesh and initialises params, optimizer state and EMA straight into their
     shardings (never materialised on one device);
  3. compiles one train step ahead of time (FLOPs and memory known before step 1);
  4. restores the newest loadable checkpoint and the data iterator's position;
  5. trains, logging to the console and TensorBoard, writing sample grids, saving
     asynchronously; on SIGTERM/preemption it saves and exits cleanly.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import linen as nn
from jax.sharding import Mesh

from imagen_jax import checkpoints, errors, parallel, perf
from imagen_jax.stage import Stage, StageConfig, stage_spec
from imagen_jax.training import evaluation
from imagen_jax.training import init_from as init_from_lib
from imagen_jax.training import loop as run_loop
from imagen_jax.training import metrics as run_metrics
from imagen_jax.training import program as train_program
from imagen_jax.utils import interrupts

log = logging.getLogger(__name__)

EVAL_T_GRID = evaluation.EVAL_T_GRID  # the gin default of train.train.eval_t_grid
EVAL_PLOT = evaluation.EVAL_PLOT
TrainingError = run_loop.TrainingError  # what `imagen-jax train` reports as one line


# ================================================================================================
# Setup: validation, mesh, sharded init, AOT compile
# ================================================================================================


def validate_config(
  model_dir: str, data_dir: str, batch_size: int, num_microbatches: int, mesh: Mesh
) -> None:
  """Cheap checks that must fail before anything is compiled, with the fix in the message."""
  if not model_dir:
    raise ValueError("MODEL_DIR is empty: pass --gin.MODEL_DIR=\"'/path/or/gs://bucket/run'\"")
  if not data_dir:
    raise ValueError("DATA is empty: pass --gin.DATA=\"'/path/to/precomputed'\"")
  train_program.check_batch_layout(
    batch_size, num_microbatches, dict(mesh.shape), jax.process_count()
  )
  # Last: the checks above must not leave an empty MODEL_DIR behind.
  errors.check_writable_dir(model_dir, "MODEL_DIR")


def _check_batch_shapes(shapes: dict, max_length: int, text_dim: int, network: Any) -> None:
  """The data's text length and width must be the ones the network is built for."""
  emb_shape = shapes["text_emb"][0]
  length, width = int(emb_shape[-2]), int(emb_shape[-1])
  if (length, width) == (max_length, text_dim):
    return
  # The paper stage configs bind these through MAX_LENGTH / TEXT_DIM, the tiny and demo ones
  # directly: a binding of train.train.* on the command line overrides both kinds.
  fixes = []
  if length != max_length:
    fixes.append(f"--gin.train.train.max_length={length}")
  if width != text_dim:
    fixes.append(f"--gin.train.train.text_dim={width}")
    if hasattr(network, "text_dim"):
      module = type(network).__module__.rsplit(".", 1)[-1]
      fixes.append(f"--gin.{module}.{type(network).__name__}.text_dim={width}")
  raise errors.UserError(
    f"the data's text embeddings are [{length}, {width}] per example (DATA/manifest.json: "
    f"max_length, embedding_width) but the config expects max_length={max_length}, "
    f"text_dim={text_dim}; pass {' '.join(fixes)}, or precompute the data again to match"
  )


# ================================================================================================
# The job
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
  record_example_keys: bool = False,
  debug_step_delay_s: float = 0.0,
  eval_every: int = 0,
  eval_batches: int = 4,
  eval_t_grid: tuple[float, ...] = EVAL_T_GRID,
  init_from: str | None = None,
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

  Returns:
    The last logged metrics.
  """
  from imagen_jax.data import input_pipeline  # TF-heavy: import when the job runs

  t_start = time.time()
  init_from_lib.check_init_from(init_from)
  network, stage = init_from_lib.network_and_stage(init_from, network, stage)
  mesh = parallel.resolve_mesh(mesh)
  validate_config(model_dir, data_dir, batch_size, num_microbatches, mesh)
  if optimizer is None:
    from imagen_jax import optim

    optimizer = optim.make_optimizer()
  stage_obj = Stage(network, stage)
  is_main = jax.process_index() == 0
  t_grid = evaluation.check_eval_settings(eval_every, eval_batches, eval_t_grid)

  # --- data (validated before any compilation) ---------------------------------------------
  per_process_batch = batch_size // jax.process_count()
  open_split = functools.partial(
    input_pipeline.make_train_iterator,
    data_dir,
    resolution=stage.resolution,
    lowres_resolution=stage.lowres_resolution,
    crop_size=stage.train_crop,
    max_length=max_length,
    seed=seed if data_seed is None else data_seed,
    text_encoder=text_encoder,
    tfds_name=tfds_name,
    expected_encoder=expected_encoder,
  )
  data_iter = open_split(batch_size=per_process_batch)
  _check_batch_shapes(data_iter.batch_shapes(), max_length, text_dim, network)
  validation = None
  if eval_every:
    # One microbatch per eval batch: a forward pass of it fits wherever its training step does.
    validation = evaluation.open_validation(
      data_dir,
      evaluation.has_validation_split(data_dir, tfds_name),
      open_split,
      per_process_batch // num_microbatches,
    )
  if is_main:
    log.info("data ready (%d examples) after %.1fs", data_iter.num_examples, time.time() - t_start)

  # --- AOT compile + sharded init ----------------------------------------------------------
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  settings = step_settings(
    batch_size, max_length, text_dim, ema_decay, ema_warmup, num_microbatches
  )
  program = train_program.build_train_program(stage_obj, optimizer, mesh, settings)
  compiled = program.compile()
  interrupts.check()  # a Ctrl-C during the compile may have been swallowed inside JAX
  flops_per_step = perf.compiled_flops(compiled)
  if is_main:
    log.info(
      "stage %s: %s params, %s FLOPs/step, step compiled after %.1fs (program sha256 %s)",
      stage.name,
      f"{program.num_params():,}",
      f"{flops_per_step:.3e}" if flops_per_step else "n/a",
      time.time() - t_start,
      program.fingerprint(),
    )
  evaluator = None
  if validation is not None:
    evaluator = evaluation.ValidationLoss(
      stage_obj, mesh, program.abstract_state.ema_params, validation, t_grid, eval_batches, seed
    )
    if is_main:
      evaluation.log_eval_compiled(evaluator, validation, eval_every, time.time() - t_start)
  # Hosts reach this point after different compile and data-loading times; the init program,
  # the restore and the first step all run collectives, so meet first.
  parallel.wait_for_all_processes("compiled")

  # --- restore, else a fresh state ---------------------------------------------------------
  ckpt = checkpoints.Checkpointer(
    os.path.join(model_dir, "checkpoints"),
    max_to_keep=keep_checkpoints,
    save_interval_steps=checkpoint_every,
    async_save=async_checkpointing,
  )
  state = run_loop.restore_latest(ckpt, program.abstract_state, data_iter, t_start, is_main)
  if state is None and init_from:
    params = init_from_lib.initial_params(init_from, network, program.abstract_state.params)
    state = program.state_from_params(params)
    if is_main:
      log.info("initialised from %s after %.1fs", init_from, time.time() - t_start)
  elif state is None:
    state = program.init_state(init_rng)
    if is_main:
      log.info("sharded init done after %.1fs", time.time() - t_start)

  # --- loop --------------------------------------------------------------------------------
  loop = run_loop.TrainLoop(
    stage=stage_obj,
    compiled=compiled,
    mesh=mesh,
    batch_keys=tuple(program.batch_shapes),
    data_iter=data_iter,
    ckpt=ckpt,
    model_dir=model_dir,
    config_text=run_metrics.operative_config(),
    # Saved with every checkpoint: readers rebuild the stage from it, not from this
    # function's gin selectors.
    spec=stage_spec(network, stage, max_length, text_dim, data_dir=data_dir),
    batch_size=batch_size,
    flops_per_step=flops_per_step,
    log_every=log_every,
    max_consecutive_nonfinite=max_consecutive_nonfinite,
    sample_every=sample_every,
    num_sample_images=num_sample_images,
    sample_steps=sample_steps,
    sample_guidance_weight=sample_guidance_weight,
    evaluator=evaluator,
    eval_every=eval_every,
    record_example_keys=record_example_keys,
    debug_step_delay_s=debug_step_delay_s,
  )
  return loop.run(state, train_rng, num_train_steps, max_steps_this_run)


@functools.cache
def configurable_train() -> Callable[..., dict]:
  """`train` as gin sees it (bindings under `train.train.*`)."""
  import gin

  return gin.get_configurable(train)

"""The training job for one cascade stage, in the order it runs: validate, data, compile, restore
or init, loop. `train.train` (the gin face) builds a `TrainJob` from its flat bindings."""

from __future__ import annotations

import dataclasses
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

from imagen_jax import checkpoints, errors, parallel
from imagen_jax.stage import Stage, StageConfig, stage_spec
from imagen_jax.training import evaluation
from imagen_jax.training import init_from as init_from_lib
from imagen_jax.training import loop as run_loop
from imagen_jax.training import metrics as run_metrics
from imagen_jax.training import program as train_program
from imagen_jax.training.config import (
  CheckpointConfig,
  DataConfig,
  EvalConfig,
  MonitorConfig,
  RunConfig,
)
from imagen_jax.training.hooks import StepHook
from imagen_jax.utils import interrupts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainJob:
  """Everything one run needs; `network`/`stage` may be None with `run.init_from='if:PATH'`."""

  run: RunConfig
  data: DataConfig
  step: train_program.StepSettings
  stage: StageConfig | None
  network: nn.Module | None
  mesh: Mesh | parallel.MeshConfig | None = None
  optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None
  checkpoint: CheckpointConfig = CheckpointConfig()
  monitor: MonitorConfig = MonitorConfig()
  eval: EvalConfig = EvalConfig()
  hooks: tuple[StepHook, ...] = ()


def run(job: TrainJob) -> dict[str, float]:
  """Trains one stage; resumes from MODEL_DIR's latest checkpoint. Returns the last metrics."""
  from imagen_jax.data import input_pipeline  # TF-heavy: import when the job runs

  t_start = time.time()
  is_main = jax.process_index() == 0
  settings = job.step

  # ================================ 1. validate (cheap, before anything is built) ============
  init_from_lib.check_init_from(job.run.init_from)
  network, stage = init_from_lib.network_and_stage(job.run.init_from, job.network, job.stage)
  mesh = parallel.resolve_mesh(job.mesh)
  validate_config(
    job.run.model_dir, job.data.data_dir, settings.batch_size, settings.num_microbatches, mesh
  )
  optimizer = job.optimizer
  if optimizer is None:
    from imagen_jax import optim

    optimizer = optim.make_optimizer()
  stage_obj = Stage(network, stage)
  t_grid = job.eval.checked_t_grid()

  # ================================ 2. data (validated before any compilation) ===============
  open_split = functools.partial(
    input_pipeline.make_train_iterator,
    job.data.data_dir,
    resolution=stage.resolution,
    lowres_resolution=stage.lowres_resolution,
    crop_size=stage.train_crop,
    max_length=settings.max_length,
    seed=job.data.seed,
    text_encoder=job.data.text_encoder,
    tfds_name=job.data.tfds_name,
    expected_encoder=job.data.expected_encoder,
  )
  data_iter, validation = _open_data(open_split, settings, job.eval, job.data)
  check_batch_shapes(data_iter.batch_shapes(), settings.max_length, settings.text_dim, network)
  if is_main:
    log.info("data ready (%d examples) after %.1fs", data_iter.num_examples, time.time() - t_start)

  # ================================ 3. compile the step (and the eval step) ==================
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(job.run.seed))
  program = train_program.build_train_program(stage_obj, optimizer, mesh, settings)
  compiled, flops_per_step = _compile_step(program, stage.name, t_start, is_main)
  evaluator = None
  if validation is not None:
    evaluator = evaluation.ValidationLoss(
      stage_obj,
      mesh,
      program.abstract_state.ema_params,
      validation,
      t_grid,
      job.eval.batches,
      job.run.seed,
    )
    if is_main:
      evaluation.log_eval_compiled(evaluator, validation, job.eval.every, time.time() - t_start)
  # Hosts reach this point after different compile and data-loading times; the init program,
  # the restore and the first step all run collectives, so meet first.
  parallel.wait_for_all_processes("compiled")

  # ================================ 4. restore, else a fresh state ===========================
  ckpt = checkpoints.Checkpointer(
    os.path.join(job.run.model_dir, "checkpoints"),
    max_to_keep=job.checkpoint.keep,
    save_interval_steps=job.checkpoint.every,
    async_save=job.checkpoint.async_save,
  )
  state = run_loop.restore_latest(ckpt, program.abstract_state, data_iter, t_start, is_main)
  if state is None:
    state = _fresh_state(program, job.run.init_from, network, init_rng, t_start, is_main)

  # ================================ 5. the loop ==============================================
  loop = run_loop.TrainLoop(
    stage=stage_obj,
    compiled=compiled,
    mesh=mesh,
    batch_keys=tuple(program.batch_shapes),
    data_iter=data_iter,
    ckpt=ckpt,
    model_dir=job.run.model_dir,
    config_text=run_metrics.operative_config(),
    # Saved with every checkpoint: readers rebuild the stage from it, not from gin selectors.
    spec=stage_spec(
      network, stage, settings.max_length, settings.text_dim, data_dir=job.data.data_dir
    ),
    batch_size=settings.batch_size,
    flops_per_step=flops_per_step,
    monitor=job.monitor,
    evaluator=evaluator,
    eval_every=job.eval.every,
    hooks=job.hooks,
  )
  return loop.run(state, train_rng, job.run.num_train_steps, job.run.max_steps_this_run)


# ================================================================================================
# The steps' parts
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


def check_batch_shapes(shapes: dict, max_length: int, text_dim: int, network: Any) -> None:
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


def _open_data(
  open_split: Callable[..., Any],
  settings: train_program.StepSettings,
  eval_cfg: EvalConfig,
  data: DataConfig,
) -> tuple[Any, Any]:
  """This process's training iterator, and its validation iterator (None without eval)."""
  per_process_batch = settings.batch_size // jax.process_count()
  data_iter = open_split(batch_size=per_process_batch)
  validation = None
  if eval_cfg.every:
    # One microbatch per eval batch: a forward pass of it fits wherever its training step does.
    validation = evaluation.open_validation(
      data.data_dir,
      evaluation.has_validation_split(data.data_dir, data.tfds_name),
      open_split,
      per_process_batch // settings.num_microbatches,
    )
  return data_iter, validation


def _compile_step(
  program: train_program.TrainProgram, stage_name: str, t_start: float, is_main: bool
) -> tuple[Any, float]:
  """The compiled train step and its model FLOPs per step (logged with the fingerprint)."""
  compiled = program.compile()
  interrupts.check()  # a Ctrl-C during the compile may have been swallowed inside JAX
  # MFU counts the model's FLOPs (from the jaxpr): XLA's count of a microbatch loop is not
  # reliably every iteration's.
  flops_per_step = program.model_flops
  if is_main:
    log.info(
      "stage %s: %s params, %s model FLOPs/step, step compiled after %.1fs (program sha256 %s)",
      stage_name,
      f"{program.num_params():,}",
      f"{flops_per_step:.3e}",
      time.time() - t_start,
      program.fingerprint(),
    )
  return compiled, flops_per_step


def _fresh_state(
  program: train_program.TrainProgram,
  init_from: str | None,
  network: nn.Module,
  init_rng: jax.Array,
  t_start: float,
  is_main: bool,
) -> Any:
  """A new run's state: `init_from`'s weights with a fresh optimizer, else a sharded init."""
  if init_from:
    params = init_from_lib.initial_params(init_from, network, program.abstract_state.params)
    state = program.state_from_params(params)
    what = f"initialised from {init_from}"
  else:
    state = program.init_state(init_rng)
    what = "sharded init done"
  if is_main:
    log.info("%s after %.1fs", what, time.time() - t_start)
  return state

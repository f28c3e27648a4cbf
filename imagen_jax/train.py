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

import dataclasses
import functools
import logging
import os
import signal
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
from imagen_jax.training import metrics as run_metrics
from imagen_jax.training import program as train_program
from imagen_jax.utils import interrupts

log = logging.getLogger(__name__)

EVAL_T_GRID = evaluation.EVAL_T_GRID  # the gin default of train.train.eval_t_grid
EVAL_PLOT = evaluation.EVAL_PLOT


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. persistently non-finite losses)."""


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


@dataclasses.dataclass
class _Preemption:
  """SIGTERM → finish the current step, save, exit 0."""

  requested: bool = False

  def install(self) -> None:
    if jax.process_count() == 1:  # multi-host runs use orbax's synchronised notice
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self.requested = True


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
  state = _restore(ckpt, program.abstract_state, data_iter, t_start, is_main)
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
  loop = _TrainLoop(
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


def _restore(
  ckpt: checkpoints.Checkpointer,
  abstract_state: Any,
  data_iter: Any,
  t_start: float,
  is_main: bool,
) -> Any:
  """The newest loadable checkpoint's state (and data position), or None if none.

  Args:
    abstract_state: the TrainState as ShapeDtypeStructs carrying their shardings.
  """
  # The job owns MODEL_DIR: unloadable steps are moved aside, so keep-last-K stops counting them.
  restored = ckpt.restore_latest(
    abstract_state.replace(ema_params=None), abstract_state.ema_params, move_aside=True
  )
  if restored is None:
    return None
  step0, (saved_state, saved_ema, iter_state, _) = restored
  data_iter.set_state(iter_state)
  if is_main:
    log.info("resumed from %s at step %d (%.1fs)", ckpt.directory, step0, time.time() - t_start)
  return saved_state.replace(ema_params=saved_ema)


@dataclasses.dataclass
class _TrainLoop:
  """The steps of one run: train, log, sample, evaluate, checkpoint, stop on preemption."""

  stage: Stage
  compiled: Any
  mesh: Mesh
  batch_keys: tuple[str, ...]
  data_iter: Any
  ckpt: checkpoints.Checkpointer
  model_dir: str
  config_text: str
  spec: dict[str, Any]
  batch_size: int
  flops_per_step: float | None
  log_every: int
  max_consecutive_nonfinite: int
  sample_every: int
  num_sample_images: int
  sample_steps: int
  sample_guidance_weight: float
  evaluator: Any
  eval_every: int
  record_example_keys: bool
  debug_step_delay_s: float

  def run(
    self, state: Any, train_rng: jax.Array, num_train_steps: int, max_steps_this_run: int | None
  ) -> dict[str, float]:
    """Trains from `state.step` to the end step; returns the last logged metrics."""
    from imagen_jax.data import global_batch

    self.is_main = jax.process_index() == 0
    start_step = int(state.step)
    self._open_logs(start_step)
    preemption = _Preemption()
    preemption.install()
    self.sample_cond = None
    self.last_metrics: dict[str, float] = {}
    self.device_peak = perf.peak_flops_per_device(jax.devices()[0])
    end_step = num_train_steps
    if max_steps_this_run is not None:
      end_step = min(num_train_steps, start_step + max_steps_this_run)
    self.progress = perf.Progress(start_step, num_train_steps, enabled=self.is_main)
    self.window_start, self.window_steps = time.time(), 0
    step = start_step
    try:
      while step < end_step:
        interrupts.check()
        host_batch = next(self.data_iter)
        if self.sample_every and self.sample_cond is None:
          self.sample_cond = run_metrics.fixed_sample_condition(host_batch, self.num_sample_images)
        batch = global_batch.to_global_batch({k: host_batch[k] for k in self.batch_keys}, self.mesh)
        state, metrics = self.compiled(state, batch, train_rng)
        step += 1
        self.window_steps += 1
        if self.record_example_keys:
          self.keys_log.write(step, host_batch.get("key"))
        if self.debug_step_delay_s:
          time.sleep(self.debug_step_delay_s)
        ckpt_due = self.ckpt.should_save(step)
        if step % self.log_every == 0 or step == end_step or ckpt_due:
          self._log(step, state, metrics)
        self._sample_and_evaluate(step, state)
        if preemption.requested or self.ckpt.reached_preemption(step):
          self._save(step, state, force=True)
          self.ckpt.wait_until_finished()
          log.warning("preempted: checkpoint at step %d written; exiting", step)
          return self.last_metrics
        if ckpt_due:
          self._save(step, state, force=False)
      if self.ckpt.latest_step() != step:
        self._save(step, state, force=True)
    finally:
      self.ckpt.close()
      self.progress.close()
      if self.writer:
        self.writer.close()
    return self.last_metrics

  def _open_logs(self, start_step: int) -> None:
    self.writer = (
      run_metrics.SummaryWriter(os.path.join(self.model_dir, "tensorboard"))
      if self.is_main
      else None
    )
    self.metrics_log = run_metrics.JsonLines(os.path.join(self.model_dir, "metrics.jsonl"))
    self.keys_log = run_metrics.JsonLines(
      os.path.join(self.model_dir, "example_keys", f"process_{jax.process_index()}.jsonl")
    )
    # Steps after the restored one were logged by a run that died before checkpointing them;
    # they are about to be redone, so drop them: the files stay one clean history.
    if self.is_main:
      self.metrics_log.drop_after(start_step)
    self.keys_log.drop_after(start_step)

  def _log(self, step: int, state: Any, metrics: Any) -> None:
    """Console, TensorBoard and metrics.jsonl; stops a run stuck on non-finite updates."""
    metrics = jax.device_get(metrics)
    elapsed = time.time() - self.window_start
    scalars = perf.throughput_scalars(
      metrics,
      self.window_steps,
      elapsed,
      self.batch_size,
      jax.device_count(),
      self.flops_per_step,
      self.device_peak,
    )
    self.last_metrics = scalars
    self.progress.update(step, scalars)
    if self.writer:
      self.writer.write(step, scalars)
      self.metrics_log.write(step, scalars)
    self.window_start, self.window_steps = time.time(), 0
    bad = int(jax.device_get(state.consecutive_nonfinite))
    if bad >= self.max_consecutive_nonfinite:
      raise TrainingError(
        f"{bad} consecutive non-finite losses/gradients up to step {step}; updates were "
        f"skipped. Last good checkpoint: step {self.ckpt.latest_step()} in "
        f"{self.ckpt.directory}. Lower the learning rate or check the data, then rerun to resume."
      )

  def _sample_and_evaluate(self, step: int, state: Any) -> None:
    if self.sample_every and step % self.sample_every == 0:
      # Every host runs the sampler (the EMA params are sharded across hosts); host 0 writes.
      run_metrics.write_sample_grid(
        self.stage,
        state.ema_params,
        self.sample_cond,
        step,
        self.model_dir,
        self.mesh,
        self.sample_steps,
        self.sample_guidance_weight,
      )
    if self.evaluator is not None and step % self.eval_every == 0:
      evaluation.evaluate(
        self.evaluator, state.ema_params, step, self.writer, self.metrics_log, self.model_dir
      )

  def _save(self, step: int, state: Any, force: bool) -> None:
    saved = self.ckpt.save(
      step,
      state.replace(ema_params=None),
      state.ema_params,
      self.data_iter.get_state(),
      self.config_text,
      force=force,
      stage_spec=self.spec,
    )
    if saved and self.is_main:
      log.info("checkpoint step %d → %s", step, self.ckpt.directory)


# ================================================================================================
# Eval: the validation split's loss at a fixed grid of t
@functools.cache
def configurable_train() -> Callable[..., dict]:
  """`train` as gin sees it (bindings under `train.train.*`)."""
  import gin

  return gin.get_configurable(train)

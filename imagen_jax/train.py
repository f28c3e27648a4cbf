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
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from imagen_jax import checkpoints, errors, images, parallel, perf
from imagen_jax.diffusion import samplers
from imagen_jax.stage import Stage, StageConfig, stage_spec
from imagen_jax.training import init_from as init_from_lib
from imagen_jax.training import program as train_program
from imagen_jax.utils import interrupts

log = logging.getLogger(__name__)

# Midpoints of 8 equal buckets of [0, 1]: their mean is the midpoint rule for the loss averaged
# over t ~ U(0, 1), the expectation the training loss estimates (without text drop).
EVAL_T_GRID = tuple((k + 0.5) / 8 for k in range(8))
EVAL_PLOT = "eval_loss.png"
_EVAL_NOISE_STREAM = 1  # folded into PRNGKey(seed): a key of its own, not one the step splits


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
  t_grid = _check_eval_settings(eval_every, eval_batches, eval_t_grid)

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
    validation = _open_validation(
      data_dir,
      _has_validation_split(data_dir, tfds_name),
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
    evaluator = ValidationLoss(
      stage_obj, mesh, program.abstract_state.ema_params, validation, t_grid, eval_batches, seed
    )
    if is_main:
      _log_eval_compiled(evaluator, validation, eval_every, time.time() - t_start)
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
    config_text=_operative_config(),
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


def _check_eval_settings(eval_every: int, eval_batches: int, eval_t_grid: Any) -> tuple[float, ...]:
  """The eval knobs, checked before any work; returns the t grid (empty when eval is off)."""
  if eval_every < 0 or eval_batches < 1:
    raise errors.UserError(
      f"eval_every={eval_every} must be >= 0 and eval_batches={eval_batches} >= 1; pass e.g. "
      "--gin.train.train.eval_every=1000 --gin.train.train.eval_batches=4"
    )
  return check_eval_t_grid(eval_t_grid) if eval_every else ()


def _log_eval_compiled(evaluator: Any, validation: Any, eval_every: int, seconds: float) -> None:
  log.info(
    "eval step compiled: %d validation examples x %d t every %d steps (%.1fs)%s",
    evaluator.num_examples,
    len(evaluator.t_grid),
    eval_every,
    seconds,
    f"; the split has {validation.num_examples}, so examples repeat, each with its own noise"
    if evaluator.num_examples > validation.num_examples
    else "",
  )


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
          self.sample_cond = _fixed_sample_condition(host_batch, self.num_sample_images)
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
      _SummaryWriter(os.path.join(self.model_dir, "tensorboard")) if self.is_main else None
    )
    self.metrics_log = _JsonLines(os.path.join(self.model_dir, "metrics.jsonl"))
    self.keys_log = _JsonLines(
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
      _write_sample_grid(
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
      _evaluate(
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
# ================================================================================================


def check_eval_t_grid(t_grid: Any) -> tuple[float, ...]:
  """The grid as floats: distinct times strictly inside (0, 1) (λ(t) is infinite at 0 and 1)."""
  try:
    values = tuple(float(t) for t in t_grid)
  except (TypeError, ValueError):
    values = ()
  if not values or len(set(values)) != len(values) or not all(0 < t < 1 for t in values):
    raise errors.UserError(
      f"eval_t_grid={t_grid!r} must be distinct times in (0, 1); pass e.g. "
      "--gin.train.train.eval_t_grid=(0.25,0.5,0.75)"
    )
  return values


def eval_metric_names(t_grid: tuple[float, ...]) -> list[str]:
  """metrics.jsonl / TensorBoard names: `eval/loss` (the mean) then one per t."""
  return ["eval/loss"] + [f"eval/loss_t{t:g}" for t in t_grid]


def make_eval_step(
  stage: Stage, t_grid: tuple[float, ...], key: jax.Array
) -> Callable[[Any, dict], jax.Array]:
  """(params, batch with an int 'index' per row) -> [T, B] per-example losses, one row per t.

  Example i's noise is drawn from fold_in(key, i), so it depends on neither the batch layout
  nor the devices; one ε per example serves every t, so buckets differ by t, not by noise.
  """
  ts = jnp.asarray(t_grid, jnp.float32)

  def eval_step(params: Any, batch: dict) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
    draw = lambda name, stream: jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, stream), batch[name].shape[1:])
    )(keys)
    noise = draw("image", 0)
    aug_noise = draw("lowres", 1) if "lowres" in batch else None
    inputs = {k: v for k, v in batch.items() if k != "index"}
    b = batch["image"].shape[0]
    at = lambda t: stage.loss_at(params, inputs, jnp.full((b,), t), noise, aug_noise)
    return jax.lax.map(at, ts)  # one t at a time: the activations of one forward pass

  return eval_step


class ValidationLoss:
  """The validation split's loss at a fixed t grid: the same examples, t and noise each call.

  Args:
    stage: the stage (owns the objective: `Stage.loss_at`).
    mesh: the training mesh; the eval batch is split over ('data', 'fsdp') like training's.
    params_like: arrays or ShapeDtypeStructs with the params' shapes and shardings.
    examples: this process's validation iterator; rewound to its start on every call.
    t_grid: diffusion times (`check_eval_t_grid`).
    num_batches: global batches per call (the eval set: the iterator's first ones).
    seed: the run seed the noise key derives from.
  """

  def __init__(
    self,
    stage: Stage,
    mesh: Mesh,
    params_like: Any,
    examples: Any,
    t_grid: tuple[float, ...],
    num_batches: int,
    seed: int,
  ):
    self.examples, self.t_grid, self.num_batches, self.mesh = examples, t_grid, num_batches, mesh
    self._start = examples.get_state()
    self.local_batch = examples.batch_size
    self.global_batch = examples.batch_size * jax.process_count()
    shapes = {
      k: jax.ShapeDtypeStruct(
        (self.global_batch, *s[1:]), d, sharding=parallel.batch_sharding(mesh, len(s))
      )
      for k, (s, d) in examples.batch_shapes().items()
    }
    shapes["index"] = jax.ShapeDtypeStruct(
      (self.global_batch,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1)
    )
    self._fields = tuple(shapes)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_NOISE_STREAM)
    param_shardings = jax.tree.map(lambda x: x.sharding, params_like)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
      self._step = (
        jax.jit(
          make_eval_step(stage, t_grid, key),
          in_shardings=(param_shardings, {k: v.sharding for k, v in shapes.items()}),
          out_shardings=parallel.replicated(mesh),
        )
        .lower(params_like, shapes)
        .compile()
      )

  @property
  def num_examples(self) -> int:
    return self.num_batches * self.global_batch

  def __call__(self, params: Any) -> dict[str, float]:
    """{'eval/loss': mean, 'eval/loss_t<t>': per-t means}, summed on the host in float64."""
    from imagen_jax.data import global_batch

    self.examples.set_state(self._start)
    sums = np.zeros(len(self.t_grid), np.float64)
    for b in range(self.num_batches):
      host = next(self.examples)
      first = b * self.global_batch + jax.process_index() * self.local_batch
      host["index"] = np.arange(first, first + self.local_batch, dtype=np.int32)
      batch = global_batch.to_global_batch({k: host[k] for k in self._fields}, self.mesh)
      sums += np.asarray(jax.device_get(self._step(params, batch)), np.float64).sum(axis=1)
    means = sums / self.num_examples
    return dict(zip(eval_metric_names(self.t_grid), [float(means.mean()), *map(float, means)]))


def _open_validation(
  data_dir: str, split_exists: bool, make_iterator: Callable[..., Any], batch_size: int
) -> Any:
  """This process's validation iterator, or None (logged once) when the data has no split."""
  if not split_exists:
    log.info(
      "eval_every is set but %s has no validation split (precompute writes it with "
      "--split=train --split=validation): no eval loss",
      data_dir,
    )
    return None
  examples = make_iterator(split="validation", batch_size=batch_size, num_threads=2)
  if not examples.num_examples:
    log.info("the validation split of %s is empty: no eval loss", data_dir)
    return None
  return examples


def _evaluate(
  evaluator: ValidationLoss,
  params: Any,
  step: int,
  writer: Any,
  metrics_log: Any,
  model_dir: str,
) -> None:
  """Runs the eval (every host: it is one program); host 0 logs, writes and redraws the plot."""
  t0 = time.time()
  scalars = evaluator(params)
  if writer is None:
    return
  writer.write(step, scalars)
  metrics_log.write(step, scalars)
  _write_eval_plot(metrics_log.path, list(scalars), os.path.join(model_dir, EVAL_PLOT))
  log.info("eval step %d: eval/loss %.5f (%.1fs)", step, scalars["eval/loss"], time.time() - t0)


def _has_validation_split(data_dir: str, tfds_name: str | None) -> bool:
  """Whether the precomputed manifest (or, on-the-fly, the TFDS dataset) has 'validation'."""
  import tensorflow as tf

  from imagen_jax.data import records, shards

  if tf.io.gfile.exists(os.path.join(data_dir, shards.MANIFEST)):
    return "validation" in shards.read_manifest(data_dir)["splits"]
  source = records.TfdsSource(records.find_tfds_dir(data_dir, tfds_name), "train")
  return "validation" in source.available_splits


def _write_eval_plot(metrics_path: str, names: list[str], path: str) -> None:
  """MODEL_DIR/eval_loss.png: every eval record of metrics.jsonl, the mean thick."""
  import json

  import tensorflow as tf

  from imagen_jax.evaluation import curves

  with tf.io.gfile.GFile(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if names[0] in r]
  series = {n: ([r["step"] for r in records], [r.get(n, np.nan) for r in records]) for n in names}
  images.save_png(curves.plot_series(series, "validation loss at fixed t (eval/*)"), path)


# ================================================================================================
# Helpers: config text, summaries, sample grids
# ================================================================================================


def _operative_config() -> str:
  try:
    import gin

    return gin.config_str()
  except Exception:  # gin not configured (direct Python call)
    return ""


class _JsonLines:
  """Appends {'step': N, ...} records to a JSON-lines file (created on first write)."""

  def __init__(self, path: str):
    self.path = path

  def drop_after(self, step: int) -> int:
    """Rewrites the file without records past `step` (and a line torn by a kill), atomically.

    Returns:
      The number of lines dropped.
    """
    import json

    import tensorflow as tf

    from imagen_jax.data import shards  # its temp-then-rename writer serves gs:// too

    if not tf.io.gfile.exists(self.path):
      return 0
    with tf.io.gfile.GFile(self.path) as f:
      lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # half a line: the writer was killed mid-write
      if line.endswith("\n") and record.get("step", 0) <= step:
        kept.append(line)
    if len(kept) == len(lines):
      return 0
    shards.atomic_write_text(self.path, "".join(kept))
    log.info(
      "%s: dropped %d records past step %d (redone now)", self.path, len(lines) - len(kept), step
    )
    return len(lines) - len(kept)

  def write(self, step: int, value: Any) -> None:
    import json

    import tensorflow as tf

    if isinstance(value, dict):
      record = {"step": step, **value}
    else:
      keys = (
        [] if value is None else [k.decode() if isinstance(k, bytes) else str(k) for k in value]
      )
      record = {"step": step, "keys": keys}
    tf.io.gfile.makedirs(os.path.dirname(self.path))
    with tf.io.gfile.GFile(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


class _SummaryWriter:
  """TensorBoard scalars via tf.summary (works for local and gs:// dirs)."""

  def __init__(self, logdir: str):
    import tensorflow as tf

    self._tf = tf
    self._writer = tf.summary.create_file_writer(logdir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with self._writer.as_default(step=step):
      for name, value in scalars.items():
        if value is not None and np.isfinite(value):
          self._tf.summary.scalar(name, value)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _fixed_sample_condition(host_batch: dict, n: int) -> dict:
  """The first n examples of the run's first global batch: fixed prompts for the sample grids.

  Those rows live on host 0; every host gets host 0's copy, since sampling is one program that
  all hosts run on the same inputs.
  """
  keys = ("text_emb", "text_mask", "lowres", "image")
  cond = {k: np.asarray(host_batch[k][:n]) for k in keys if k in host_batch}
  if jax.process_count() > 1:
    cond = jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(cond))
  return cond


def _write_sample_grid(
  stage: Stage,
  ema_params: Any,
  cond: dict,
  step: int,
  model_dir: str,
  mesh: Mesh,
  sample_steps: int,
  guidance_weight: float,
) -> None:
  """Samples the fixed prompts with the EMA params and writes samples/step_N.png.

  Rows: (SR stages) the low-res input, then the sample, then the training image.
  """
  config = samplers.SamplerConfig(
    sampler="ddim", num_steps=sample_steps, guidance_weight=guidance_weight
  )
  with jax.set_mesh(mesh):
    out = stage.sample(
      ema_params,
      jnp.asarray(cond["text_emb"]),
      jnp.asarray(cond["text_mask"]),
      jax.random.PRNGKey(step),
      config,
      lowres=jnp.asarray(cond["lowres"]) if "lowres" in cond else None,
    )
  if jax.process_count() > 1:
    out = multihost_utils.process_allgather(out, tiled=True)
  if jax.process_index() != 0:
    return
  out = images.to_uint8(jax.device_get(out))
  res = out.shape[1]
  rows = []
  if "lowres" in cond:
    rows.append(np.stack([images.resize_nearest(x, res) for x in images.to_uint8(cond["lowres"])]))
  rows.append(out)
  if "image" in cond and cond["image"].shape[1] == res:
    rows.append(images.to_uint8(cond["image"]))
  grid = images.make_grid(np.concatenate(rows), columns=out.shape[0])
  images.save_png(grid, os.path.join(model_dir, "samples", f"step_{step:08d}.png"))


@functools.cache
def configurable_train() -> Callable[..., dict]:
  """`train` as gin sees it (bindings under `train.train.*`)."""
  import gin

  return gin.get_configurable(train)

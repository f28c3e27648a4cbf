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
from imagen_jax.stage import Stage, StageConfig
from imagen_jax.training import program as train_program

log = logging.getLogger(__name__)


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
  stage: StageConfig,
  network: nn.Module,
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
) -> dict[str, float]:
  """Trains one cascade stage; resumes from MODEL_DIR's latest checkpoint automatically.

  Args:
    model_dir: where checkpoints, TensorBoard events and sample grids go (local or gs://).
    data_dir: precomputed shards (or a TFDS dir with `text_encoder` for on-the-fly text).
    stage: the stage's diffusion recipe.
    network: the U-Net module.
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

  Returns:
    The last logged metrics.
  """
  from imagen_jax.data import global_batch, input_pipeline  # TF-heavy: import when the job runs

  t_start = time.time()
  mesh = parallel.resolve_mesh(mesh)
  validate_config(model_dir, data_dir, batch_size, num_microbatches, mesh)
  if optimizer is None:
    from imagen_jax import optim

    optimizer = optim.make_optimizer()
  tx, lr_fn = optimizer
  stage_obj = Stage(network, stage)
  is_main = jax.process_index() == 0

  # --- data (validated before any compilation) ---------------------------------------------
  per_process_batch = batch_size // jax.process_count()
  data_iter = input_pipeline.make_train_iterator(
    data_dir,
    batch_size=per_process_batch,
    resolution=stage.resolution,
    lowres_resolution=stage.lowres_resolution,
    crop_size=stage.train_crop,
    max_length=max_length,
    seed=seed if data_seed is None else data_seed,
    text_encoder=text_encoder,
    tfds_name=tfds_name,
    expected_encoder=expected_encoder,
  )
  _check_batch_shapes(data_iter.batch_shapes(), max_length, text_dim, network)

  if is_main:
    log.info("data ready (%d examples) after %.1fs", data_iter.num_examples, time.time() - t_start)

  # --- AOT compile + sharded init ----------------------------------------------------------
  rng = jax.random.PRNGKey(seed)
  init_rng, train_rng = jax.random.split(rng)
  program = train_program.build_train_program(
    stage_obj,
    (tx, lr_fn),
    mesh,
    step_settings(batch_size, max_length, text_dim, ema_decay, ema_warmup, num_microbatches),
  )
  compiled = program.compile()
  flops_per_step = perf.compiled_flops(compiled)
  batch_shapes = program.batch_shapes
  if is_main:
    log.info(
      "stage %s: %s params, %s FLOPs/step, step compiled after %.1fs (program sha256 %s)",
      stage.name,
      f"{program.num_params():,}",
      f"{flops_per_step:.3e}" if flops_per_step else "n/a",
      time.time() - t_start,
      program.fingerprint(),
    )
  # Hosts reach this point after different compile and data-loading times; the init program,
  # the restore and the first step all run collectives, so meet first.
  parallel.wait_for_all_processes("compiled")
  state = program.init_state(init_rng)
  state_shardings = program.state_shardings
  if is_main:
    log.info("sharded init done after %.1fs", time.time() - t_start)

  # --- restore -----------------------------------------------------------------------------
  ckpt = checkpoints.Checkpointer(
    os.path.join(model_dir, "checkpoints"),
    max_to_keep=keep_checkpoints,
    save_interval_steps=checkpoint_every,
    async_save=async_checkpointing,
  )
  abstract_state = checkpoints.abstract_with_shardings(
    state.replace(ema_params=None), state_shardings.replace(ema_params=None)
  )
  abstract_ema = checkpoints.abstract_with_shardings(state.ema_params, state_shardings.ema_params)
  # The job owns MODEL_DIR: unloadable steps are moved aside, so keep-last-K stops counting them.
  restored = ckpt.restore_latest(abstract_state, abstract_ema, move_aside=True)
  if restored is not None:
    step0, (saved_state, saved_ema, iter_state, _) = restored
    state = saved_state.replace(ema_params=saved_ema)
    data_iter.set_state(iter_state)
    if is_main:
      log.info("resumed from %s at step %d (%.1fs)", ckpt.directory, step0, time.time() - t_start)
  config_text = _operative_config()
  start_step = int(state.step)

  # --- loop --------------------------------------------------------------------------------
  writer = _SummaryWriter(os.path.join(model_dir, "tensorboard")) if is_main else None
  metrics_log = _JsonLines(os.path.join(model_dir, "metrics.jsonl"))
  keys_log = _JsonLines(
    os.path.join(model_dir, "example_keys", f"process_{jax.process_index()}.jsonl")
  )
  # Steps after the restored one were logged by a run that died before checkpointing them;
  # they are about to be redone, so drop them: the files stay one clean history.
  if is_main:
    metrics_log.drop_after(start_step)
  keys_log.drop_after(start_step)
  preemption = _Preemption()
  preemption.install()
  sample_cond = None
  last_metrics: dict[str, float] = {}
  device_peak = perf.peak_flops_per_device(jax.devices()[0])
  num_devices = jax.device_count()
  end_step = num_train_steps
  if max_steps_this_run is not None:
    end_step = min(num_train_steps, start_step + max_steps_this_run)
  progress = perf.Progress(start_step, num_train_steps, enabled=is_main)
  window_start, window_steps = time.time(), 0

  def save(step: int, force: bool) -> None:
    saved = ckpt.save(
      step,
      state.replace(ema_params=None),
      state.ema_params,
      data_iter.get_state(),
      config_text,
      force=force,
    )
    if saved and is_main:
      log.info("checkpoint step %d → %s", step, ckpt.directory)

  step = start_step
  try:
    while step < end_step:
      host_batch = next(data_iter)
      if sample_every and sample_cond is None:
        sample_cond = _fixed_sample_condition(host_batch, num_sample_images)
      batch = global_batch.to_global_batch({k: host_batch[k] for k in batch_shapes}, mesh)
      state, metrics = compiled(state, batch, train_rng)
      step += 1
      window_steps += 1
      if record_example_keys:
        keys_log.write(step, host_batch.get("key"))
      if debug_step_delay_s:
        time.sleep(debug_step_delay_s)
      ckpt_due = ckpt.should_save(step)
      if step % log_every == 0 or step == end_step or ckpt_due:
        metrics = jax.device_get(metrics)
        elapsed = time.time() - window_start
        scalars = perf.throughput_scalars(
          metrics, window_steps, elapsed, batch_size, num_devices, flops_per_step, device_peak
        )
        last_metrics = scalars
        progress.update(step, scalars)
        if writer:
          writer.write(step, scalars)
          metrics_log.write(step, scalars)
        window_start, window_steps = time.time(), 0
        bad = int(jax.device_get(state.consecutive_nonfinite))
        if bad >= max_consecutive_nonfinite:
          raise TrainingError(
            f"{bad} consecutive non-finite losses/gradients up to step {step}; updates were "
            f"skipped. Last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}. "
            "Lower the learning rate or check the data, then rerun to resume."
          )
      if sample_every and step % sample_every == 0:
        # Every host runs the sampler (the EMA params are sharded across hosts); host 0 writes.
        _write_sample_grid(
          stage_obj,
          state.ema_params,
          sample_cond,
          step,
          model_dir,
          mesh,
          sample_steps,
          sample_guidance_weight,
        )
      if preemption.requested or ckpt.reached_preemption(step):
        save(step, force=True)
        ckpt.wait_until_finished()
        log.warning("preempted: checkpoint at step %d written; exiting", step)
        return last_metrics
      if ckpt_due:
        save(step, force=False)
    if ckpt.latest_step() != step:
      save(step, force=True)
  finally:
    ckpt.close()
    progress.close()
    if writer:
      writer.close()
  return last_metrics


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

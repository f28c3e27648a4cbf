"""The steps of one training run: train, log, sample, evaluate, checkpoint, stop on preemption."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Any

import jax
from jax.sharding import Mesh

from imagen_jax import checkpoints, perf
from imagen_jax.stage import Stage
from imagen_jax.training import evaluation
from imagen_jax.training import metrics as run_metrics
from imagen_jax.training.config import MonitorConfig
from imagen_jax.training.hooks import StepHook
from imagen_jax.utils import interrupts

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """A run that cannot continue (e.g. persistently non-finite losses)."""


@dataclasses.dataclass
class Preemption:
  """SIGTERM → finish the current step, save, exit 0."""

  requested: bool = False

  def install(self) -> None:
    if jax.process_count() == 1:  # multi-host runs use orbax's synchronised notice
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
    self.requested = True


def restore_latest(
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
class TrainLoop:
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
  monitor: MonitorConfig
  evaluator: Any
  eval_every: int
  hooks: tuple[StepHook, ...] = ()

  def run(
    self, state: Any, train_rng: jax.Array, num_train_steps: int, max_steps_this_run: int | None
  ) -> dict[str, float]:
    """Trains from `state.step` to the end step; returns the last logged metrics."""
    from imagen_jax.data import global_batch

    self.is_main = jax.process_index() == 0
    start_step = int(state.step)
    self._open_logs(start_step)
    preemption = Preemption()
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
        if self.monitor.sample_every and self.sample_cond is None:
          self.sample_cond = run_metrics.fixed_sample_condition(
            host_batch, self.monitor.num_sample_images
          )
        batch = global_batch.to_global_batch({k: host_batch[k] for k in self.batch_keys}, self.mesh)
        state, metrics = self.compiled(state, batch, train_rng)
        step += 1
        self.window_steps += 1
        for hook in self.hooks:
          hook.after_step(step, host_batch)
        ckpt_due = self.ckpt.should_save(step)
        if step % self.monitor.log_every == 0 or step == end_step or ckpt_due:
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
      for hook in self.hooks:
        hook.close()
      if self.writer:
        self.writer.close()
    return self.last_metrics

  def _open_logs(self, start_step: int) -> None:
    self.writer = (
      run_metrics.SummaryWriter(os.path.join(self.model_dir, "tensorboard"))
      if self.is_main
      else None
    )
    self.metrics_log = run_metrics.JsonLines(os.path.join(self.model_dir, run_metrics.METRICS_FILE))
    # Steps after the restored one were logged by a run that died before checkpointing them;
    # they are about to be redone, so drop them: the files stay one clean history.
    if self.is_main:
      self.metrics_log.drop_after(start_step)
    for hook in self.hooks:
      hook.start(self.model_dir, start_step)

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
    if bad >= self.monitor.max_consecutive_nonfinite:
      raise TrainingError(
        f"{bad} consecutive non-finite losses/gradients up to step {step}; updates were "
        f"skipped. Last good checkpoint: step {self.ckpt.latest_step()} in "
        f"{self.ckpt.directory}. Lower the learning rate or check the data, then rerun to resume."
      )

  def _sample_and_evaluate(self, step: int, state: Any) -> None:
    if self.monitor.sample_every and step % self.monitor.sample_every == 0:
      # Every host runs the sampler (the EMA params are sharded across hosts); host 0 writes.
      run_metrics.write_sample_grid(
        self.stage,
        state.ema_params,
        self.sample_cond,
        step,
        self.model_dir,
        self.mesh,
        self.monitor.sample_steps,
        self.monitor.sample_guidance_weight,
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

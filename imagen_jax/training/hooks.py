"""Step hooks: what a run does after each step besides training, logging and checkpointing.

A hook sees the step number and the host batch it trained on. The loop calls `start` once
(with the step the run resumes from), `after_step` after every step and `close` at the end.
`train.train.hooks` lists them: configs/hooks/example_keys.gin installs `RecordExampleKeys`,
configs/hooks/fault_drill.gin adds `StepDelay`. A new hook is a `StepHook` subclass named in
that list (gin imports its module).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from imagen_jax.training import metrics as run_metrics


class StepHook:
  """The interface; each method does nothing unless a hook overrides it."""

  def start(self, model_dir: str, start_step: int) -> None:
    del model_dir, start_step

  def after_step(self, step: int, host_batch: dict[str, Any]) -> None:
    del step, host_batch

  def close(self) -> None:
    pass


@dataclasses.dataclass
class RecordExampleKeys(StepHook):
  """Audits the data order: each step's example keys, per process, in
  MODEL_DIR/example_keys/process_N.jsonl (a resumed run drops the steps it redoes, so the file
  is the history of what each step actually trained on)."""

  log: run_metrics.JsonLines | None = None

  def start(self, model_dir: str, start_step: int) -> None:
    path = os.path.join(model_dir, "example_keys", f"process_{jax.process_index()}.jsonl")
    self.log = run_metrics.JsonLines(path)
    self.log.drop_after(start_step)

  def after_step(self, step: int, host_batch: dict[str, Any]) -> None:
    self.log.write(step, host_batch.get("key"))


@dataclasses.dataclass
class StepDelay(StepHook):
  """Sleeps after every step: slows a tiny run down enough to preempt or kill it mid-run
  (fault drills)."""

  seconds: float

  def after_step(self, step: int, host_batch: dict[str, Any]) -> None:
    del step, host_batch
    time.sleep(self.seconds)

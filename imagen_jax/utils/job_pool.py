"""Runs named commands as subprocesses, at most N at a time, each writing its own log file.

Used by `imagen-jax demo` to train independent cascade stages side by side: on a small CPU
machine one XLA:CPU training process keeps its cores ~80% busy (compiles are single-threaded,
the input pipeline and dispatch run between steps), so two processes sharing the cores finish
sooner than the same two one after the other.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

from imagen_jax import errors


@dataclasses.dataclass(frozen=True)
class Job:
  """One command: `argv` runs with stdout and stderr appended to `log_path`, in `env` (None:
  this process's environment)."""

  name: str
  argv: Sequence[str]
  log_path: str
  env: Mapping[str, str] | None = None


class JobFailed(errors.UserError):
  """A job exited nonzero; the message quotes the last line of its log."""


def last_line(path: str) -> str:
  """The last non-empty line of a text file ('' if none); tqdm's carriage returns split lines."""
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - 8192))
      tail = f.read().decode("utf-8", "replace")
  except OSError:
    return ""
  lines = [x.strip() for x in tail.replace("\r", "\n").split("\n") if x.strip()]
  return lines[-1] if lines else ""


def run_jobs(
  jobs: Sequence[Job],
  max_concurrent: int,
  on_tick: Callable[[dict[str, str]], None] | None = None,
  interval_s: float = 1.0,
) -> dict[str, float]:
  """Starts `jobs` in order, keeping at most `max_concurrent` running; waits for all.

  Args:
    on_tick: called every `interval_s` with each job's state: 'pending', 'running', 'done'.

  Returns:
    Wall seconds of each job, by name.

  Raises:
    JobFailed: a job exited nonzero. The jobs still running are stopped first; what the
      others already wrote (checkpoints) is left as it is, so a rerun continues.
  """
  if max_concurrent < 1:
    raise ValueError(f"max_concurrent={max_concurrent}; must be >= 1")
  pending = list(jobs)
  state = {job.name: "pending" for job in jobs}
  running: dict[str, tuple[Job, subprocess.Popen, float]] = {}
  took: dict[str, float] = {}
  try:
    while pending or running:
      while pending and len(running) < max_concurrent:
        job = pending.pop(0)
        with open(job.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
          env = None if job.env is None else dict(job.env)
          proc = subprocess.Popen(list(job.argv), stdout=log, stderr=subprocess.STDOUT, env=env)
        running[job.name] = (job, proc, time.time())
        state[job.name] = "running"
      time.sleep(interval_s)
      for name, (job, proc, t0) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        del running[name]
        if code != 0:
          raise JobFailed(
            f"{name} failed (exit {code}): {last_line(job.log_path)!r}; its full log is "
            f"{job.log_path}"
          )
        took[name] = time.time() - t0
        state[name] = "done"
      if on_tick is not None:
        on_tick(dict(state))
  finally:
    for _, proc, _ in running.values():
      proc.terminate()
    for _, proc, _ in running.values():
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
  return took

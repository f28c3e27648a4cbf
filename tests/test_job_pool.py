"""utils/job_pool: real subprocesses, at most N at once, logs, and failures that stop the rest."""

import os
import sys
import time

import pytest

from imagen_jax.utils import job_pool


def _job(tmp_path, name: str, code: str) -> job_pool.Job:
  return job_pool.Job(name, [sys.executable, "-c", code], str(tmp_path / f"{name}.log"))


def _interval_job(tmp_path, name: str, seconds: float) -> job_pool.Job:
  """Writes its start and end times (and a line of output) and sleeps in between."""
  stamp = tmp_path / f"{name}.times"
  code = (
    f"import time; t0 = time.time(); print('hello from {name}', flush=True); "
    f"time.sleep({seconds}); open({str(stamp)!r}, 'w').write(f'{{t0}} {{time.time()}}')"
  )
  return _job(tmp_path, name, code)


def _interval(tmp_path, name: str) -> tuple[float, float]:
  start, end = (tmp_path / f"{name}.times").read_text().split()
  return float(start), float(end)


def test_at_most_n_jobs_run_at_once_in_order(tmp_path):
  jobs = [_interval_job(tmp_path, n, 0.8) for n in ("a", "b", "c")]
  ticks = []
  took = job_pool.run_jobs(jobs, 2, on_tick=ticks.append, interval_s=0.05)
  assert set(took) == {"a", "b", "c"} and all(t >= 0.8 for t in took.values())
  a, b, c = (_interval(tmp_path, n) for n in "abc")
  # a and b overlap; c starts only once one of them has ended.
  assert b[0] < a[1] and a[0] < b[1]
  assert c[0] >= min(a[1], b[1])
  assert (tmp_path / "a.log").read_text().strip() == "hello from a"
  assert ticks[0] == {"a": "running", "b": "running", "c": "pending"}
  assert ticks[-1] == {"a": "done", "b": "done", "c": "done"}
  assert not any(list(t.values()).count("running") > 2 for t in ticks)


def test_a_failing_job_names_its_last_log_line_and_stops_the_others(tmp_path):
  slow = _interval_job(tmp_path, "slow", 60)
  bad = _job(
    tmp_path,
    "bad",
    "import sys; print('working'); print('ValueError: bad input; fix it'); sys.exit(3)",
  )
  never = _interval_job(tmp_path, "never", 0)
  t0 = time.time()
  with pytest.raises(
    job_pool.JobFailed, match=r"bad failed \(exit 3\): 'ValueError: bad input; fix it'; its "
  ):
    job_pool.run_jobs([slow, bad, never], 2, interval_s=0.05)
  assert time.time() - t0 < 30  # the 60 s job was stopped, not waited for
  assert not (tmp_path / "slow.times").exists()
  assert not os.path.exists(never.log_path)  # never started


def test_last_line_splits_progress_bar_carriage_returns(tmp_path):
  path = tmp_path / "log"
  path.write_text("first\n 10%|#  | 1/10\r 20%|## | 2/10\r\n\n")
  assert job_pool.last_line(str(path)) == "20%|## | 2/10"
  assert job_pool.last_line(str(tmp_path / "missing")) == ""
  with pytest.raises(ValueError, match="max_concurrent=0"):
    job_pool.run_jobs([], 0)


def test_a_job_runs_in_its_own_environment(tmp_path):
  show = "import os; print(os.environ.get('IMAGEN_JAX_JOB_VAR', 'unset'))"
  with_env = job_pool.Job(
    "e", [sys.executable, "-c", show], str(tmp_path / "e.log"), {"IMAGEN_JAX_JOB_VAR": "7"}
  )
  job_pool.run_jobs([with_env, _job(tmp_path, "i", show)], 2, interval_s=0.05)
  assert (tmp_path / "e.log").read_text().strip() == "7"
  assert (tmp_path / "i.log").read_text().strip() == "unset"  # env=None inherits this process's

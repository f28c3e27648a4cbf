"""utils/cpu_malloc: the glibc settings the demo's training jobs run with, and what they do.

The effect is checked on the real mechanism: a child process runs the demo base's compiled train
step (whose XLA:CPU scratch buffer is allocated and freed at every step) and counts its own minor
page faults over repeated steps.
"""

import json
import os
import subprocess
import sys

import pytest

from imagen_jax import demo
from imagen_jax.utils import cpu_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAULTS_PER_STEP = r"""
import json, resource, sys
sys.path.insert(0, "benchmarks")
import jax
import step_profile  # builds a recipe's full train step on one CPU device

args = step_profile.parse_args(["--gin_file=configs/stages/demo_base16.gin"])
step, state, batch, rng, *_ = step_profile._build(args)
for _ in range(3):
  state = step(state, batch, rng)[0]
jax.block_until_ready(state)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  state = step(state, batch, rng)[0]
jax.block_until_ready(state)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10))
"""


def _faults_per_step(env: dict[str, str]) -> float:
  env = {**env, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device and the default compiler, as a demo training job
  done = subprocess.run(
    [sys.executable, "-c", _FAULTS_PER_STEP],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_child_env_adds_the_settings_and_keeps_the_users():
  env = cpu_malloc.child_env({"PATH": "/bin", "MALLOC_ARENA_MAX": "4"})
  assert env["PATH"] == "/bin" and env["MALLOC_ARENA_MAX"] == "4"
  assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 2**30


def test_demo_training_jobs_run_with_the_settings(tmp_path):
  job = demo.stage_train_job("configs/stages/demo_base16.gin", str(tmp_path), "/d", 10, 16, 0)
  for name, value in cpu_malloc.KEEP_SCRATCH_MAPPED.items():
    assert job.env[name] == value, name
  assert job.env["PATH"] == os.environ["PATH"]


@pytest.mark.slow
def test_the_settings_stop_scratch_memory_faulting_back_in_every_step():
  base = {k: v for k, v in os.environ.items() if k not in cpu_malloc.KEEP_SCRATCH_MAPPED}
  plain = _faults_per_step(base)
  kept = _faults_per_step(cpu_malloc.child_env(base))
  # Without them every step maps its 110 MB scratch afresh: ~28,000 faults of 4 KiB pages.
  assert plain > 16_000, plain
  # Measured here: ~28,200 faults per step without, ~2,800 with.
  assert kept < plain / 4, (kept, plain)

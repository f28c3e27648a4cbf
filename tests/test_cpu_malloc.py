"""utils/cpu_malloc: the glibc settings the demo's training jobs run with, and what they do.

The effect is checked on the real mechanism: a child process runs a jitted function whose XLA:CPU
scratch buffer (~128 MB) is allocated and freed at every call, and counts its own minor page
faults over repeated calls.
"""

import json
import os
import subprocess
import sys

from imagen_jax import demo
from imagen_jax.utils import cpu_malloc

_FAULTS_PER_CALL = r"""
import json, resource
import jax, jax.numpy as jnp

@jax.jit
def step(x):  # two 64 MB intermediates that live only inside the executable
  y = jnp.sin(x) * 2.0
  z = jnp.cos(y) @ y
  return jnp.sum(z * y)

x = jnp.ones((4096, 4096), jnp.float32)
step(x).block_until_ready()
step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
  step(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps((after - before) / 6))
"""


def _faults_per_call(env: dict[str, str]) -> float:
  env = {**env, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as an `imagen-jax train` job has
  done = subprocess.run(
    [sys.executable, "-c", _FAULTS_PER_CALL], env=env, capture_output=True, text=True, timeout=300
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


def test_the_settings_stop_scratch_memory_faulting_back_in_every_call():
  base = {k: v for k, v in os.environ.items() if k not in cpu_malloc.KEEP_SCRATCH_MAPPED}
  plain = _faults_per_call(base)
  kept = _faults_per_call(cpu_malloc.child_env(base))
  # Without them every call maps its scratch afresh: at least 64 MB of 4 KiB pages.
  assert plain > 16_000, plain
  # Measured here: ~49,000 faults per call without, ~8,200 with (the demo base step: 30,000
  # without, under 1,500 with).
  assert kept < plain / 4, (kept, plain)

"""Fault soak: real `imagen-jax train` and `precompute` processes SIGKILLed at random moments.

Each kill lands at one of: start-up (imports, compile, restore), the middle of a training step,
an asynchronous checkpoint save in flight (its temporary directory exists), or a shard write.
After every kill the same command is rerun; at the end the run must equal an uninterrupted one.
Moments are drawn from `IMAGEN_JAX_SOAK_SEED` (default 0; printed) on top of the machine's own
timing, so every CI run explores different moments. The network is a 40k-parameter U-Net so a
restart costs seconds (its compile comes from the persistent cache tests/conftest.py sets); the
soak kills `MAX_KILLS` times unless `SOAK_CAP_S` runs out first on a slow machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from imagen_jax import checkpoints
from imagen_jax.data import shards
from tests import shard_hooks, train_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("IMAGEN_JAX_SOAK_SEED", "0"))
SOAK_CAP_S = 420.0
MAX_KILLS = 4
STEPS = 10
# A micro U-Net (one level, no attention) on the tiny base recipe.
MICRO_NET = [
  "--gin.unet.UNet.channels=8",
  "--gin.unet.UNet.channel_mult=(1,)",
  "--gin.unet.UNet.attention_resolutions=()",
  "--gin.unet.UNet.head_dim=8",
  "--gin.unet.UNet.norm_groups=4",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_helpers.build_precomputed_shapes(str(tmp_path_factory.mktemp("shapes")))


def _train_cmd(model_dir: str, data_dir: str, step_delay_s: float = 0.0) -> list[str]:
  return [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "train",
    "--gin_file=configs/stages/tiny_base.gin",
    "--gin_file=configs/mesh/cpu.gin",
    "--gin_file=configs/runs/tiny.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.DATA='{data_dir}'",
    f"--gin.train.train.num_train_steps={STEPS}",
    "--gin.train.train.checkpoint_every=2",
    "--gin.train.train.keep_checkpoints=2",
    "--gin.train.train.log_every=1",
    "--gin_file=configs/hooks/fault_drill.gin",
    f"--gin.STEP_DELAY_S={step_delay_s}",
    *MICRO_NET,
  ]


def _env() -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu")


def _lines(path: str) -> list[str]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return f.read().splitlines()


def _records(path: str) -> list[dict]:
  return [json.loads(line) for line in _lines(path)]


def _wait(condition, proc: subprocess.Popen, timeout_s: float) -> bool:
  """Polls `condition` every 2 ms; False when the process ended or the time ran out first
  (with a condition that never holds: sleeps `timeout_s` unless the process ends)."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if condition():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.002)
  return False


def _save_in_flight(ckpt_dir: str) -> bool:
  return os.path.isdir(ckpt_dir) and any("tmp" in n for n in os.listdir(ckpt_dir))


def _kill_train_once(model_dir: str, data_dir: str, mode: str, rng: random.Random) -> str:
  """Starts the job, SIGKILLs it at a `mode` moment; returns what happened."""
  keys_file = os.path.join(model_dir, "example_keys", "process_0.jsonl")
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  seen = len(_lines(keys_file))
  proc = subprocess.Popen(
    _train_cmd(model_dir, data_dir, step_delay_s=0.25),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  if mode == "startup":
    _wait(lambda: False, proc, rng.uniform(1.0, 8.0))  # a random moment of the start-up
    hit = True
  elif mode == "step":
    hit = _wait(lambda: len(_lines(keys_file)) > seen, proc, 240)
    time.sleep(rng.uniform(0.0, 0.25))
  else:  # "save"
    hit = _wait(lambda: _save_in_flight(ckpt_dir), proc, 240)
  if proc.poll() is not None:
    return f"{mode}: finished before the kill (rc {proc.returncode})"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return f"{mode}: killed{'' if hit else ' (moment missed)'}"


@pytest.mark.slow
def test_train_survives_sigkills_at_random_moments(data_dir, tmp_path):
  rng = random.Random(SEED)
  reference, soaked = str(tmp_path / "reference"), str(tmp_path / "soaked")
  subprocess.run(
    _train_cmd(reference, data_dir), cwd=REPO, env=_env(), check=True, capture_output=True
  )
  t0, events = time.time(), []
  while len(events) < MAX_KILLS and time.time() - t0 < SOAK_CAP_S:
    mode = ["save", "startup", "step"][len(events) % 3] if len(events) < 3 else None
    mode = mode or rng.choice(["save", "step", "startup"])
    events.append(_kill_train_once(soaked, data_dir, mode, rng))
    if "finished" in events[-1]:
      break
  r = subprocess.run(_train_cmd(soaked, data_dir), cwd=REPO, env=_env(), capture_output=True)
  kills = sum("killed" in e for e in events)
  print(f"\nsoak seed {SEED}: {kills} SIGKILLs survived in {time.time() - t0:.0f}s: {events}")
  assert r.returncode == 0, r.stderr.decode()[-3000:]
  assert kills >= 3, events

  # The run reached its last step, saw exactly the uninterrupted run's examples, step by step,
  # and its logs hold every step once.
  ckpt = checkpoints.Checkpointer(os.path.join(soaked, "checkpoints"), async_save=False)
  try:
    assert ckpt.latest_step() == STEPS
    keys_file = os.path.join("example_keys", "process_0.jsonl")
    soaked_keys = _records(os.path.join(soaked, keys_file))
    reference_keys = _records(os.path.join(reference, keys_file))
    assert [r["step"] for r in soaked_keys] == list(range(1, STEPS + 1))
    assert soaked_keys == reference_keys
    metric_steps = [m["step"] for m in _records(os.path.join(soaked, "metrics.jsonl"))]
    assert metric_steps == list(range(1, STEPS + 1))
    # Every checkpoint that exists loads, and the final weights equal the reference's.
    for step in ckpt.all_steps():
      ckpt.read_config(step)
      ckpt.restore_ema_params(step)
    final = ckpt.restore_ema_params(STEPS)
  finally:
    ckpt.close()
  expected = _ema_params(reference, STEPS)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(final), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  leftovers = [
    os.path.join(root, n)
    for root, dirs, files in os.walk(soaked)
    for n in dirs + files
    if "tmp" in n
  ]
  assert not leftovers, leftovers


def _ema_params(model_dir: str, step: int):
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), async_save=False)
  try:
    return ckpt.restore_ema_params(step)
  finally:
    ckpt.close()


@pytest.mark.slow
def test_ctrl_c_during_a_real_job_is_one_line(data_dir, tmp_path):
  """SIGINT once the job has loaded its data (it is compiling): exit 130, one line, no trace."""
  proc = subprocess.Popen(
    _train_cmd(str(tmp_path / "run"), data_dir),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
  reader.start()
  assert _wait(lambda: any("data ready" in line for line in lines), proc, 240), lines[-20:]
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=240)
  reader.join(timeout=10)
  assert proc.returncode == 130, "".join(lines[-30:])
  assert lines[-1].strip() == "imagen-jax train: interrupted"
  assert not any("Traceback" in line for line in lines)


PRECOMPUTE_EXAMPLES, PER_SHARD = 48, 4


def _precompute_cmd(out: str, vocab: str) -> list[str]:
  return [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "precompute",
    "--source=shapes",
    f"--out={out}",
    f"--vocab={vocab}",
    "--t5_checkpoint=random",
    "--t5_size=tiny",
    f"--max_length={train_helpers.MAX_LENGTH}",
    f"--examples_per_shard={PER_SHARD}",
    f"--num_examples={PRECOMPUTE_EXAMPLES}",
    "--num_validation=4",
    "--resolution=16",
    "--batch_size=4",
    "--no_progress",
  ]


def _shard_write_in_flight(out: str) -> bool:
  return os.path.isdir(out) and any(".tmp-" in n for n in os.listdir(out))


def _kill_precompute_once(out: str, vocab: str, mode: str, rng: random.Random) -> str:
  proc = subprocess.Popen(
    [*_precompute_cmd(out, vocab), shard_hooks.FLAG],
    env=shard_hooks.env(0.2, _env()),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  if mode == "write":
    hit = _wait(lambda: _shard_write_in_flight(out), proc, 120)
  else:  # a random moment: start-up, encoding, between shards
    _wait(lambda: False, proc, rng.uniform(2.0, 12.0))
    hit = True
  if proc.poll() is not None:
    return f"{mode}: finished before the kill (rc {proc.returncode})"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return f"{mode}: killed{'' if hit else ' (moment missed)'}"


def _shard_keys(out: str, split: str) -> list[str]:
  import tensorflow as tf

  with open(os.path.join(out, shards.MANIFEST)) as f:
    manifest = json.load(f)
  keys = []
  for name in manifest["splits"][split]["shards"]:
    for payload in tf.compat.v1.io.tf_record_iterator(os.path.join(out, name)):
      keys.append(shards.decode_record(payload, train_helpers.TEXT_DIM)["key"])
  return keys


@pytest.mark.slow
def test_precompute_survives_sigkills_at_random_moments(tmp_path):
  rng = random.Random(SEED + 1)
  vocab = train_helpers.shapes_vocabulary(str(tmp_path))
  out = str(tmp_path / "out")
  t0, events = time.time(), []
  while len(events) < MAX_KILLS and time.time() - t0 < SOAK_CAP_S:
    events.append(_kill_precompute_once(out, vocab, ["write", "random"][len(events) % 2], rng))
    if "finished" in events[-1]:
      break
  r = subprocess.run(_precompute_cmd(out, vocab), env=_env(), capture_output=True)
  kills = sum("killed" in e for e in events)
  print(f"\nprecompute soak seed {SEED}: {kills} SIGKILLs survived: {events}")
  assert r.returncode == 0, r.stderr.decode()[-3000:]
  assert kills >= 2, events
  # No shard lost or duplicated: every example exactly once.
  keys = _shard_keys(out, "train")
  assert sorted(keys) == [f"train_{i:08d}" for i in range(PRECOMPUTE_EXAMPLES)]
  assert not [n for n in os.listdir(out) if ".tmp-" in n]

"""The stage training job: learning, sharding equivalence, exact resume, preemption, multi-host.

All runs use a tiny precomputed `shapes` dataset (real TFDS build, real SentencePiece model,
random tiny T5) and tiny networks; processes are real subprocesses where the test is about
process death.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import PIL.Image
import pytest

from imagen_jax import checkpoints, errors, gin_utils, train
from imagen_jax.inference import cascade
from imagen_jax.training import job
from tests import train_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return train_helpers.build_precomputed_shapes(str(tmp_path_factory.mktemp("shapes")))


def _bindings(model_dir, data_dir, **extra):
  b = [f"MODEL_DIR = '{model_dir}'", f"DATA = '{data_dir}'"]
  b += [f"train.train.{k} = {v!r}" for k, v in extra.items()]
  return b


def _run_in_process(stage_gin, mesh_gin, model_dir, data_dir, extra_gin=(), **extra):
  gin_utils.parse_gin(
    [stage_gin, mesh_gin, "configs/runs/tiny.gin", *extra_gin],
    _bindings(model_dir, data_dir, **extra),
  )
  return train.configurable_train()()


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _cli(model_dir, data_dir, stage_gin="configs/stages/tiny_base.gin", extra=(), env=None):
  cmd = [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "train",
    f"--gin_file={stage_gin}",
    "--gin_file=configs/mesh/cpu.gin",
    "--gin_file=configs/runs/tiny.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.DATA='{data_dir}'",
    *extra,
  ]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return cmd, full_env


def _keys_by_step(model_dir, process=0):
  """Step -> example keys; a step redone after a crash keeps its last record."""
  out = {}
  with open(os.path.join(model_dir, "example_keys", f"process_{process}.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out[rec["step"]] = rec["keys"]
  return out


@pytest.mark.parametrize(
  "stage_gin", ["configs/stages/tiny_base.gin", "configs/stages/tiny_sr.gin"]
)
def test_tiny_stage_loss_falls(stage_gin, data_dir, tmp_path):
  # ε-prediction starts at loss ≈ E[ε²] = 1 (the zero-initialised net outputs 0). A network
  # that learned the images' statistics predicts ε from z_t well at low noise; measured runs
  # reach ≈0.2 by step 80. Requiring the last three logged losses (steps 60–80) to average
  # below 0.6× the first (step 1) leaves a wide margin yet fails for a model that doesn't learn.
  _run_in_process(
    stage_gin,
    "configs/mesh/cpu1.gin",  # one device: the fastest way to run many tiny steps on 2 cores
    str(tmp_path),
    data_dir,
    num_train_steps=80,
    log_every=10,
    checkpoint_every=1000,
  )
  losses = [m["loss"] for m in _metrics(str(tmp_path))]
  first, last = losses[0], np.mean(losses[-3:])
  assert last < 0.6 * first, f"loss did not fall: {losses}"
  # The checkpoint holds the stage spec, equal to what its gin config describes.
  ckpt = checkpoints.Checkpointer(os.path.join(tmp_path, "checkpoints"), async_save=False)
  try:
    step = ckpt.latest_step()
    saved, config_text = ckpt.read_stage_spec(step), ckpt.read_config(step)
  finally:
    ckpt.close()
  assert saved == json.loads(json.dumps(cascade.stage_spec_from_gin(config_text)))


def test_init_from_a_model_dir_starts_from_its_ema_params_once(data_dir, tmp_path, caplog):
  """`init_from=MODEL_DIR` starts a fresh run at that run's EMA params (not a random init) with
  a fresh optimizer, and is ignored once the new run has a checkpoint of its own."""
  import logging

  caplog.set_level(logging.INFO, logger="imagen_jax")
  first, tuned = str(tmp_path / "first"), str(tmp_path / "tuned")
  common = dict(log_every=1, checkpoint_every=1000)
  _run_in_process(
    "configs/stages/tiny_base.gin",
    "configs/mesh/cpu1.gin",
    first,
    data_dir,
    extra_gin=["configs/hooks/example_keys.gin"],  # the shipped hook config: one line per step
    num_train_steps=3,
    **common,
  )
  assert sorted(_keys_by_step(first)) == [1, 2, 3]
  start = cascade.load_stage_dir(first).params
  # lr 0 for the tuned run: its weights stay exactly the ones it started from.
  extra = dict(num_train_steps=1, init_from=first, **common)
  gin_utils.parse_gin(
    ["configs/stages/tiny_base.gin", "configs/mesh/cpu1.gin", "configs/runs/tiny.gin"],
    _bindings(tuned, data_dir, **extra) + ["optim.make_optimizer.learning_rate = 0.0"],
  )
  train.configurable_train()()
  assert f"initialised from {first}" in caplog.text
  got = cascade.load_stage_dir(tuned).params
  # EMA of equal params and EMA: d·x + (1 − d)·x, exact up to an ulp.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, start)
  # Resuming: the run's own step 1 loads; init_from is not applied again.
  caplog.clear()
  gin_utils.parse_gin(
    ["configs/stages/tiny_base.gin", "configs/mesh/cpu1.gin", "configs/runs/tiny.gin"],
    _bindings(tuned, data_dir, **{**extra, "num_train_steps": 2}),
  )
  train.configurable_train()()
  assert "resumed from" in caplog.text and "initialised from" not in caplog.text


def test_train_job_runs_the_program_compile_reports(data_dir, tmp_path, caplog):
  """`imagen-jax compile` on the same gin files reports the fingerprint (sha256 of the lowered
  StableHLO) of the very step the training job ran, so the check cannot drift from the job."""
  import argparse
  import logging
  import re

  from imagen_jax.cli import compile as compile_cli

  caplog.set_level(logging.INFO, logger="imagen_jax")
  gin_files = ["configs/stages/tiny_sr.gin", "configs/mesh/cpu8_fsdp.gin", "configs/runs/tiny.gin"]
  extra = dict(num_train_steps=1, log_every=1, num_microbatches=2)
  _run_in_process(*gin_files[:2], str(tmp_path), data_dir, **extra)
  ran = re.findall(r"program sha256 ([0-9a-f]{64})", caplog.text)
  assert len(ran) == 1
  parser = argparse.ArgumentParser()
  compile_cli.add_arguments(parser)
  args = parser.parse_args([f"--gin_file={f}" for f in gin_files])
  args.gin_bindings = _bindings(str(tmp_path), data_dir, **extra)
  report, _ = compile_cli.compile_train_step(args)
  assert report.num_microbatches == 2 and report.mesh == {"data": 2, "fsdp": 4, "model": 1}
  assert report.fingerprint == ran[0]
  # A different step (here: no gradient accumulation) is a different fingerprint.
  args.gin_bindings = _bindings(str(tmp_path), data_dir, num_microbatches=1)
  assert compile_cli.compile_train_step(args)[0].fingerprint != ran[0]


def test_sharded_step_equals_single_device(data_dir, tmp_path):
  runs = {}
  for name, mesh_gin in (("fsdp", "configs/mesh/cpu8_fsdp.gin"), ("one", "configs/mesh/cpu1.gin")):
    model_dir = str(tmp_path / name)
    _run_in_process(
      "configs/stages/tiny_base.gin",
      mesh_gin,
      model_dir,
      data_dir,
      num_train_steps=3,
      log_every=1,
      checkpoint_every=3,
      async_checkpointing=False,
    )
    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))
    runs[name] = (_metrics(model_dir), ckpt.restore_ema_params(3))
    ckpt.close()
  (m_a, p_a), (m_b, p_b) = runs["fsdp"], runs["one"]
  # f32 with different reduction orders across devices: agree to ~1e-5 relative.
  np.testing.assert_allclose([m["loss"] for m in m_a], [m["loss"] for m in m_b], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def _line_count(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return len(f.readlines())


def _wait_for(predicate, timeout, proc=None, what=""):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"process exited ({proc.returncode}) before {what}")
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(path):
  """The step of every record, duplicates included (what a reader of the raw file sees)."""
  with open(path) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(data_dir, tmp_path):
  model_dir = str(tmp_path)
  extra = [
    "--gin.train.train.num_train_steps=40",
    "--gin.train.train.checkpoint_every=1000",
    "--gin_file=configs/hooks/fault_drill.gin",
    "--gin.STEP_DELAY_S=0.3",
  ]
  cmd, env = _cli(model_dir, data_dir, extra=extra)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  keys_file = os.path.join(model_dir, "example_keys", "process_0.jsonl")
  _wait_for(
    lambda: _line_count(keys_file) >= 3,
    timeout=240,
    proc=proc,
    what="step 3",
  )
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr.decode()[-2000:]
  last_step = max(_keys_by_step(model_dir))
  assert 3 <= last_step < 40
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))
  assert ckpt.latest_step() == last_step
  ckpt.close()
  extra[0] = f"--gin.train.train.num_train_steps={last_step + 2}"
  extra[-1] = "--gin.STEP_DELAY_S=0.0"
  cmd, env = _cli(model_dir, data_dir, extra=extra)
  subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
  assert sorted(_keys_by_step(model_dir)) == list(range(1, last_step + 3))


@pytest.mark.slow
def test_two_processes_match_one_process(data_dir, tmp_path):
  """2 processes × 4 CPU devices (gloo, launched by launch/local.py) vs 1 process × 8 devices.

  The mesh is data=2 × fsdp=4, so parameters are sharded across both processes; the data order
  does not depend on the process count, so both runs see the same global batches and must
  report the same losses (f32; different reduction order → rtol 1e-5).
  """
  common = [
    "--gin_file=configs/stages/tiny_base.gin",
    "--gin_file=configs/mesh/cpu8_fsdp.gin",
    "--gin_file=configs/runs/tiny.gin",
    f"--gin.DATA='{data_dir}'",
    "--gin.train.train.num_train_steps=3",
    "--gin.train.train.log_every=1",
    "--gin.train.train.sample_every=3",
    "--gin.train.train.num_sample_images=2",
    "--gin.train.train.sample_steps=4",
  ]
  single, multi = tmp_path / "single", tmp_path / "multi"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "imagen_jax.cli", "train", "--num_cpu_devices=8", *common]
  subprocess.run(
    [*cmd, f"--gin.MODEL_DIR='{single}'"], env=env, cwd=REPO, check=True, capture_output=True
  )
  launcher = [
    sys.executable,
    os.path.join(REPO, "launch", "local.py"),
    "--num_processes=2",
    "--num_cpu_devices=4",
    f"--log_dir={tmp_path / 'logs'}",
    "--timeout_s=600",
    "--",
    *common,
    f"--gin.MODEL_DIR='{multi}'",
  ]
  # launch/local.py strips the test's 8-device XLA_FLAGS from its children.
  r = subprocess.run(launcher, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  assert any(line.startswith("[p1] ") for line in r.stdout.splitlines())
  a = [m["loss"] for m in _metrics(str(single))]
  b = [m["loss"] for m in _metrics(str(multi))]
  print("1 process × 8 devices losses:", a)
  print("2 processes × 4 devices losses:", b)
  assert len(a) == 3 and all(np.isfinite(a))
  np.testing.assert_allclose(a, b, rtol=1e-5)
  assert (tmp_path / "logs" / "process_1.log").stat().st_size > 0
  # The sample grid: all hosts sample with the host-sharded EMA params, host 0 writes the same
  # picture the one-process run writes (up to float reduction order in uint8 rounding).
  grid_a = np.asarray(PIL.Image.open(single / "samples" / "step_00000003.png"), np.float32)
  grid_b = np.asarray(PIL.Image.open(multi / "samples" / "step_00000003.png"), np.float32)
  assert grid_a.shape == grid_b.shape
  assert np.abs(grid_a - grid_b).mean() < 1.0, np.abs(grid_a - grid_b).mean()


@pytest.mark.parametrize(
  "binding,pattern",
  [
    ("train.train.no_such_option = 1", "no_such_option"),
    ("train.train.batch_size = 7", "not divisible by the data-parallel size"),
  ],
)
def test_bad_config_fails_fast(binding, pattern, data_dir, tmp_path):
  t0 = time.time()
  with pytest.raises(ValueError, match=pattern):
    gin_utils.parse_gin(
      ["configs/stages/tiny_base.gin", "configs/mesh/cpu.gin", "configs/runs/tiny.gin"],
      [*_bindings(str(tmp_path), data_dir), binding],
    )
    train.configurable_train()()
  assert time.time() - t0 < 1.0


def test_missing_model_dir_fails_fast(data_dir):
  t0 = time.time()
  with pytest.raises(Exception, match="MODEL_DIR"):
    gin_utils.parse_gin(
      ["configs/stages/tiny_base.gin", "configs/mesh/cpu.gin", "configs/runs/tiny.gin"],
      [f"DATA = '{data_dir}'"],
    )
    train.configurable_train()()
  assert time.time() - t0 < 1.0


def test_resume_moves_a_truncated_newest_checkpoint_aside(data_dir, tmp_path, caplog):
  """A truncated newest step: the job resumes from the one before, moves the broken one aside
  (kept, no longer counted by keep-last-K), redoes its steps and logs each step once."""
  import logging

  model_dir = str(tmp_path)
  extra = dict(log_every=1, checkpoint_every=1, keep_checkpoints=2, async_checkpointing=False)
  _run_in_process(
    "configs/stages/tiny_base.gin",
    "configs/mesh/cpu1.gin",
    model_dir,
    data_dir,
    num_train_steps=2,
    **extra,
  )
  config_json = tmp_path / "checkpoints" / "2" / "config" / "metadata"
  config_json.write_bytes(config_json.read_bytes()[:5])
  with caplog.at_level(logging.WARNING):
    _run_in_process(
      "configs/stages/tiny_base.gin",
      "configs/mesh/cpu1.gin",
      model_dir,
      data_dir,
      num_train_steps=3,
      **extra,
    )
  assert f"skipping checkpoint step 2 in {tmp_path / 'checkpoints'}: {config_json}" in caplog.text
  assert "moved unloadable checkpoint step 2" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3", "corrupt.2"]
  assert _logged_steps(tmp_path / "metrics.jsonl") == [1, 2, 3]


def test_unwritable_model_dir_fails_fast_with_one_line(data_dir, tmp_path, capsys):
  from tests import cli_helpers

  (tmp_path / "a_file").write_text("x")
  unwritable = [tmp_path / "a_file" / "sub"]  # fails for root too: nothing nests in a file
  if os.geteuid() != 0:  # root ignores permission bits
    (tmp_path / "ro").mkdir(mode=0o555)
    unwritable.append(tmp_path / "ro" / "run")
  for model_dir in unwritable:
    t0 = time.time()
    cmd, _ = _cli(model_dir, data_dir)
    cli_helpers.user_error(
      capsys,
      cmd[cmd.index("train") :],  # the same command line, run in this process
      re.escape(f"MODEL_DIR {model_dir} is not a writable directory (")
      + ".*choose a directory you can write",
    )
    assert time.time() - t0 < 2.0


def test_no_gin_file_is_a_user_error(capsys):
  from tests import cli_helpers

  line = cli_helpers.user_error(capsys, ["train"], r"error: pass at least one --gin_file \(")
  assert line == "imagen-jax train: error: pass at least one --gin_file (a stage recipe and a run)"


def test_text_shape_mismatch_names_bindings_that_exist(data_dir, tmp_path):
  from imagen_jax.nn import unet

  shapes = {"text_emb": ((16, 32, 48), "float32")}
  with pytest.raises(errors.UserError) as e:
    job.check_batch_shapes(shapes, 16, 64, unet.UNet(text_dim=64))
  msg = str(e.value)
  fixes = re.findall(r"--gin\.([^\s,]+)", msg)
  assert fixes == ["train.train.max_length=32", "train.train.text_dim=48", "unet.UNet.text_dim=48"]
  assert "\n" not in msg and "MAX_LENGTH" not in msg
  # Every suggested binding is one the configs accept (unknown ones are rejected at parse).
  gin_utils.parse_gin(
    ["configs/stages/tiny_base.gin", "configs/mesh/cpu.gin", "configs/runs/tiny.gin"],
    [*_bindings(str(tmp_path), data_dir), *(f.replace("=", " = ") for f in fixes)],
  )
  assert gin_utils.gin.query_parameter("unet.UNet.text_dim") == 48

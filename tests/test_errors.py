"""The CLI's error contract: user errors are one line and exit 2, bugs keep their traceback,
Ctrl-C exits 130, and `--verbose` shows a user error's traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from imagen_jax import cli, errors
from tests import cli_helpers

TINY_TRAIN = [
  "train",
  "--gin_file=configs/stages/tiny_base.gin",
  "--gin_file=configs/runs/tiny.gin",
]


def test_unquoted_gin_string_names_the_fix(capsys):
  line = cli_helpers.user_error(
    capsys, [*TINY_TRAIN, "--gin.MODEL_DIR=/tmp/x"], "MODEL_DIR = /tmp/x"
  )
  assert "--gin.MODEL_DIR=\"'/tmp/run'\"" in line


def test_unknown_gin_parameter_is_one_line(capsys):
  line = cli_helpers.user_error(
    capsys, [*TINY_TRAIN, "--gin.train.train.no_such_option=1"], "no_such_option"
  )
  assert "In call to configurable" not in line and "invalid gin configuration" in line


def test_verbose_shows_the_traceback(capsys, monkeypatch):
  argv = [*TINY_TRAIN, "--gin.MODEL_DIR=/tmp/x"]
  with pytest.raises(errors.UserError, match="quotes"):
    cli.main([*argv, "--verbose"])
  monkeypatch.setenv(errors.VERBOSE_ENV, "1")
  with pytest.raises(errors.UserError, match="quotes"):
    cli.main(argv)


def _fake_command(monkeypatch, run) -> list[str]:
  """Registers a subcommand `fake` whose run() is `run`."""
  module = types.ModuleType("fake_command")
  module.add_arguments = lambda parser: None
  module.run = run
  monkeypatch.setitem(sys.modules, "fake_command", module)
  monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("fake_command", "a test command"))
  return ["fake"]


def test_bugs_keep_their_traceback(monkeypatch):
  def numpy_value_error(args):
    np.reshape(np.zeros(3), (2, 2))  # a ValueError raised outside our package: not the user's

  with pytest.raises(ValueError, match="reshape"):
    cli.main(_fake_command(monkeypatch, numpy_value_error))

  def runtime_error(args):
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    cli.main(_fake_command(monkeypatch, runtime_error))


def test_our_validation_errors_and_named_files_are_user_errors(capsys, monkeypatch):
  def missing_file(args):
    os.stat("/nonexistent/dir/file.txt")  # an OSError naming a file

  cli_helpers.user_error(capsys, _fake_command(monkeypatch, missing_file), "/nonexistent/dir")

  def multi_line(args):
    raise errors.UserError("first part\n  In call to configurable 'train' (<function>)\nsecond")

  line = cli_helpers.user_error(capsys, _fake_command(monkeypatch, multi_line), "first part")
  assert line == "imagen-jax fake: error: first part second"


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
  def interrupted(args):
    raise KeyboardInterrupt

  assert cli.main(_fake_command(monkeypatch, interrupted)) == 130
  assert capsys.readouterr().err.strip().splitlines() == ["imagen-jax fake: interrupted"]


def test_a_machine_without_tpu_gets_no_libtpu_noise(tmp_path):
  """libtpu (installed by the [tpu] extra) must not print its metadata errors on a CPU box."""
  if cli.glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    pytest.skip("this machine has TPU chips: libtpu's probing is wanted here")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS"))}
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "imagen_jax.cli",
      "info",
      "--gin_file=configs/models/tiny_base.gin",
      "--params_only",
    ],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "TPU_ACCELERATOR_TYPE" not in r.stderr and "libtpu" not in r.stderr, r.stderr


def test_a_ctrl_c_swallowed_by_a_bare_except_is_still_honoured():
  """JAX's compile path has bare `except:` blocks: a SIGINT landing in one raises a
  KeyboardInterrupt that is swallowed there. `interrupts` records the signal, so the job's next
  `check()` (after the compile, every training step) raises it again."""
  import os
  import signal
  import time

  from imagen_jax.utils import interrupts

  previous = signal.getsignal(signal.SIGINT)
  interrupts.install()
  try:
    interrupts.check()  # nothing received yet
    try:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1.0)  # the handler's KeyboardInterrupt interrupts this sleep...
      raise AssertionError("SIGINT was not delivered")
    except:  # noqa: E722 - ...and a bare except swallows it, as JAX's does
      pass
    with pytest.raises(KeyboardInterrupt):
      interrupts.check()
  finally:
    signal.signal(signal.SIGINT, previous)

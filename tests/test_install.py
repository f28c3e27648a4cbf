"""The package as a user installs it: a non-editable install, run from outside the repository.

The configs ship inside the package (`imagen_jax/configs`, linked from the repository's
`configs/`), so `--gin_file=configs/...` and the configs' own includes must resolve from the
installed copy, not from this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """`pip install .` (no deps: they are this venv's) into a fresh target directory."""
  target = tmp_path_factory.mktemp("site")
  build = tmp_path_factory.mktemp("build")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "-q",
      "--no-deps",
      "--no-build-isolation",
      "--target",
      str(target),
      REPO,
    ],
    check=True,
    capture_output=True,
    env=dict(os.environ, TMPDIR=str(build)),
  )
  return str(target)


def _run(installed: str, cwd, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=installed, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
  )


def test_installed_package_finds_its_configs_from_any_directory(installed, tmp_path):
  probe = (
    "import imagen_jax, imagen_jax.gin_utils as g;"
    "print(imagen_jax.__file__);"
    "print(g.resolve_config_path('configs/stages/tiny_base.gin'))"
  )
  r = _run(installed, tmp_path, "-c", probe)
  assert r.returncode == 0, r.stderr[-2000:]
  package_file, config = r.stdout.split()
  assert package_file.startswith(installed) and config.startswith(installed), r.stdout
  # `info` parses a model config; `train` parses a stage recipe whose includes chain through
  # three files, and stops at the first check (no DATA given) with its one line.
  r = _run(
    installed,
    tmp_path,
    "-m",
    "imagen_jax.cli",
    "info",
    "--gin_file=configs/models/tiny_base.gin",
    "--params_only",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert "params: 963747" in r.stdout
  r = _run(
    installed,
    tmp_path,
    "-m",
    "imagen_jax.cli",
    "train",
    "--gin_file=configs/stages/tiny_base.gin",
    "--gin_file=configs/mesh/cpu.gin",
    "--gin_file=configs/runs/tiny.gin",
    f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
  )
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("imagen-jax train: error: ") and "DATA" in last, last

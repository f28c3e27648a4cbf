"""`imagen-jax sample` as 2 real processes × 4 CPU devices (jax.distributed over gloo, started by
launch/local.py) against 1 process × 8 devices: the same PNGs and the same index.json; and a rerun
that continues from an interrupted multi-process run's per-process indexes.

The stage dirs are test_cli's tiny random-weight MODEL_DIRs (base16 -> sr32).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax import cli
from imagen_jax.cli import sample as sample_cli
from launch import local
from tests import cli_helpers, test_cli

stage_dirs = test_cli.stage_dirs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("a large red circle on a white background", "a small blue square on a gray background")


def _flags(dirs: list[str], out) -> list[str]:
  return [
    f"--stage_dirs={','.join(dirs)}",
    *(f"--prompt={p}" for p in PROMPTS),
    "--prompt=",
    "--num_per_prompt=2",  # 6 images
    "--batch_size=2",  # 3 batches: process 0 samples batches 0 and 2, process 1 batch 1
    "--steps=2",
    "--guidance=2,1",
    "--seed=3",
    f"--out={out}",
    "--no_progress",
  ]


def _index(out) -> dict:
  with open(os.path.join(out, "index.json")) as f:
    return json.load(f)


def _pixels(path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im, np.int16)


@pytest.fixture(scope="module")
def runs(stage_dirs, tmp_path_factory):
  """(1 × 8 devices out dir, 2 processes × 4 devices out dir, launcher stdout)."""
  _, dirs = stage_dirs
  root = tmp_path_factory.mktemp("multihost")
  single, multi = root / "single", root / "multi"
  env = local.child_env()
  cmd = [sys.executable, "-m", "imagen_jax.cli", "sample", "--num_cpu_devices=8"]
  r = subprocess.run(
    [*cmd, *_flags(dirs, single)], env=env, cwd=REPO, capture_output=True, text=True, check=False
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  launcher = [
    sys.executable,
    os.path.join(REPO, "launch", "local.py"),
    "--num_processes=2",
    "--num_cpu_devices=4",
    "--subcommand=sample",
    "--timeout_s=600",
    "--",
    *_flags(dirs, multi),
    "--mesh=data=2,fsdp=2",  # and FSDP-sharded params on each host
  ]
  r = subprocess.run(launcher, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  return single, multi, r.stdout


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(runs):
  single, multi, stdout = runs
  # Each process sampled its own share of the batches (4 + 2 of the 6 images).
  assert "[p0] sample: process 0/2: 4 images" in stdout, stdout[-3000:]
  assert "[p1] sample: process 1/2: 2 images" in stdout, stdout[-3000:]
  names = sorted(os.listdir(single))
  assert names == sorted(os.listdir(multi))  # no per-process index is left behind
  pngs = [n for n in names if n.endswith(".png")]
  assert len(pngs) == 6 and "index.json" in names
  diffs = [np.abs(_pixels(single / n) - _pixels(multi / n)).max() for n in pngs]
  print("1×8 vs 2×4 (data=2 × fsdp=2 each): max |Δ| per PNG (uint8):", diffs)
  # Float rounding between layouts moves a pixel by at most one level of 255.
  assert max(diffs) <= 1
  a, b = _index(single), _index(multi)
  assert a["images"] == b["images"] and len(a["images"]) == 6
  for key in ("run", "source", "weights", "total", "resolution"):
    assert a[key] == b[key], key
  assert set(b["seconds_per_stage"]) == {"base16", "sr32"}


def test_rerun_continues_from_process_indexes(runs, stage_dirs, tmp_path, capsys):
  """An interrupted 2-process run: index.json lists batch 0, process 1's own index batch 1, and
  batch 2's PNGs are missing. A one-process rerun samples only batch 2 and merges everything
  into one index.json equal to the uninterrupted run's."""
  _, dirs = stage_dirs
  single, multi, _ = runs
  out = tmp_path / "out"
  shutil.copytree(multi, out)
  full = _index(multi)
  (out / "index.json").write_text(json.dumps({**full, "images": full["images"][:2]}))
  part = {**full, "images": full["images"][2:4]}
  (out / sample_cli.part_file(1)).write_text(json.dumps(part))
  for entry in full["images"][4:]:
    os.remove(out / entry["file"])
  capsys.readouterr()
  assert cli.main(["sample", *_flags(dirs, out)]) == 0
  printed = capsys.readouterr().out
  assert "2 images" in printed and "resuming: 4 already done" in printed, printed
  assert not os.path.exists(out / sample_cli.part_file(1))
  assert _index(out)["images"] == full["images"]
  for entry in full["images"]:
    assert np.abs(_pixels(out / entry["file"]) - _pixels(single / entry["file"])).max() <= 1


def test_mesh_flag_errors(stage_dirs, tmp_path, capsys):
  _, dirs = stage_dirs
  argv = ["sample", *_flags(dirs, tmp_path / "out")]
  cli_helpers.user_error(capsys, [*argv, "--mesh=data=2,tensor=4"], r"--mesh=.*AXIS=SIZE")
  cli_helpers.user_error(
    capsys,
    [*argv, "--mesh=data=3"],
    r"--mesh='data=3': mesh .* needs 3 devices but 8 are available",
  )
  assert not os.path.exists(tmp_path / "out")  # refused before anything was written

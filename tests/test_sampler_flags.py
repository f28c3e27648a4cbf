"""The sampler registry through `imagen-jax sample`: `--sampler=dpmpp_2m` and `--time_spacing`
reach the compiled loop, are recorded per image, and bad names are one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from tests import cli_helpers, test_cli

stage_dirs = test_cli.stage_dirs  # the tiny base16 -> sr32 MODEL_DIRs


def _sample(dirs, out, *extra) -> list[dict]:
  argv = [
    "sample",
    f"--stage_dirs={','.join(dirs)}",
    "--prompt=a large red circle on a white background",
    "--seed=1",
    "--steps=3",
    f"--out={out}",
    "--no_progress",
    *extra,
  ]
  assert test_cli.cli.main(argv) == 0
  with open(os.path.join(out, "index.json")) as f:
    return json.load(f)["images"]


def test_dpmpp_2m_and_time_spacing_reach_the_sampler(stage_dirs, tmp_path):
  _, dirs = stage_dirs
  fast = _sample(dirs, tmp_path / "fast", "--sampler=dpmpp_2m", "--time_spacing=uniform_log_snr")
  settings = fast[0]["settings"]
  assert {s["sampler"] for s in settings.values()} == {"dpmpp_2m"}
  assert {s["time_spacing"] for s in settings.values()} == {"uniform_log_snr"}
  ddim = _sample(dirs, tmp_path / "ddim")
  a = np.asarray(Image.open(tmp_path / "fast" / fast[0]["file"]), np.int32)
  b = np.asarray(Image.open(tmp_path / "ddim" / ddim[0]["file"]), np.int32)
  assert a.shape == b.shape == (32, 32, 3)
  assert np.abs(a - b).max() > 0  # another solver, another trajectory: the flag was not ignored


def test_bad_sampler_names_are_one_line(stage_dirs, tmp_path, capsys):
  _, dirs = stage_dirs
  base = ["sample", f"--stage_dirs={','.join(dirs)}", "--prompt=x", f"--out={tmp_path / 's'}"]
  cli_helpers.user_error(capsys, [*base, "--sampler=euler"], "sampler")
  cli_helpers.user_error(capsys, [*base, "--time_spacing=karras"], "time_spacing")
  assert not os.path.exists(tmp_path / "s")

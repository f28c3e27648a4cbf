"""benchmarks/peer_sampling.py as a new user runs it (without imagen-pytorch), and its FLOP rule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "peer_sampling.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import peer_sampling  # noqa: E402


@pytest.mark.slow
def test_runs_from_outside_the_repo_without_the_peer(tmp_path):
  """Exit 0, the skip line, and peer.md/peer.json with our numbers finite and positive."""
  out = tmp_path / "tmp"
  cmd = [
    sys.executable,
    SCRIPT,
    f"--peer_python={sys.executable}",  # our venv: no imagen_pytorch
    f"--out_dir={out}",
    "--rounds=1",
    "--steps=4",
    "--train_batch=1",
    "--train_steps=1",
    "--sample_batch=1",
    "--image_size=8",
    "--width=32",
    "--head_dim=32",
    "--res_blocks=1",
    "--text_dim=32",
    "--text_len=4",
  ]
  proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert peer_sampling.SKIP_LINE in proc.stdout
  res = json.loads((out / "peer.json").read_text())
  md = (out / "peer.md").read_text()
  assert "ours / peer" in md and peer_sampling.SKIP_LINE in md
  assert not res["peer_available"]
  ours = res["summary"]["ours"]
  for key in ("params", "gflop_per_image", "train_images_per_s", "sample_s_per_image"):
    assert math.isfinite(ours[key]) and ours[key] > 0, (key, ours[key])
  fast = res["summary"]["ours_dpmpp_2m"]
  assert fast["steps"] == 1 and fast["sample_s_per_image"] > 0
  assert [r["framework"] for r in res["rounds"][0]] == ["ours", "ours", "ours"]

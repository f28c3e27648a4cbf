"""Smoke tests of benchmarks/run.py: the quick run writes well-formed tables (no timing asserts)."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

_RUN = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py"
)


def _load_script(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load_run():
  return _load_script(_RUN, "bench_run")


def _positive(x) -> bool:
  return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_markdown_and_json(tmp_path):
  run = _load_run()
  rc = run.main(
    [
      "--quick",
      "--sections=train,memory,sampling",
      "--num_devices=1",
      f"--out_dir={tmp_path}",
      "--name=smoke",
    ]
  )
  assert rc == 0
  res = json.loads((tmp_path / "smoke.json").read_text())
  md = (tmp_path / "smoke.md").read_text()

  env = res["environment"]
  assert env["num_devices"] >= 1 and env["jax"] and env["date_utc"].startswith("20")
  assert len(env["loadavg_start"]) == 3 and len(env["loadavg_end"]) == 3
  assert res["sections"] == ["train", "memory", "sampling"] and "text" not in res
  assert not [s for s in res["skipped"] if "FAILED" in s], res["skipped"]
  for dtype in ("float32", "bfloat16"):
    assert _positive(res["matmul_peak"][dtype]["flops_per_s"])

  (row,) = res["train"]
  assert row["config"] == "tiny_base" and row["per_device_batch"] == 2 and row["num_devices"] == 1
  assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
  for key in ("compile_s", "images_per_s_per_device", "tflop_per_step", "mfu"):
    assert _positive(row[key]), key
  assert row["params"] > 100_000
  assert row["images_per_s_per_device"] == pytest.approx(2 / row["step_s"])

  (mem,) = res["paper_memory"]
  assert mem["stage"] == "sr1024" and mem["fsdp"] == 128
  # Sharded over 128 devices: at least 1/128 of the unsharded state, far below all of it.
  assert mem["replicated_total_gib"] / 128 <= mem["total_gib"] < mem["replicated_total_gib"] / 32

  assert [r["guidance"] for r in res["sampling"]] == [1.0, 5.0]
  for r in res["sampling"]:
    assert r["steps"] == 256 // 16 and r["s_per_image_min"] <= r["s_per_image"]
    assert _positive(r["s_per_image"])

  for header in (
    "# imagen_jax benchmarks",
    "## Training step",
    "## Paper-scale state memory",
    "## Sampling",
    "MFU %",
    "load average",
  ):
    assert header in md, header
  table = [line for line in md.splitlines() if line.startswith("| tiny_base")]
  assert len(table) == 1 and table[0].count("|") == 16


def test_paper_state_memory_matches_closed_form():
  run = _load_run()
  one, four = run.paper_state_memory("tiny_sr", "adam", (1, 4))
  n = one["params"]
  # Unsharded f32 parameters: exactly 4 bytes each; EMA is a copy.
  assert one["params_gib"] * run.GIB == 4 * n and one["ema_gib"] == one["params_gib"]
  # Adam keeps two f32 moments per parameter (plus scalar counts).
  assert one["opt_state_gib"] == pytest.approx(2 * one["params_gib"], rel=1e-3)
  assert one["total_gib"] == pytest.approx(one["replicated_total_gib"])
  # FSDP over 4 devices: each holds at least a quarter, and less than all of it.
  assert one["total_gib"] / 4 <= four["total_gib"] < one["total_gib"]


def test_bad_sections_are_rejected():
  run = _load_run()
  with pytest.raises(SystemExit):
    run.parse_args(["--sections=train,bogus"])


def test_step_profile_attributes_the_traced_ops_to_layers_and_passes(tmp_path):
  """benchmarks/step_profile.py on the tiny base recipe (a real compile, trace and xplane
  parse): attention and res-block layers show up in both passes, the slowest fusions are
  listed, and op names map to (layer, pass)."""
  out = tmp_path / "profile.md"
  script = os.path.join(os.path.dirname(_RUN), "step_profile.py")
  cmd = [sys.executable, script, "--gin_file=configs/stages/tiny_base.gin", "--batch_size=2"]
  # Every layer is listed: which ones make a top-15 cut depends on two steps' timing noise.
  subprocess.run(
    [*cmd, "--steps=2", "--layers=1000", f"--out={out}"], check=True, cwd=tmp_path, timeout=600
  )
  md = out.read_text()
  rows = re.findall(r"^\| (\S+) \| (forward|backward|-) \| ([\d.]+) \|", md, re.M)
  layers = {(layer, which) for layer, which, _ in rows}
  for which in ("forward", "backward"):
    assert any("attn" in layer and w == which for layer, w in layers), md
    assert any("res" in layer and w == which for layer, w in layers), md
  assert "| `" in md.split("slowest fusions")[1]  # the slowest fusions are listed
  step_profile = _load_script(script, "step_profile")
  assert step_profile.layer_and_pass("jit(f)/transpose(jvp(UNet))/up_1_attn_0/dot_general") == (
    "up_1_attn_0",
    "backward",
  )
  assert step_profile.layer_and_pass("jit(f)/jvp(UNet)/down_0_res_0/conv") == (
    "down_0_res_0",
    "forward",
  )


def test_demo_shapes_study_names_a_missing_cascade_in_one_line(tmp_path):
  """benchmarks/demo_shapes_study.py on a directory with no trained demo: one line that names
  the missing stages and the command that makes them, before any model loads."""
  script = os.path.join(os.path.dirname(_RUN), "demo_shapes_study.py")
  cmd = [sys.executable, script, f"--demo_out={tmp_path}"]
  done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  last = done.stderr.strip().splitlines()[-1]
  assert "no trained base16, sr32, sr64" in last and "imagen-jax demo --out=DIR" in last, last
  for variant, problem in (
    ("ddim/64", "expected NAME=SAMPLER/STEPS/GUIDANCE"),
    ("x=ddim/0/8", "--variant='x=ddim/0/8': num_steps=0"),
  ):
    bad = subprocess.run(
      [*cmd, f"--variant={variant}"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "no trained" not in last and problem in last, last

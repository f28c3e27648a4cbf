"""`imagen-jax compile`: deviceless TPU compiles of the training job's own step (libtpu)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import jax
import pytest

from imagen_jax import gin_utils, parallel, tpu_slices
from imagen_jax.cli import compile as compile_cli
from imagen_jax.nn import factory
from imagen_jax.stage import Stage, StageConfig
from imagen_jax.training import program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_DIR = os.path.join(REPO, "configs", "mesh")
POD_PRESETS = sorted(f[: -len(".gin")] for f in os.listdir(MESH_DIR) if not f.startswith("cpu"))
TINY = ["configs/stages/tiny_base.gin", "configs/mesh/cpu.gin"]
# The tiny stage's U-Net cut to one 16 px level with one attention block: a TPU compile of its
# step takes a fraction of the full tiny net's. Its narrowest arrays still have 32 channels.
SMALL_NET = [
  "unet.UNet.channel_mult=(1,)",
  "unet.UNet.attention_resolutions=(16,)",
]


def _args(gin_files, bindings=(), **flags) -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  compile_cli.add_arguments(parser)
  args = parser.parse_args([f"--gin_file={f}" for f in gin_files])
  args.gin_bindings = list(bindings)
  for k, v in flags.items():
    setattr(args, k, v)
  return args


# ------------------------------------------------------------------------------------------------
# The slice table and the presets' meshes on real tori
# ------------------------------------------------------------------------------------------------


def test_slice_table_names_topologies_as_cloud_tpu_does():
  expect = {
    "v4-8": ("v4:2x2x1", 4, 1),
    "v4-128": ("v4:4x4x4", 64, 16),
    "v4-256": ("v4:4x4x8", 128, 32),
    "v5p-64": ("v5p:2x4x4", 32, 8),
    "v5litepod-8": ("v5e:2x4", 8, 1),
    "v5e-256": ("v5e:16x16", 256, 64),
    "v6e-256": ("v6e:16x16", 256, 64),
  }
  for name, (topology, chips, hosts) in expect.items():
    s = tpu_slices.parse_slice(name)
    assert (s.topology, s.chips, s.hosts) == (topology, chips, hosts), name
  assert tpu_slices.parse_slice("v4:2x2x3").name == "v4-24"
  with pytest.raises(ValueError, match="v4:2x2x3"):
    _ = tpu_slices.parse_slice("v4-24").topology  # 12 chips: the shape must be given
  with pytest.raises(ValueError, match="not a known TPU type"):
    tpu_slices.parse_slice("v7-8")


@pytest.mark.parametrize("name", POD_PRESETS)
def test_every_pod_preset_lays_out_on_its_torus(name):
  """Each preset's mesh builds on the devices libtpu describes for its slice (torus coordinates:
  the layout CPU devices cannot check), with the sizes it names."""
  import gin

  gin_utils.parse_gin([f"configs/mesh/{name}.gin"], finalize=False)
  try:
    cfg = gin.get_bindings("parallel.MeshConfig")
  finally:
    gin.clear_config()
  mesh_cfg = parallel.MeshConfig(**cfg)
  devices = parallel.tpu_topology_devices(
    tpu_slices.parse_slice(mesh_cfg.topology), mesh_cfg.num_slices
  )
  mesh = mesh_cfg.build(devices)
  assert tuple(mesh.shape.values()) == tuple(mesh_cfg.resolved_sizes(len(devices)))
  if mesh_cfg.num_slices > 1:
    # The data axis spans slices; each fsdp × model group stays inside one slice.
    for row in mesh.devices.reshape(mesh.shape["data"], -1):
      assert len({d.slice_index for d in row}) == 1
    assert len({d.slice_index for d in mesh.devices.flat}) == mesh_cfg.num_slices


def test_mesh_that_cannot_use_the_torus_names_the_fix():
  devices = parallel.tpu_topology_devices(tpu_slices.parse_slice("v4-128"))
  with pytest.raises(ValueError, match="product of whole torus dimensions.*data=4, fsdp=16"):
    parallel.MeshConfig(8, 8, 1).build(devices)
  split = parallel.MeshConfig(8, 8, 1, allow_split_physical_axes=True).build(devices)
  assert dict(split.shape) == {"data": 8, "fsdp": 8, "model": 1}


def test_preset_on_the_wrong_slice_fails_before_compiling(capsys):
  # A training job: the v4-128 preset on this machine's 8 CPU devices.
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=r"is for 1 × v4-128 \(64 devices\).*8 cpu devices"):
    parallel.MeshConfig(4, 16, 1, topology="v4-128").build()
  # The compile command: a 64-device preset asked to compile for a 128-chip slice.
  args = _args(["configs/stages/tiny_base.gin", "configs/mesh/v4-128.gin"], topology="v4-256")
  status = compile_cli.run(args)
  elapsed = time.perf_counter() - t0
  err = capsys.readouterr().err
  assert status == 2
  assert err.count("\n") == 1 and "needs 64 devices but 128 are available" in err
  assert elapsed < 1.0, elapsed


# ------------------------------------------------------------------------------------------------
# Optimizer-state shardings mirror the parameters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "adafactor"])
def test_optimizer_state_shardings_mirror_parameter_shardings(name):
  from imagen_jax import optim

  stage = Stage(factory.build_network("tiny_base"), StageConfig(name="t", resolution=16))
  mesh = parallel.create_mesh(data=2, fsdp=4)
  tx, lr = optim.make_optimizer(name, warmup_steps=1, decay_steps=10)
  built = program.build_train_program(stage, (tx, lr), mesh, program.StepSettings(8, 8, 64))
  params = built.abstract_state.params
  param_sh = built.state_shardings.params
  opt_leaves = jax.tree.leaves(built.abstract_state.opt_state)
  sharded = [x for x in opt_leaves if x.sharding.spec != jax.sharding.PartitionSpec()]
  assert sharded, "no optimizer state is sharded"
  by_shape = {}
  for p, sh in zip(jax.tree.leaves(params), jax.tree.leaves(param_sh)):
    by_shape.setdefault(p.shape, set()).add(sh.spec)
  for leaf in sharded:  # every sharded moment has a parameter of its shape sharded like it
    assert leaf.sharding.spec in by_shape[leaf.shape]
  if name == "adam":  # mu and nu: two full copies of the parameter layout
    assert len(sharded) == 2 * sum(s.spec != jax.sharding.PartitionSpec() for s in
                                   jax.tree.leaves(param_sh))  # fmt: skip
  state = built.init_state(jax.random.PRNGKey(0))  # the jitted init honours those shardings
  for leaf, want in zip(jax.tree.leaves(state.opt_state), opt_leaves):
    assert leaf.sharding.spec == want.sharding.spec


# ------------------------------------------------------------------------------------------------
# Compiling for TPU without a TPU
# ------------------------------------------------------------------------------------------------


def test_tiny_stage_on_v4_8_reports_what_the_cpu_compile_reports(tmp_path, capsys):
  """The same step on 4 TPU v4 chips and on 4 CPU devices (same per-device batch). The arguments
  are the same arrays, but TPU layouts tile the minor dimension to 128 lanes: this network's
  narrowest arrays have 32 channels, so TPU bytes are between 1× and 4× the CPU's. The FLOPs
  agree within 1.5× (both count the same convolutions and matmuls; fusion changes the rest)."""
  out = tmp_path / "tpu.json"
  status = compile_cli.run(_args(TINY, SMALL_NET, topology="v4-8", json_out=str(out)))
  text = capsys.readouterr().out
  assert status == 0
  tpu = json.loads(out.read_text())[0]
  assert tpu["target"] == "v4-8" and tpu["chips"] == 4 and tpu["mesh"]["data"] == 4
  assert tpu["fits"] is True and "fits:" in text and "GiB of 32 GiB per chip" in text
  assert tpu["hbm_bytes"] == 32 * 2**30 and "compiled under 28.80 GiB" in text
  assert tpu["roofline_s"] > 0 and tpu["images_per_s_per_chip"] > 0
  cpu_out = tmp_path / "cpu.json"
  bindings = [*SMALL_NET, "parallel.MeshConfig.max_devices = 4"]
  assert compile_cli.run(_args(TINY, bindings, json_out=str(cpu_out))) == 0
  cpu = json.loads(cpu_out.read_text())[0]
  assert cpu["fits"] is None and cpu["per_device_batch"] == tpu["per_device_batch"]
  assert cpu["params"] == tpu["params"]
  padding = tpu["costs"]["argument_bytes"] / cpu["costs"]["argument_bytes"]
  assert 1.0 <= padding <= 4.0, padding
  ratio = tpu["costs"]["flops"] / cpu["costs"]["flops"]
  assert 1 / 1.5 < ratio < 1.5, ratio
  # The model's FLOPs come from the same jaxpr on both, and XLA's count is near them.
  assert tpu["costs"]["model_flops"] == cpu["costs"]["model_flops"] > 0
  assert tpu["flops"] == tpu["costs"]["model_flops"] and "TFLOP of convs and matmuls" in text
  assert 1 / 1.5 < tpu["costs"]["flops"] / tpu["costs"]["model_flops"] < 1.5


def test_multi_slice_subslice_keeps_the_cross_slice_all_reduce(tmp_path):
  """2 × v5p-128 with --subslice compiles one 16-chip sub-slice per slice (data=2): libtpu
  partitions the program per slice (16 partitions) and sends the gradient sum between slices
  as megascale (DCN) transfers, which a single-slice program has none of."""
  out, hlo = tmp_path / "r.json", tmp_path / "step.hlo"
  args = _args(
    ["configs/stages/tiny_base.gin", "configs/mesh/2x-v5p-128.gin"],
    SMALL_NET,
    subslice=True,
    json_out=str(out),
    hlo_out=str(hlo),
  )
  assert compile_cli.run(args) == 0
  report = json.loads(out.read_text())[0]
  assert report["target"] == "2 × v5p-128" and report["compiled_on"] == "2 × v5p-32"
  assert report["chips"] == 128 and report["mesh"] == {"data": 8, "fsdp": 16, "model": 1}
  assert report["global_batch"] == 2048 and report["per_device_batch"] == 16
  # XLA's figures for it are not those of the same work on one slice; the report says so.
  assert any(n.startswith("a multi-slice program's memory") for n in report["notes"])
  text = hlo.read_text()
  assert "num_partitions=16" in text
  assert text.count("megascale_reduce_operation") > 0


def test_headroom_is_the_limit_the_tpu_compiler_must_meet(capsys):
  """The compiler rematerialises until a program fits its HBM limit, so headroom is checked by
  lowering that limit: (1 - headroom) × HBM, whole MiB. The small step at its batch of 16 needs
  more than 16 MiB per chip, and compiles at --headroom=0.1 (the test above); at
  --headroom=0.9995 the compiler is held to 16 MiB and refuses it itself."""
  from imagen_jax import aot

  assert aot.hbm_limit_bytes(32 * 2**30, 0.10) == 29491 * 2**20  # 28.8 GiB
  assert aot.hbm_limit_bytes(32 * 2**30, 0.9995) == 16 * 2**20
  status = compile_cli.run(_args(TINY, SMALL_NET, topology="v4-8", headroom=0.9995))
  err = capsys.readouterr().err
  assert status == 1 and err.count("\n") == 1, err
  assert "does not fit in 0.02 GiB per chip (32 GiB HBM less 99.95% headroom" in err, err
  # libtpu's own words, parsed: its limit is the one we set.
  assert re.search(r"the TPU compiler needs [\d.]+M.* and 16.00M of HBM is available", err), err


def test_per_device_batch_too_large_for_the_chip_does_not_fit(tmp_path):
  """65,536 images per v4 chip: far beyond 32 GiB. The command says so in one line, with the
  fix, and exits 1 (a config error would be 2)."""
  cmd = [
    sys.executable,
    "-m",
    "imagen_jax.cli",
    "compile",
    *[f"--gin_file={f}" for f in TINY],
    "--topology=v4-8",
    "--gin.train.train.batch_size=262144",
    *[f"--gin.{b}" for b in SMALL_NET],
  ]
  r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [x for x in r.stderr.strip().splitlines() if x.startswith("imagen-jax")]
  assert len(lines) == 1 and "Traceback" not in r.stderr
  # The TPU compiler refuses it itself ("CompileTimeHbmOom"), naming the bytes it needs.
  assert re.search(
    r"does not fit in 28.80 GiB per chip .*: the TPU compiler needs [\d.]+G for HLO temporaries",
    lines[0],
  )
  assert "num_microbatches=2" in lines[0]


def test_compile_without_libtpu_says_how_to_install(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
  )
  with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
    parallel.tpu_topology_devices(tpu_slices.parse_slice("v4-8"))


def test_sample_compiles_the_sampling_loop_at_full_resolution(tmp_path):
  """--sample lowers Stage.sample (the loop users run) for SR stages from the previous stage's
  resolution: tiny_sr is trained at 32 px from 16 px and samples 32 px here."""
  out = tmp_path / "r.json"
  args = _args(
    ["configs/stages/tiny_sr.gin", "configs/mesh/cpu.gin"],
    ["parallel.MeshConfig.max_devices = 2"],
    sample=True,
    sample_steps=4,
    json_out=str(out),
  )
  assert compile_cli.run(args) == 0
  train_report, sample_report = json.loads(out.read_text())
  assert sample_report["program"].startswith("sample (32 px, DDIM, guidance 3)")
  assert sample_report["loop_steps"] == 4 and sample_report["per_device_batch"] == 1
  # One guided denoising step runs the network on [cond; uncond] (2 images per device) without
  # a backward pass: far fewer FLOPs than a training step on 8 images per device.
  assert 0 < sample_report["costs"]["flops"] < train_report["costs"]["flops"] / 4
  # Counted per denoising step from the loop's jaxpr: 1/4 of the 4-step scan's.
  assert 0 < sample_report["costs"]["model_flops"] < train_report["costs"]["model_flops"] / 4


def test_report_roofline_and_compiler_estimate_rules():
  """Closed forms: step >= max(F / peak, B / bandwidth); XLA's optimal_seconds is used only when
  positive and not faster than that bound (it has come back negative for big steps)."""
  from imagen_jax import aot

  v4 = tpu_slices.GENERATIONS["v4"]
  costs = dict(
    argument_bytes=2 * 2**30, output_bytes=2 * 2**30, alias_bytes=2 * 2**30, temp_bytes=25 * 2**30,
    code_bytes=0, total_bytes=27 * 2**30, flops=275e12, bytes_accessed=2.4e12,
    optimal_seconds=-814.7,
  )  # fmt: skip
  report = aot.CompileReport(
    "train_step", "s", "v4-8", "v4-8", 4, 1, {"data": 4}, 64, 16, 1, 10, costs, 1.0, 0, "", v4
  )
  assert report.compute_s == pytest.approx(1.0) and report.memory_s == pytest.approx(2.0)
  assert report.roofline_s == pytest.approx(2.0) and report.compiler_estimate_s is None
  assert report.images_per_s_per_chip == pytest.approx(8.0)
  assert report.mfu_bound == pytest.approx(0.5)
  assert report.fits is True and "fits: 27.00 GiB of 32 GiB" in report.verdict()
  costs["optimal_seconds"] = 3.0  # plausible: slower than the roofline
  assert report.step_s == pytest.approx(3.0)
  costs["total_bytes"] = 29 * 2**30  # 29 > 0.9 × 32 = 28.8 GiB
  assert report.fits is False and "does not fit: 29.00 GiB of 32 GiB" in report.verdict()


def test_microbatches_are_strided_and_stay_on_every_device():
  """Each example lands in exactly one microbatch, and a batch sharded over 8 devices splits
  into microbatches that are still sharded over all 8 with no data movement (no collective in
  the compiled split)."""
  import numpy as np

  batch = {"x": np.arange(32 * 3, dtype=np.float32).reshape(32, 3)}
  micro = program.split_microbatches(batch, 4)["x"]
  assert micro.shape == (4, 8, 3)
  rows = micro[..., 0] // 3
  assert sorted(rows.ravel().tolist()) == list(range(32))
  assert rows[1].tolist() == [1, 5, 9, 13, 17, 21, 25, 29]  # microbatch i: rows i, i+4, ...
  mesh = parallel.create_mesh(data=2, fsdp=4)
  sharding = parallel.batch_sharding(mesh, 2)
  x = jax.device_put(batch["x"], sharding)
  split = jax.jit(lambda b: program.split_microbatches(b, 4))
  compiled = split.lower({"x": x}).compile()
  out_spec = compiled.output_shardings["x"].spec
  assert tuple(out_spec)[:2] == (None, parallel.BATCH_AXES)
  hlo = compiled.as_text()
  for collective in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
    assert collective not in hlo, collective


def test_hlo_summary_counts_convolutions_and_collectives():
  """tools/hlo_summary.py on a compiled sharded convolution: the FSDP-style kernel all-gather,
  the loss all-reduce and the one convolution are all found."""
  import importlib.util

  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  spec = importlib.util.spec_from_file_location("hlo_summary", f"{REPO}/tools/hlo_summary.py")
  hlo_summary = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(hlo_summary)
  mesh = parallel.create_mesh(data=4, devices=jax.devices()[:4])
  x = jax.device_put(np.ones((8, 16, 16, 8), np.float32), NamedSharding(mesh, P("data")))
  w = jax.device_put(np.ones((3, 3, 8, 8), np.float32), NamedSharding(mesh, P(None, None, "data")))

  def f(x, w):
    y = jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(y**2)

  text = hlo_summary.summarise(jax.jit(f).lower(x, w).compile().as_text(), top=5)
  assert re.search(r"^\s+1\s+convolution f32$", text, re.M), text
  assert re.search(r"^\s+\d+\s+all-gather\s", text, re.M), text
  assert re.search(r"^\s+\d+\s+all-reduce\s", text, re.M), text
  assert hlo_summary.array_bytes("(bf16[2,3]{1,0}, f32[4]{0})") == 2 * 6 + 4 * 4
  # A long tuple (a combined gradient all-reduce) marks its 6th element "/*index=5*/".
  six = ", ".join(["f32[4]{0}"] * 5 + ["/*index=5*/f32[4]{0}"])
  line = f"  %all-reduce.1 = ({six}) all-reduce(%a), replica_groups={{}}, to_apply=%add"
  assert re.search(r"^\s+1\s+all-reduce\s+0\.00 GiB", hlo_summary.summarise(line, 5), re.M)
  # HBM writes: a fusion's inner f32 values stay on chip; its bf16[4,8] result (64 B) and the
  # entry's f32[4,8] convert (128 B) are written; parameters, tuples and bitcasts are not.
  hlo = """
%fused_computation (param_0: f32[4,8]) -> bf16[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %m = f32[4,8]{1,0} multiply(%param_0, %param_0)
  ROOT %c = bf16[4,8]{1,0} convert(%m)
}

ENTRY %main (p: f32[4,8]) -> (bf16[4,8], f32[4,8]) {
  %p = f32[4,8]{1,0} parameter(0)
  %f = bf16[4,8]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation
  %b = bf16[32]{0} bitcast(%f)
  %g = f32[4,8]{1,0} convert(%f)
  ROOT %t = (bf16[4,8]{1,0}, f32[4,8]{1,0}) tuple(%f, %g)
}
"""
  text = hlo_summary.summarise(hlo, top=5)
  assert re.search(r"^\s+0\.000 GiB\s+f32 \(67%\)$", text, re.M), text  # 128 of 192 B
  assert re.search(r"^\s+0\.000 GiB\s+bf16 \(33%\)$", text, re.M), text

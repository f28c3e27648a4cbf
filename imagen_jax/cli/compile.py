"""`imagen-jax compile`: compile a stage's train step for a TPU slice without the slice.

  imagen-jax compile --gin_file=configs/stages/base64.gin --gin_file=configs/mesh/v4-256.gin
  imagen-jax compile --gin_file=configs/stages/tiny_base.gin --gin_file=configs/mesh/cpu.gin \
      --topology=v4-8

The step is the training job's own (`training.program.build_train_program`, fed from the same
`train.train` gin bindings), lowered on abstract inputs that carry their shardings and compiled
by libtpu for the topology the preset names (or `--topology`): nothing is allocated or run.
The report gives per-chip memory against HBM, FLOPs, a roofline step time, images/s and an MFU
bound; the exit status is 0 when the program fits with the required headroom, 1 when it does
not, 2 for a bad config (reported before compiling). A TPU program is compiled under an HBM
limit of (1 - headroom) x the chip's HBM: the compiler rematerialises until a program meets its
limit, so only a lowered limit shows headroom.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

from imagen_jax import gin_utils, tpu_slices


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of the `compile` subcommand."""
  gin_utils.add_gin_arguments(parser)
  parser.add_argument(
    "--topology",
    default=None,
    help=f"slice to compile for: {tpu_slices.SLICE_FORMS}. Default: the preset's own "
    "(parallel.MeshConfig.topology); without either, the local devices",
  )
  parser.add_argument(
    "--subslice",
    action="store_true",
    help="compile the data=1 sub-slice (fsdp × model chips; one per slice for a multi-slice "
    "preset) at the same per-device batch: the per-chip memory and FLOPs of the full slice, at "
    "a fraction of the host memory",
  )
  parser.add_argument(
    "--sample",
    action="store_true",
    help="also compile the stage's sampling loop at its full resolution (SR-1024 at 1024 px)",
  )
  parser.add_argument(
    "--sample_batch", type=int, default=None, help="images per sampling call (default: 1/device)"
  )
  parser.add_argument("--sample_steps", type=int, default=256, help="sampler steps (default 256)")
  parser.add_argument(
    "--sample_guidance",
    type=float,
    default=3.0,
    help="guidance weight compiled for (any value but 1 doubles the network batch; default 3)",
  )
  parser.add_argument(
    "--headroom",
    type=float,
    default=0.10,
    help="HBM fraction that must stay free: a TPU program is compiled under (1 - headroom) x "
    "HBM per chip, so the compiler cannot spend it on rematerialisation (default 0.10)",
  )
  parser.add_argument("--json_out", default=None, help="also write the report(s) as JSON here")
  parser.add_argument("--hlo_out", default=None, help="write the compiled train step's HLO here")
  parser.epilog = (
    "Example: imagen-jax compile --gin_file=configs/stages/sr256.gin "
    "--gin_file=configs/mesh/v4-128.gin"
  )


def _quiet_deviceless_env() -> None:
  # The CPU stays JAX's default backend (the TPU is only a compile target), and libtpu skips
  # probing for TPU hardware and workers it would not find.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # libtpu's lock file guards the chips; a deviceless compile opens none, so several may run.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Measured with benchmarks/tpu_aot.py (SR-256 at 16 per device, fsdp=16 in each slice): the
# 2 x v5p-128 program reports 7.63 GiB and XLA counts 24.1 TFLOP per chip, the same per-chip work
# on one v5p-256 29.48 GiB and 6.5 TFLOP (the model's FLOPs are the same for both); the compiler
# also holds the multi-slice one to a limit the single-slice one exceeds (tiny stage, 130 MiB).
# Its memory figures are its own, not a sizing.
MULTI_SLICE_NOTE = (
  "a multi-slice program's memory and XLA FLOP count differ from those of the same per-chip "
  "work on one slice (SR-256: 7.63 vs 29.48 GiB, 24.1 vs 6.5 XLA TFLOP per chip; the model "
  "FLOPs are equal): check the one-slice preset with the same per-device batch and mesh inside "
  "a slice too (for 2 × v5p-128: v5p-256)"
)


@dataclasses.dataclass
class Target:
  """Where the program is compiled: a TPU slice (possibly a sub-slice of the named one)."""

  name: str
  tpu: tpu_slices.TpuSlice | None
  num_slices: int
  compiled_on: tpu_slices.TpuSlice | None
  notes: list[str]


def _train_bindings() -> dict[str, Any]:
  import gin

  from imagen_jax import train

  bindings = gin.get_bindings(train.train)
  for required in ("stage", "network", "batch_size"):
    if required not in bindings:
      raise ValueError(
        f"the gin files bind no train.train.{required}; pass a stage recipe first, e.g. "
        "--gin_file=configs/stages/base64.gin"
      )
  return bindings


def _mesh_config(bindings: dict[str, Any], topology: str | None):
  from imagen_jax import parallel

  mesh = bindings.get("mesh")
  if mesh is None:
    mesh = parallel.MeshConfig()
  if not isinstance(mesh, parallel.MeshConfig):
    raise ValueError(
      "train.train.mesh must be a preset (@parallel.MeshConfig(), as configs/mesh/*.gin bind) "
      "for a compile without devices"
    )
  if topology is not None:
    mesh = dataclasses.replace(mesh, topology=tpu_slices.parse_slice(topology).name)
  return mesh


def _target(mesh_cfg, subslice: bool) -> tuple[Target, Any]:
  """The target and the mesh config compiled (the data=1 sub-slice with --subslice; for a
  multi-slice preset, one such sub-slice per slice)."""
  if mesh_cfg.topology is None:
    if subslice:
      raise ValueError("--subslice needs a TPU topology (--topology or the preset's own)")
    return Target("local devices", None, 1, None, []), mesh_cfg
  tpu = tpu_slices.parse_slice(mesh_cfg.topology)
  name = tpu.name if mesh_cfg.num_slices == 1 else f"{mesh_cfg.num_slices} × {tpu.name}"
  sizes = mesh_cfg.resolved_sizes(tpu.devices * mesh_cfg.num_slices)
  notes = [MULTI_SLICE_NOTE] if mesh_cfg.num_slices > 1 else []
  if not subslice:
    return Target(name, tpu, mesh_cfg.num_slices, tpu, notes), mesh_cfg
  chips = sizes[1] * sizes[2]
  sub = tpu_slices.slice_with_chips(tpu.generation, chips)
  if mesh_cfg.num_slices == 1:
    note = (
      f"compiled on the data=1 sub-slice {sub.name} ({chips} chips: fsdp={sizes[1]} × "
      f"model={sizes[2]}) at the full slice's per-device batch; per-chip memory and FLOPs are "
      f"the full slice's, its data-axis gradient all-reduce is not in the program"
    )
  else:
    # One data replica per slice keeps the cross-slice (DCN) gradient all-reduce in the program.
    note = (
      f"compiled on {mesh_cfg.num_slices} × the sub-slice {sub.name} ({chips} chips each: "
      f"data={mesh_cfg.num_slices} × fsdp={sizes[1]} × model={sizes[2]}) at the full slices' "
      f"per-device batch; per-chip memory and FLOPs are the full slices', the gradient "
      f"all-reduce across slices is in the program, the one inside each slice is not"
    )
  sub_cfg = dataclasses.replace(mesh_cfg, data=mesh_cfg.num_slices, topology=sub.name)
  return Target(name, tpu, mesh_cfg.num_slices, sub, [note, *notes]), sub_cfg


def _build_mesh(target: Target, mesh_cfg):
  from imagen_jax import parallel

  if target.compiled_on is None:
    return mesh_cfg.build()
  devices = parallel.tpu_topology_devices(target.compiled_on, mesh_cfg.num_slices)
  return mesh_cfg.build(devices)


def compile_train_step(args: argparse.Namespace) -> tuple[Any, Any]:
  """Parses the config, validates it (fast), lowers and compiles the step; returns reports."""
  import jax

  from imagen_jax import aot, parallel, train
  from imagen_jax.stage import Stage
  from imagen_jax.training import program as train_program

  gin_utils.parse_gin(args.gin_file, args.gin_bindings)
  bindings = _train_bindings()
  full_cfg = _mesh_config(bindings, args.topology)
  target, mesh_cfg = _target(full_cfg, args.subslice)
  if target.tpu:
    full_devices = target.tpu.devices * target.num_slices
  else:
    full_devices = len(jax.devices()[: full_cfg.max_devices])
  full_sizes = full_cfg.resolved_sizes(full_devices)
  settings = train.step_settings(**bindings)
  hosts = target.tpu.hosts * target.num_slices if target.tpu else jax.process_count()
  # The full slice's layout, checked before any device is made: a sub-slice keeps its
  # per-replica batch, so one check covers both.
  train_program.check_batch_layout(
    settings.batch_size,
    settings.num_microbatches,
    dict(zip(parallel.MESH_AXES, full_sizes)),
    hosts,
  )
  full_dp = full_sizes[0] * full_sizes[1]
  per_device = settings.batch_size // full_dp
  if args.subslice:
    settings = dataclasses.replace(
      settings, batch_size=per_device * full_sizes[1] * full_cfg.num_slices
    )
  mesh = _build_mesh(target, mesh_cfg)
  optimizer = bindings.get("optimizer")
  if optimizer is None:
    from imagen_jax import optim

    optimizer = optim.make_optimizer()
  stage = Stage(bindings["network"], bindings["stage"])
  t0 = time.perf_counter()
  program = train_program.build_train_program(stage, optimizer, mesh, settings)
  compiled = aot.compile_or_explain(
    program.lowered, settings.num_microbatches, *_hbm_limit(target, args.headroom)
  )
  compile_s = time.perf_counter() - t0
  costs = aot.program_costs(compiled)
  costs["model_flops"] = program.model_flops / len(mesh.devices.flat)
  notes = target.notes + _network_notes(stage.network)
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(compiled.as_text())
  report = aot.CompileReport(
    program="train_step",
    stage=stage.config.name,
    target=target.name if target.tpu else f"{len(mesh.devices.flat)} local devices",
    compiled_on=_compiled_on_name(target),
    chips=full_devices,
    hosts=hosts,
    mesh=dict(zip(parallel.MESH_AXES, full_sizes)),
    global_batch=settings.batch_size if not args.subslice else per_device * full_dp,
    per_device_batch=per_device,
    num_microbatches=settings.num_microbatches,
    params=program.num_params(),
    costs=costs,
    compile_s=compile_s,
    peak_host_rss_bytes=aot.peak_host_rss_bytes(),
    fingerprint=program.fingerprint(),
    generation=target.tpu.generation if target.tpu else None,
    headroom=args.headroom,
    notes=notes,
  )
  return report, (program, mesh, target)


def _compiled_on_name(target: Target) -> str:
  if target.compiled_on is None:
    return "local devices"
  prefix = f"{target.num_slices} × " if target.num_slices > 1 else ""
  return prefix + target.compiled_on.name


def _hbm_limit(target: Target, headroom: float) -> tuple[int | None, str]:
  """The per-chip HBM limit a TPU program is compiled under, and its words for a refusal."""
  from imagen_jax import aot

  if target.compiled_on is None:
    return None, ""
  hbm = target.compiled_on.generation.hbm_bytes
  limit = aot.hbm_limit_bytes(hbm, headroom)
  return limit, (
    f" in {limit / 2**30:.2f} GiB per chip ({hbm / 2**30:.0f} GiB HBM less "
    f"{100 * headroom:g}% headroom, --headroom)"
  )


def _network_notes(network) -> list[str]:
  dtype = getattr(network, "dtype", None)
  name = getattr(dtype, "__name__", None) or getattr(dtype, "name", None) or str(dtype)
  return [
    f"network compute dtype {name}, params "
    f"{getattr(network.param_dtype, '__name__', network.param_dtype)}, remat "
    f"{network.remat} ({network.remat_policy})"
  ]


def run(args: argparse.Namespace) -> int:
  """Compiles, prints the report(s), returns 0 when everything fits."""
  _quiet_deviceless_env()
  if not args.gin_file:
    print(
      "imagen-jax compile: error: pass a stage recipe and a mesh preset, e.g. "
      "--gin_file=configs/stages/base64.gin --gin_file=configs/mesh/v4-256.gin",
      file=sys.stderr,
    )
    return 2
  if not 0.0 <= args.headroom < 1.0:
    print(
      f"imagen-jax compile: error: --headroom={args.headroom} must be in [0, 1)", file=sys.stderr
    )
    return 2
  from imagen_jax import aot

  try:
    report, built = compile_train_step(args)
  except aot.DoesNotFit as e:
    print(f"imagen-jax compile: train_step {e}", file=sys.stderr)
    return 1
  except (ValueError, RuntimeError) as e:
    print(f"imagen-jax compile: error: {e}", file=sys.stderr)
    return 2
  reports = [report]
  print(report.to_text(), flush=True)
  if args.sample:
    from imagen_jax import sample_compile

    try:
      sample_report = sample_compile.compile_sampling(report, built, args)
    except aot.DoesNotFit as e:
      print(f"imagen-jax compile: sample {e}", file=sys.stderr)
      return 1
    except ValueError as e:
      print(f"imagen-jax compile: error: {e}", file=sys.stderr)
      return 2
    reports.append(sample_report)
    print(sample_report.to_text(), flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump([r.to_json() for r in reports], f, indent=2)
  bad = [r for r in reports if r.fits is False]
  for r in bad:
    print(f"imagen-jax compile: {r.program} {r.verdict()}", file=sys.stderr)
  return 1 if bad else 0

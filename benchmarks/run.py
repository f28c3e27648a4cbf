"""imagen_jax benchmarks: train-step throughput/MFU/memory, paper-scale memory, sampling, text.

  python benchmarks/run.py [--quick] [--sections=train,memory,sampling,text] [--paper_compile]
      [--out_dir=benchmarks/results] [--name=latest]

Runs unchanged on CPU, GPU or TPU (all local devices, data-parallel mesh). Every timed figure is
the median over `--repeats` calls after warm-up, with min/max; compile time is reported apart.
MFU is achieved FLOP/s (XLA `cost_analysis`) over the device's vendor bf16 peak when
`imagen_jax.perf` knows it, else (CPU) over a matmul peak measured here in the run's dtype.
Writes `<out_dir>/<name>.md` and `.json`; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SECTIONS = ("train", "memory", "sampling", "text")
GIB = 2**30


# ================================================================================================
# Helpers
# ================================================================================================


def _timed(fn, repeats: int, warmup: int = 1) -> dict[str, float]:
  """Median/min/max seconds of `fn()` (which must block) after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def environment() -> dict[str, Any]:
  """Machine, versions, date and load: what a reader needs to trust or discount the numbers."""
  import flax
  import jax
  import jaxlib
  import numpy as np
  import optax

  devices = jax.devices()
  return {
    "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "host": platform.node(),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "loadavg_start": list(os.getloadavg()),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def measure_matmul_peak(n: int, repeats: int) -> dict[str, dict[str, float]]:
  """Achieved FLOP/s of an n x n x n matmul on one device, per dtype (the CPU's usable peak)."""
  import jax
  import jax.numpy as jnp

  out = {}
  for dtype in ("float32", "bfloat16"):
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    t = _timed(lambda f=f, a=a, b=b: jax.block_until_ready(f(a, b)), repeats)
    flops = 2.0 * n**3
    out[dtype] = {"n": n, "flops_per_s": flops / t["median_s"], **t}
  return out


def _random_batch(shapes: dict, seed: int = 0) -> dict:
  import numpy as np

  rng = np.random.default_rng(seed)
  batch = {}
  for k, s in shapes.items():
    if s.dtype == np.bool_:
      batch[k] = np.ones(s.shape, bool)
    else:
      batch[k] = rng.uniform(-1, 1, s.shape).astype(np.float32)
  return batch


# ================================================================================================
# Training step
# ================================================================================================

# name -> (network size, overrides, StageConfig kwargs, optimizer, text length)
TRAIN_CONFIGS: dict[str, tuple[str, dict, dict, str, int]] = {
  "tiny_base": ("tiny_base", {}, dict(name="base", resolution=16), "adafactor", 16),
  "tiny_sr": ("tiny_sr", {}, dict(name="sr", resolution=32, lowres_resolution=16), "adam", 16),
  # The paper base U-Net's layout at 1/8 width and half resolution: fits a CPU step in ~seconds.
  "mid_base": (
    "base64",
    dict(image_size=32, channels=64, emb_dim=256, text_dim=256),
    dict(name="base", resolution=32),
    "adafactor",
    32,
  ),
}


def _stage(config: str, dtype: str, remat: bool):
  from imagen_jax.nn import factory
  from imagen_jax.stage import Stage, StageConfig

  size, overrides, stage_kwargs, opt, text_len = TRAIN_CONFIGS[config]
  net = factory.build_network(size, dtype=dtype, remat=remat, **overrides)
  return Stage(net, StageConfig(**stage_kwargs)), opt, text_len


def bench_train_step(
  config: str,
  dtype: str,
  remat: bool,
  per_device_batch: int,
  repeats: int,
  peaks: dict,
  num_devices: int | None = None,
) -> dict[str, Any]:
  """Compiles one stage's full train step (optimizer + EMA) on a data-parallel mesh and times it.

  Args:
    config: a key of TRAIN_CONFIGS.
    dtype: compute dtype ('float32' or 'bfloat16'); parameters stay float32.
    remat: per-block rematerialisation.
    per_device_batch: examples per device.
    repeats: timed steps after two warm-up steps.
    peaks: {dtype: FLOP/s} measured matmul peaks, used where the device's peak is unknown.
    num_devices: mesh size (default: all local devices).

  Returns:
    A row: step time (median/min/max), images/s per device, TFLOP per step, TFLOP/s per
    device, MFU and its peak, compiled per-device memory, compile time.
  """
  import jax

  from imagen_jax import optim, parallel, perf
  from imagen_jax.data.global_batch import to_global_batch
  from imagen_jax.training import program

  stage, opt, text_len = _stage(config, dtype, remat)
  mesh = parallel.create_mesh(devices=jax.devices()[:num_devices])
  ndev = mesh.devices.size
  global_batch = per_device_batch * ndev
  shapes = stage.dummy_batch(global_batch, text_len, stage.network.text_dim)
  tx, lr = optim.make_optimizer(opt, warmup_steps=10, decay_steps=1000)
  settings = program.StepSettings(global_batch, text_len, stage.network.text_dim)
  t0 = time.perf_counter()
  built = program.build_train_program(stage, (tx, lr), mesh, settings)
  compiled = built.compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state = built.init_state(jax.random.PRNGKey(0))
  init_s = time.perf_counter() - t0
  flops = perf.compiled_flops(compiled)
  mem = perf.compiled_memory(compiled)
  batch = to_global_batch(_random_batch(shapes), mesh)
  key = jax.random.PRNGKey(1)
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], batch, key)
    jax.block_until_ready((holder[0], metrics))

  t = _timed(one_step, repeats, warmup=2)
  device = jax.devices()[0]
  vendor_peak = perf.peak_flops_per_device(device)
  peak = vendor_peak or peaks.get(dtype, {}).get("flops_per_s")
  row = {
    "config": config,
    "dtype": dtype,
    "remat": remat,
    "optimizer": opt,
    "params": sum(x.size for x in jax.tree.leaves(holder[0].params)),
    "resolution": stage.config.train_resolution,
    "per_device_batch": per_device_batch,
    "num_devices": ndev,
    "init_s": init_s,
    "compile_s": compile_s,
    "step_s": t["median_s"],
    "step_s_min": t["min_s"],
    "step_s_max": t["max_s"],
    "images_per_s_per_device": per_device_batch / t["median_s"],
    "tflop_per_step": flops / 1e12 if flops else None,
    "tflops_per_s_per_device": flops / ndev / t["median_s"] / 1e12 if flops else None,
    "peak_tflops": peak / 1e12 if peak else None,
    "peak_source": "vendor bf16" if vendor_peak else f"measured {dtype} matmul",
    "mfu": flops / ndev / t["median_s"] / peak if flops and peak else None,
    "mem_per_device_gib": mem.get("total_bytes", 0) / GIB if mem else None,
    "mem_temp_gib": mem.get("temp_bytes", 0) / GIB if mem else None,
  }
  return row


# ================================================================================================
# Memory
# ================================================================================================

PAPER_STAGES = {"base64": ("adafactor", 256), "sr256": ("adam", 128), "sr1024": ("adam", 128)}


def paper_state_memory(size: str, optimizer: str, fsdp_sizes: tuple[int, ...]) -> list[dict]:
  """Per-device bytes of params + optimizer state + EMA under FSDP, from shapes only.

  Parameters take the mesh layout from their logical axis names (fsdp = N, data = model = 1);
  optimizer-state leaves shaped like a parameter take that parameter's layout (Adam's moments),
  the rest (Adafactor's factored rows/columns, counts) are replicated. Uneven splits are padded
  up, as XLA does.
  """
  import jax
  from flax import linen as nn

  from imagen_jax import optim, parallel
  from imagen_jax.nn import factory

  net = factory.build_network(size)
  args = net.abstract_inputs(1, 8)
  with nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    boxed = jax.eval_shape(net.init, jax.random.key(0), *args)["params"]
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), parallel.LOGICAL_AXIS_RULES)
  params = nn.unbox(boxed)
  tx, _ = optim.make_optimizer(optimizer)
  opt_state = jax.eval_shape(tx.init, params)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  param_leaves = jax.tree.leaves(params)
  spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
  spec_by_shape = {tuple(p.shape): s for p, s in zip(param_leaves, spec_leaves)}

  def shard_bytes(shape, dtype, spec, n):
    sizes = {"data": 1, "fsdp": n, "model": 1}
    total = 1
    for i, dim in enumerate(shape):
      axes = spec[i] if spec is not None and i < len(spec) else None
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      div = math.prod(sizes[a] for a in axes)
      total *= math.ceil(dim / div)
    return total * jax.numpy.dtype(dtype).itemsize

  rows = []
  n_params = sum(p.size for p in param_leaves)
  for n in fsdp_sizes:
    p_bytes = sum(shard_bytes(p.shape, p.dtype, s, n) for p, s in zip(param_leaves, spec_leaves))
    o_bytes = sum(
      shard_bytes(x.shape, x.dtype, spec_by_shape.get(tuple(x.shape)) if x.ndim else None, n)
      for x in jax.tree.leaves(opt_state)
    )
    rows.append(
      {
        "stage": size,
        "optimizer": optimizer,
        "params": n_params,
        "fsdp": n,
        "params_gib": p_bytes / GIB,
        "opt_state_gib": o_bytes / GIB,
        "ema_gib": p_bytes / GIB,
        "total_gib": (2 * p_bytes + o_bytes) / GIB,
        "replicated_total_gib": (
          2 * sum(p.size * p.dtype.itemsize for p in param_leaves)
          + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
        )
        / GIB,
      }
    )
  return rows


def activation_memory(
  size: str, overrides: dict, batches: tuple[int, ...], remat: bool, dtype: str, text_len: int
) -> dict:
  """Compiled gradient-step temporaries at several per-device batches, and the per-example slope.

  Uses `imagen_jax.info.network_info` (forward + backward of the network, compile only).
  """
  from imagen_jax.info import network_info
  from imagen_jax.nn import factory

  net = factory.build_network(size, remat=remat, dtype=dtype, **overrides)
  temps, compile_s, flops = {}, 0.0, None
  for b in batches:
    info = network_info(net, b, text_len)
    temps[b] = info.get("temp_bytes", 0)
    compile_s += info["compile_seconds"]
    flops = info.get("train_flops_per_image")
  lo, hi = min(batches), max(batches)
  slope = (temps[hi] - temps[lo]) / (hi - lo) if hi > lo else temps[lo] / lo
  return {
    "network": size,
    "overrides": {k: v for k, v in overrides.items()},
    "dtype": dtype,
    "remat": remat,
    "temp_gib_by_batch": {str(b): temps[b] / GIB for b in batches},
    "activation_gib_per_example": slope / GIB,
    "grad_tflop_per_image": flops / 1e12 if flops else None,
    "compile_s": compile_s,
  }


# ================================================================================================
# Sampling
# ================================================================================================

# stage -> (network, StageConfig kwargs, paper-like step count). Tiny nets, paper step counts.
SAMPLE_STAGES = {
  "base (tiny, 16px)": ("tiny_base", dict(name="base64", resolution=16), 256),
  "sr (tiny, 16->32)": ("tiny_sr", dict(name="sr256", resolution=32, lowres_resolution=16), 128),
  "sr (tiny, 32->64)": (
    "tiny_sr_crossonly",
    dict(name="sr1024", resolution=64, lowres_resolution=32, train_crop=32, schedule="linear"),
    64,
  ),
}


def bench_sampling(
  label: str, batch: int, step_divisor: int, guidance: float, repeats: int
) -> dict[str, Any]:
  """Seconds per image of one stage's DDIM sampler; the first call's compile reported apart."""
  import jax
  import numpy as np
  from flax import linen as nn

  from imagen_jax.diffusion import samplers
  from imagen_jax.nn import factory
  from imagen_jax.stage import Stage, StageConfig

  size, stage_kwargs, steps = SAMPLE_STAGES[label]
  steps = max(1, steps // step_divisor)
  stage = Stage(factory.build_network(size), StageConfig(**stage_kwargs))
  text_dim = stage.network.text_dim
  shapes = stage.dummy_batch(1, 8, text_dim)
  params = jax.jit(lambda r: nn.unbox(stage.init_params(r, shapes)))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((batch, 8, text_dim)).astype(np.float32)
  mask = np.ones((batch, 8), bool)
  lowres = None
  if stage.config.is_super_resolution:
    lr = stage.config.lowres_resolution
    lowres = rng.uniform(-1, 1, (batch, lr, lr, 3)).astype(np.float32)
  cfg = samplers.SamplerConfig(sampler="ddim", num_steps=steps, guidance_weight=guidance)

  def call():
    jax.block_until_ready(
      stage.sample(params, emb, mask, jax.random.PRNGKey(1), cfg, lowres=lowres)
    )

  t0 = time.perf_counter()
  call()
  first_s = time.perf_counter() - t0
  t = _timed(call, repeats, warmup=0)
  return {
    "stage": label,
    "network": size,
    "steps": steps,
    "guidance": guidance,
    "batch": batch,
    "compile_s": max(0.0, first_s - t["median_s"]),
    "s_per_image": t["median_s"] / batch,
    "s_per_image_min": t["min_s"] / batch,
    "s_per_image_max": t["max_s"] / batch,
    "ms_per_step_per_image": 1e3 * t["median_s"] / batch / steps,
  }


# ================================================================================================
# Report
# ================================================================================================


def _f(x, fmt=".3g"):
  if x is None:
    return "n/a"
  if isinstance(x, bool):
    return "on" if x else "off"
  return format(x, fmt) if isinstance(x, float) else str(x)


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
  """Markdown table: cols are (header, key, format)."""
  lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(_f(r.get(k), f) for _, k, f in cols) + " |")
  return lines


def _section(title: str, rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
  """A '## title' heading, its table and a blank line."""
  return [f"## {title}", "", *_table(rows, cols), ""]


def _spread(r: dict, key: str, fmt: str, scale: float = 1.0) -> str:
  """'median [min, max]' of r[key], r[key_min], r[key_max] (times scale)."""
  return "{} [{}, {}]".format(
    *(format(r[k] * scale, fmt) for k in (key, key + "_min", key + "_max"))
  )


def render_markdown(res: dict) -> str:
  env = res["environment"]
  out = [
    "# imagen_jax benchmarks",
    "",
    f"- date (UTC): {env['date_utc']}; mode: {res['mode']}; sections: {', '.join(res['sections'])}",
    f"- machine: {env['num_devices']} x {env['device_kind']} ({env['backend']}), "
    f"{env['cpu_count']} CPUs, {env['platform']}",
    f"- versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
    f"flax {env['flax']}, optax {env['optax']}, numpy {env['numpy']}",
    f"- load average (1/5/15 min) at start {[round(x, 2) for x in env['loadavg_start']]}, "
    f"at end {[round(x, 2) for x in env['loadavg_end']]}"
    + (
      " — the CPU was shared with other jobs: timings are pessimistic"
      if env["backend"] == "cpu" and env["loadavg_start"][0] > 0.5 * (env["cpu_count"] or 1)
      else ""
    ),
    f"- XLA_FLAGS: `{env['xla_flags'] or '(none)'}`; total run {res['total_s']:.0f} s",
    "- every time is the median over repeats after warm-up, [min, max] beside it; compile apart",
    "",
  ]
  if res.get("matmul_peak"):
    out += ["## Measured matmul peak (one device)", ""]
    for dt, m in res["matmul_peak"].items():
      out.append(
        f"- {dt}: {m['flops_per_s'] / 1e12:.3f} TFLOP/s ({m['n']}^3 matmul, "
        f"median {m['median_s'] * 1e3:.1f} ms [{m['min_s'] * 1e3:.1f}, {m['max_s'] * 1e3:.1f}])"
      )
    out.append("")
  if res.get("train"):
    rows = [
      dict(
        r, step_ms=_spread(r, "step_s", ".1f", 1e3), mfu_pct=100 * r["mfu"] if r["mfu"] else None
      )
      for r in res["train"]
    ]
    out += _section(
      "Training step (full step: loss, grads, optimizer, EMA)",
      rows,
      [
        ("config", "config", ""),
        ("params", "params", ""),
        ("res", "resolution", ""),
        ("dtype", "dtype", ""),
        ("remat", "remat", ""),
        ("batch/dev", "per_device_batch", ""),
        ("compile s", "compile_s", ".1f"),
        ("step ms [min, max]", "step_ms", ""),
        ("img/s/dev", "images_per_s_per_device", ".3g"),
        ("TFLOP/step", "tflop_per_step", ".3g"),
        ("TFLOP/s/dev", "tflops_per_s_per_device", ".3g"),
        ("MFU %", "mfu_pct", ".1f"),
        ("peak TFLOP/s", "peak_tflops", ".3g"),
        ("peak from", "peak_source", ""),
        ("mem/dev GiB", "mem_per_device_gib", ".3g"),
      ],
    )
  if res.get("paper_memory"):
    out += _section(
      "Paper-scale state memory per device (params + optimizer + EMA, f32, FSDP; shapes only)",
      res["paper_memory"],
      [
        ("stage", "stage", ""),
        ("params", "params", ""),
        ("optimizer", "optimizer", ""),
        ("FSDP devices", "fsdp", ""),
        ("params GiB", "params_gib", ".3g"),
        ("opt state GiB", "opt_state_gib", ".3g"),
        ("EMA GiB", "ema_gib", ".3g"),
        ("total GiB/dev", "total_gib", ".3g"),
        ("unsharded GiB", "replicated_total_gib", ".3g"),
      ],
    )
  if res.get("activation_memory"):
    rows = [
      dict(
        r,
        by_batch=", ".join(f"B={b}: {v:.3g}" for b, v in r["temp_gib_by_batch"].items()),
        net=f"{r['network']}{' ' + str(r['overrides']) if r['overrides'] else ''}",
      )
      for r in res["activation_memory"]
    ]
    out += _section(
      "Activation memory per example (compiled forward+backward temporaries)",
      rows,
      [
        ("network", "net", ""),
        ("dtype", "dtype", ""),
        ("remat", "remat", ""),
        ("temp GiB by per-device batch", "by_batch", ""),
        ("GiB / example", "activation_gib_per_example", ".3g"),
        ("grad TFLOP / image", "grad_tflop_per_image", ".3g"),
        ("compile s (all)", "compile_s", ".1f"),
      ],
    )
  if res.get("sampling"):
    rows = [
      dict(
        r,
        spi=_spread(r, "s_per_image", ".3g"),
        guid="on (w={:g}, cond+uncond batched)".format(r["guidance"])
        if r["guidance"] != 1.0
        else "off",
      )
      for r in res["sampling"]
    ]
    out += _section(
      "Sampling (DDIM, f32, tiny networks at the paper-like step counts 256/128/64)",
      rows,
      [
        ("stage", "stage", ""),
        ("steps", "steps", ""),
        ("guidance", "guid", ""),
        ("batch", "batch", ""),
        ("compile s", "compile_s", ".1f"),
        ("s / image [min, max]", "spi", ""),
        ("ms / step / image", "ms_per_step_per_image", ".3g"),
      ],
    )
  if res.get("text"):
    rows = [dict(r, bs=_spread(r, "batch_s", ".3g")) for r in res["text"]]
    out += _section(
      "Text: frozen T5 v1.1 encoder (random weights)",
      rows,
      [
        ("size", "size", ""),
        ("dtype", "dtype", ""),
        ("batch x tokens", "shape", ""),
        ("compile s", "compile_s", ".1f"),
        ("batch s [min, max]", "bs", ""),
        ("captions/s", "captions_per_s", ".3g"),
        ("TFLOP/s", "tflops_per_s", ".3g"),
      ],
    )
  if res.get("skipped"):
    out += ["## Not run", ""] + [f"- {s}" for s in res["skipped"]] + [""]
  return "\n".join(out)


# ================================================================================================
# Main
# ================================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiniest configs, few steps (smoke)")
  parser.add_argument(
    "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
  )
  parser.add_argument(
    "--paper_compile",
    action="store_true",
    help="also compile the paper-size networks' gradient step (slow on CPU: minutes each)",
  )
  parser.add_argument(
    "--repeats", type=int, default=None, help="timed repeats (default 3; quick 2)"
  )
  parser.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--name", default="latest", help="results file stem (e.g. 'h200')")
  parser.add_argument(
    "--num_devices", type=int, default=None, help="train-step mesh size (default: all devices)"
  )
  args = parser.parse_args(argv)
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  bad = [s for s in sections if s not in SECTIONS]
  if bad or not sections:
    parser.error(f"--sections={args.sections!r}: each must be one of {', '.join(SECTIONS)}")
  args.sections = sections
  if args.repeats is None:
    args.repeats = 2 if args.quick else 3
  if args.num_devices is not None and args.num_devices < 1:
    parser.error(f"--num_devices={args.num_devices} must be >= 1")
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats} must be >= 1")
  return args


def _attempt(res: dict, section: str, label: str, fn, *args) -> None:
  """Appends `fn(*args)` to `res[section]`; a failure is recorded (and printed), not fatal."""
  try:
    res[section].append(fn(*args))
  except Exception as e:  # one broken config must not cost the rest of a long run
    import traceback

    traceback.print_exc()
    res["skipped"].append(f"{section} {label}: FAILED {type(e).__name__}: {str(e)[:300]}")


def _log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
  """Runs the selected sections and writes `<out_dir>/<name>.md` and `.json`."""
  args = parse_args(argv)
  import jax

  start = time.perf_counter()
  on_accel = jax.default_backend() != "cpu"
  res: dict[str, Any] = {
    "mode": "quick" if args.quick else "full",
    "sections": args.sections,
    "environment": environment(),
    "skipped": [],
  }
  r = args.repeats
  n = 512 if args.quick else (8192 if on_accel else 1536)
  _log(f"matmul peak n={n}")
  res["matmul_peak"] = measure_matmul_peak(n, r)

  if "train" in args.sections:
    if args.quick:
      plan = [("tiny_base", "float32", False, 2)]
    elif on_accel:
      dtypes = ("float32", "bfloat16")
      plan = [(c, d, m, 8) for c in TRAIN_CONFIGS for d in dtypes for m in (False, True)]
    else:
      # Each CPU compile of a full train step costs ~40 s under load: keep to one axis at a time
      # (dtype, remat, stage) around tiny_base/f32/remat-off, plus the mid size.
      plan = [
        ("tiny_base", "float32", False, 4),
        ("tiny_base", "bfloat16", False, 4),
        ("tiny_base", "float32", True, 4),
        ("tiny_sr", "float32", False, 4),
        ("mid_base", "float32", False, 2),
      ]
      res["skipped"].append(
        "train on CPU: the full dtype x remat grid (every config) runs on accelerators only"
      )
    res["train"] = []
    for config, dtype, remat, bpd in plan:
      _log(f"train {config} {dtype} remat={remat} batch/dev={bpd}")
      _attempt(
        res,
        "train",
        f"{config} {dtype} remat={remat}",
        bench_train_step,
        config,
        dtype,
        remat,
        bpd,
        r,
        res["matmul_peak"],
        args.num_devices,
      )

  if "memory" in args.sections:
    res["paper_memory"] = []
    for size, (opt, chips) in PAPER_STAGES.items():
      _log(f"paper state memory {size}")
      if args.quick and size != "sr1024":
        continue
      res["paper_memory"] += paper_state_memory(size, opt, (chips,) if args.quick else (128, 256))
    res["activation_memory"] = []
    mid = TRAIN_CONFIGS["mid_base"][1]
    if args.quick:
      acts = []
      res["skipped"].append("activation memory: not in quick mode")
    elif on_accel:
      acts = [("tiny_base", {}, (1, 2, 4, 8), m, "bfloat16", 16) for m in (False, True)]
      acts += [("base64", mid, (1, 2, 4, 8), m, "bfloat16", 32) for m in (False, True)]
    else:
      acts = [("tiny_base", {}, (1, 8), m, "float32", 16) for m in (False, True)]
    if args.paper_compile:
      acts += [(s, {}, (1, 2), m, "bfloat16", 128) for s in PAPER_STAGES for m in (False, True)]
    else:
      res["skipped"].append(
        "paper-size compiled FLOPs / activation memory (pass --paper_compile; minutes per "
        "network on CPU)"
      )
    for size, ov, batches, remat, dtype, tl in acts:
      _log(f"activation memory {size} {ov} remat={remat} batches={batches}")
      _attempt(
        res,
        "activation_memory",
        f"{size} remat={remat}",
        activation_memory,
        size,
        ov,
        batches,
        remat,
        dtype,
        tl,
      )

  if "sampling" in args.sections:
    res["sampling"] = []
    labels = list(SAMPLE_STAGES)[:1] if args.quick else list(SAMPLE_STAGES)
    for label in labels:
      for guidance in (1.0, 5.0):
        _log(f"sampling {label} guidance={guidance}")
        _attempt(
          res,
          "sampling",
          f"{label} w={guidance}",
          bench_sampling,
          label,
          8 if on_accel else 2,
          16 if args.quick else 1,
          guidance,
          r,
        )
    if args.quick:
      res["skipped"].append("sampling: quick mode ran 1/16 of the step counts, base stage only")

  if "text" in args.sections:
    import t5_encode

    res["text"] = []
    if args.quick:
      sizes = [("small", 2, 16, "float32")]
    elif on_accel:
      sizes = [("small", 256, 128, "float32,bfloat16"), ("base", 256, 128, "float32,bfloat16")]
    else:
      sizes = [("small", 8, 64, "float32,bfloat16"), ("base", 8, 64, "float32")]
    for size, b, length, dtypes in sizes:
      _log(f"text T5 {size} batch={b} length={length}")
      for row in t5_encode.measure(size, b, length, dtypes, r):
        row["shape"] = f"{b} x {length}"
        res["text"].append(row)

  res["environment"]["loadavg_end"] = list(os.getloadavg())
  res["total_s"] = time.perf_counter() - start
  os.makedirs(args.out_dir, exist_ok=True)
  md = render_markdown(res)
  with open(os.path.join(args.out_dir, f"{args.name}.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(args.out_dir, f"{args.name}.json"), "w") as f:
    json.dump(res, f, indent=1, default=str)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())

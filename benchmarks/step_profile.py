"""Where one stage's CPU train step spends its time: XLA:CPU's own per-op trace, by layer.

  python benchmarks/step_profile.py --gin_file=configs/stages/demo_base16.gin \
      [--batch_size=16] [--steps=5] [--top=12] [--layers=15] [--out=benchmarks/results/step_profile.md]

Compiles the stage's full train step (the gin recipe's network, objective, optimizer and EMA)
on one CPU device, times `--steps` steps, then traces them with `jax.profiler` and XLA:CPU's
per-thunk trace events (`--xla_cpu_enable_xprof_traceme`). Each executed fusion is attributed
to the layer its HLO `op_name` names (e.g. `down_0_attn_0`) and to the forward or the backward
pass (`transpose(jvp(...))` in the name), then summed: the table says which layers and which
pass cost what, and the slowest single fusions with their HLO shapes. This is how the GroupNorm
and attention-gradient costs in README "Benchmarks" were found.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Trace events that are the executor's bookkeeping, not an op.
_NOT_OPS = ("ThunkExecutor", "Await")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", required=True, help="stage recipe(s)")
  parser.add_argument("--batch_size", type=int, default=None, help="default: the recipe's")
  parser.add_argument("--steps", type=int, default=5, help="timed and traced steps")
  parser.add_argument("--top", type=int, default=12, help="rows of the slowest-fusion table")
  parser.add_argument("--layers", type=int, default=15, help="rows of the per-layer table")
  parser.add_argument("--out", default=None, help="markdown report (default: print only)")
  args = parser.parse_args(argv)
  if min(args.steps, args.top, args.layers) < 1:
    parser.error("--steps, --top and --layers must be >= 1")
  return args


def _build(args: argparse.Namespace):
  """(compiled step, state, batch, rng, stage name, batch size) of the recipe on one device."""
  import gin
  import jax

  sys.path.insert(0, HERE)
  import run as bench_run

  from imagen_jax import gin_utils, optim, parallel, train
  from imagen_jax.data.global_batch import to_global_batch
  from imagen_jax.stage import Stage
  from imagen_jax.training import program

  gin_utils.parse_gin([*args.gin_file, "configs/mesh/cpu.gin"], [])
  bindings = gin.get_bindings(train.train)
  if args.batch_size:
    bindings["batch_size"] = args.batch_size
  settings = train.step_settings(**bindings)
  stage = Stage(bindings["network"], bindings["stage"])
  optimizer = bindings.get("optimizer") or optim.make_optimizer()
  mesh = parallel.create_mesh(devices=jax.devices()[:1])
  built = program.build_train_program(stage, optimizer, mesh, settings)
  compiled = built.compile()
  state = built.init_state(jax.random.PRNGKey(0))
  shapes = stage.dummy_batch(settings.batch_size, settings.max_length, settings.text_dim)
  batch = to_global_batch(bench_run._random_batch(shapes), mesh)
  return compiled, state, batch, jax.random.PRNGKey(1), stage.config.name, settings.batch_size


def _trace_events(trace_dir: str) -> collections.Counter:
  """{op name: total picoseconds} over XLA:CPU's worker threads in the trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  totals: collections.Counter = collections.Counter()
  for plane in space.planes:
    names = {k: m.name for k, m in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for event in line.events:
        name = names.get(event.metadata_id, "?")
        if not any(s in name for s in _NOT_OPS):
          totals[name] += event.duration_ps
  return totals


def _op_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{HLO instruction name: (its shape, its op_name)} of the compiled module's instructions."""
  out = {}
  for m in re.finditer(r"\n\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([^\n]*)", hlo_text):
    op_name = re.search(r'op_name="([^"]*)"', m.group(3))
    out.setdefault(m.group(1), (m.group(2), op_name.group(1) if op_name else ""))
  return out


def layer_and_pass(op_name: str) -> tuple[str, str]:
  """('down_0_attn_0', 'backward') from an op_name such as
  'jit(train_step)/transpose(jvp(UNet))/down_0_attn_0/...'; the layer is the first path part
  named like a block, the pass is backward under transpose(...)."""
  parts = op_name.split("/")
  which = "backward" if any(p.startswith("transpose(") for p in parts) else "forward"
  if not op_name:
    return "(no op_name: XLA-made copies and broadcasts)", "-"
  if not any("UNet" in p for p in parts):
    return "outside the network: loss, optimizer, EMA", "-"
  for p in parts:
    if re.match(r"(down|up|mid|middle|final|conditioning|conv_|norm_)", p):
      return re.sub(r"\(.*", "", p), which
  return "other network ops", which


def summarize(totals: collections.Counter, meta: dict, steps: int, top: int) -> dict:
  per_layer: collections.Counter = collections.Counter()
  per_pass: collections.Counter = collections.Counter()
  slowest = []
  for name, ps in totals.most_common():
    shape, op_name = meta.get(name, ("?", ""))
    layer, which = layer_and_pass(op_name)
    ms = ps / 1e9 / steps
    per_layer[(layer, which)] += ms
    per_pass[which] += ms
    if len(slowest) < top:
      slowest.append((name, ms, shape, op_name))
  return {"per_layer": per_layer, "per_pass": per_pass, "slowest": slowest}


def render(name: str, batch: int, step_ms: list[float], summary: dict, layers: int = 15) -> str:
  total = sum(summary["per_pass"].values())
  lines = [
    f"# CPU train-step profile: {name}, batch {batch}",
    "",
    f"- step wall time: median {statistics.median(step_ms):.1f} ms over {len(step_ms)} steps "
    f"(min {min(step_ms):.1f}); op time summed over XLA:CPU's threads: {total:.1f} ms/step",
    "- by pass: "
    + ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in summary["per_pass"].items()),
    "",
    "| layer | pass | ms / step | share |",
    "|---|---|---:|---:|",
  ]
  for (layer, which), ms in summary["per_layer"].most_common(layers):
    lines.append(f"| {layer} | {which} | {ms:.2f} | {100 * ms / total:.1f}% |")
  lines += ["", "| slowest fusions | ms / step | shape | op_name |", "|---|---:|---|---|"]
  for op, ms, shape, op_name in summary["slowest"]:
    lines.append(f"| `{op}` | {ms:.2f} | `{shape}` | `{op_name[-90:]}` |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TRACE_FLAG).strip()
  os.chdir(REPO)
  sys.path.insert(0, REPO)
  import jax

  compiled, state, batch, rng, name, batch_size = _build(args)
  holder = [state]

  def step() -> float:
    t0 = time.perf_counter()
    holder[0], metrics = compiled(holder[0], batch, rng)
    jax.block_until_ready((holder[0], metrics))
    return 1e3 * (time.perf_counter() - t0)

  step(), step()  # warm-up
  step_ms = [step() for _ in range(args.steps)]
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        step()
    totals = _trace_events(trace_dir)
  summary = summarize(totals, _op_metadata(compiled.as_text()), args.steps, args.top)
  report = render(name, batch_size, step_ms, summary, args.layers)
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())

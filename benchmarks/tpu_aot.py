"""Deviceless TPU compiles of every paper stage on every pod preset: fits, GiB/chip, step time.

  python benchmarks/tpu_aot.py [--only=base64:v4-256,sr256:v4-128] [--full] [--timeout_s=1800]
      [--out_dir=benchmarks/results] [--name=tpu_aot] [--hlo_dir=DIR] [--gin.KEY=VALUE ...]
  python benchmarks/tpu_aot.py --render     # rewrite the markdown from the JSON only

Each (stage, preset) pair runs `imagen-jax compile` in its own process (so one compile's host
memory cannot inflate the next's figure, and an OOM-killed compile is recorded, not fatal), on
the preset's data=1 sub-slice unless `--full` (per-chip memory and FLOPs are the full slice's;
host memory is a fraction: the 2B base step for all 128 chips of a v4-256 outgrew 24 GiB).
Results are merged into `<out_dir>/<name>.json` (rerun a pair to refresh it) and the markdown
table `<name>.md` is rewritten from all of them. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base64", "sr256", "sr1024")
# The paper's pairings first (base on v4-256, SR on v4-128), then the other presets.
PRESETS = (
  "v4-256",
  "v4-128",
  "v5p-128",
  "v5p-64",
  "v5p-256",
  "v6e-256",
  "v5litepod-256",
  "2x-v5p-128",
)
PAPER_PAIRS = (("base64", "v4-256"), ("sr256", "v4-128"), ("sr1024", "v4-128"))
GIB = 2**30


def all_pairs() -> list[tuple[str, str]]:
  rest = [(s, p) for p in PRESETS for s in STAGES if (s, p) not in PAPER_PAIRS]
  return list(PAPER_PAIRS) + rest


def run_pair(
  stage: str, preset: str, full: bool, timeout_s: float, extra: list[str], hlo_dir: str | None
) -> dict:
  """One compile in a subprocess; returns its JSON report or a record of how it failed."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    cmd = [
      sys.executable,
      "-m",
      "imagen_jax.cli",
      "compile",
      f"--gin_file=configs/stages/{stage}.gin",
      f"--gin_file=configs/mesh/{preset}.gin",
      f"--json_out={out}",
      *([] if full else ["--subslice"]),
      *([f"--hlo_out={os.path.join(hlo_dir, f'{stage}_{preset}.hlo.txt')}"] if hlo_dir else []),
      *extra,
    ]
    t0 = time.time()
    try:
      r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
      status, stderr = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
      status, stderr = "timeout", (e.stderr or b"").decode(errors="replace")
    record = {
      "stage": stage,
      "preset": preset,
      "full_slice": full,
      "extra": extra,
      "exit_status": status,
      "wall_s": time.time() - t0,
      "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if os.path.exists(out):
      with open(out) as f:
        record["report"] = json.load(f)[0]
    else:
      record["error"] = stderr.strip().splitlines()[-1:] if stderr.strip() else [f"exit {status}"]
      if status == -9:
        record["error"] = ["killed (SIGKILL: host out of memory)"]
    return record


def _key(record: dict) -> str:
  return "|".join([record["stage"], record["preset"], " ".join(record.get("extra", []))])


def _fmt(x, spec: str, none: str = "–") -> str:
  return none if x is None else format(x, spec)


def _limit(rep: dict) -> str:
  """The HBM limit a TPU row was compiled under ('full': a record from before there was one)."""
  if rep["hbm_bytes"] is None:
    return "–"
  return "full" if rep.get("limit_bytes") is None else f"{rep['limit_bytes'] / GIB:.2f}"


def markdown(records: list[dict]) -> str:
  """The table of all records, paper pairings first."""
  order = {pair: i for i, pair in enumerate(all_pairs())}
  records = sorted(records, key=lambda r: (order.get((r["stage"], r["preset"]), 99), _key(r)))
  lines = [
    "# Deviceless TPU compiles: paper stages × pod presets",
    "",
    "`python benchmarks/tpu_aot.py` (each row one `imagen-jax compile` process on this 2-core, "
    "24 GiB CPU machine; libtpu compiles for the topology, nothing runs). Global batch 2048 "
    "(paper), bf16 compute, f32 params/optimizer/EMA, remat off, as the presets set them. "
    "GiB/chip = arguments + outputs − donated aliases + temporaries + code, from "
    "`memory_analysis()`; it must leave ≥ 10% of HBM free, and the compiler must place the "
    "program under that lowered limit (*limit GiB*: 90% of HBM; the compiler rematerialises "
    "until a program meets its limit, so a compile at the full limit, *full* — the rows "
    "measured before the lowered limit existed — always sits near it). *Model TFLOP* = 2 × the "
    "multiply-accumulates of every conv and matmul in the step's jaxpr, per chip (what MFU "
    "is defined by; the same for any microbatch count); *XLA TFLOP* = `cost_analysis()`'s "
    "count, shown for reference only: at paper size it is about a third of the model's even "
    "without a loop (the base U-Net's forward pass is 1.53 TFLOP per 64 px image by the jaxpr, "
    "as a hand count of its 3×3 convs gives), and for the gradient-accumulation loop "
    "(microbatches > 1) and the multi-slice programs it counts the loop body between "
    "once and every iteration). Step time = max(model FLOPs / bf16 peak, bytes accessed / HBM "
    "bandwidth, bytes as `cost_analysis()` counts them), or XLA's `optimal_seconds` where that "
    "is positive and not below the roofline; ICI/DCN collectives are not included, so it is a "
    "lower bound and the MFU figure an upper bound (100%: the bound is the MXU's own, compute "
    "outweighs the HBM traffic). Rows marked *sub* were compiled on "
    "the preset's data=1 sub-slice at the same per-device batch (same per-chip memory and "
    "FLOPs; the data-axis all-reduce is not in that program; for the multi-slice preset, one "
    "such sub-slice per slice, so the all-reduce across slices is).",
    "",
    "| stage | preset | compiled on | fits | GiB/chip | HBM | limit GiB | headroom | "
    "microbatches | model TFLOP/step/chip | XLA TFLOP | est. s/step | est. img/s/chip | est. MFU ≤ | compile s "
    "| host GiB |",
    "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in records:
    rep = r.get("report")
    label = r["preset"] + (f" ({' '.join(r['extra'])})" if r.get("extra") else "")
    if rep is None:
      err = "; ".join(r.get("error", [])).replace("imagen-jax compile: ", "").replace("|", "/")
      verdict = "**no**" if r["exit_status"] == 1 else "**failed**"
      lines.append(f"| {r['stage']} | {label} | – | {verdict}: {err[:200]} |" + " |" * 12)
      continue
    c = rep["costs"]
    on = rep["compiled_on"] + (" *sub*" if not r["full_slice"] else "")
    hbm = rep["hbm_bytes"]
    headroom = None if hbm is None else 1 - c["total_bytes"] / hbm
    lines.append(
      "| "
      + " | ".join(
        [
          r["stage"],
          label,
          on,
          "yes" if rep["fits"] else "**no**",
          f"{c['total_bytes'] / GIB:.2f}",
          _fmt(hbm and hbm / GIB, ".0f"),
          _limit(rep),
          _fmt(headroom and 100 * headroom, ".0f") + "%",
          str(rep["num_microbatches"]),
          _fmt(c.get("model_flops") and c["model_flops"] / 1e12, ".1f"),
          f"{c['flops'] / 1e12:.1f}",
          _fmt(rep["step_s"], ".3f"),
          _fmt(rep["images_per_s_per_chip"], ".1f"),
          _fmt(rep["mfu_bound"] and 100 * rep["mfu_bound"], ".0f") + "%",
          f"{rep['compile_s']:.0f}",
          f"{rep['peak_host_rss_bytes'] / GIB:.1f}",
        ]
      )
      + " |"
    )
  lines.append("")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = [a for a in argv if a.startswith("--gin.")]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="comma-separated stage:preset pairs")
  parser.add_argument("--full", action="store_true", help="compile whole slices, not data=1")
  parser.add_argument("--timeout_s", type=float, default=1800.0)
  parser.add_argument("--out_dir", default=os.path.join(REPO, "benchmarks", "results"))
  parser.add_argument("--name", default="tpu_aot")
  parser.add_argument("--hlo_dir", default=None, help="write each compiled step's HLO here")
  parser.add_argument(
    "--render", action="store_true", help="only rewrite the markdown from the JSON (no compiles)"
  )
  args = parser.parse_args([a for a in argv if not a.startswith("--gin.")])
  pairs = [tuple(p.split(":")) for p in args.only.split(",") if p] or all_pairs()
  path = os.path.join(args.out_dir, f"{args.name}.json")
  records = {}
  if os.path.exists(path):
    with open(path) as f:
      records = {_key(r): r for r in json.load(f)}
  if args.render:
    pairs = []
    with open(os.path.join(args.out_dir, f"{args.name}.md"), "w") as f:
      f.write(markdown(list(records.values())))
  for i, (stage, preset) in enumerate(pairs):
    print(f"[{i + 1}/{len(pairs)}] compiling {stage} on {preset} ...", flush=True)
    record = run_pair(stage, preset, args.full, args.timeout_s, extra, args.hlo_dir)
    rep = record.get("report")
    summary = rep["verdict"] if rep else "; ".join(record["error"])
    print(f"    {summary} ({record['wall_s']:.0f} s)", flush=True)
    records[_key(record)] = record
    os.makedirs(args.out_dir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(list(records.values()), f, indent=1)
    with open(os.path.join(args.out_dir, f"{args.name}.md"), "w") as f:
      f.write(markdown(list(records.values())))
  return 0


if __name__ == "__main__":
  sys.exit(main())

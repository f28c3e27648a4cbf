"""`imagen-jax demo`: the whole system on a laptop, from nothing to a scored sample grid
(the steps: `imagen_jax.demo`)."""

from __future__ import annotations

import argparse
import json
import os
import time

from imagen_jax import demo
from imagen_jax.cli.sample import per_stage_values
from imagen_jax.demo import STAGE_GINS, _log, build_data, demo_prompts
from imagen_jax.utils import job_pool


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of `imagen-jax demo`."""
  a = parser.add_argument
  a("--out", default="demo_out", help="output directory (work files under OUT/work)")
  a("--num_examples", type=int, default=6000, help="shapes training images (64 px)")
  a(
    "--train_steps",
    default="4200,2400,1600",
    help="training steps of base16,sr32,sr64 (about 8.5 min of training in all on 2 idle "
    "CPU cores, two stages at a time). "
    "The SR stages' 2400, 1600 rather than 1200, 800 keep small shapes' corners: shape at "
    "64 px 81.2%% -> 90.6%% (README 'What was tried for the small shapes'). The base's 4200 "
    "rather than 2600: shape at 64 px averaged over four training seeds 86.4%% -> 90.3%% "
    "(README 'Training-seed variance')",
  )
  a(
    "--batch_size",
    default="16",
    help="training batch of base16,sr32,sr64 (one value or three). 16 rather than 32: the same "
    "images per second on 2 CPU cores, twice the updates in the budget",
  )
  a("--num_prompts", type=int, default=64, help="grammar prompts sampled and scored")
  a(
    "--sampler",
    default="ddim",
    help="sampler per stage: ddim, ancestral or dpmpp_2m (one value or three). DDIM at 64,32,32 "
    "scored highest in the README's step-count study; dpmpp_2m at 16,8,8 is within one image "
    "in half the sampling time",
  )
  a("--sample_steps", default="64,32,32", help="sampler steps per stage")
  a(
    "--guidance",
    default="8,1,1",
    help="guidance weight per stage. The base's 8 rather than 5 draws small shapes right at "
    "16 px (84.4%% -> 92.2%%); guidance on the SR stages rounds them off",
  )
  a(
    "--thresholding",
    default="static",
    help="x0 thresholding per stage: none, static or dynamic (one value or three). Static: "
    "shapes images sit at exactly +-1 (white/black backgrounds), where dynamic thresholding's "
    "division by s > 1 dims every pixel at every step",
  )
  a(
    "--concurrent_stages",
    type=int,
    default=min(2, len(os.sched_getaffinity(0))),
    help="stages that train at once, each an `imagen-jax train` process (default: 2, or 1 on "
    "a 1-core machine). The stages are independent; one XLA:CPU process keeps 2 cores ~80%% "
    "busy, two finish sooner",
  )
  a("--seed", type=int, default=0, help="seed of the prompts and samples")
  a("--quick", action="store_true", help="smoke run: 20 steps per stage, 600 images, 16 prompts")
  gin_note = "(stage recipes are configs/stages/demo_*.gin)"
  a("--gin_file", action="append", default=[], help=f"extra gin files for every stage {gin_note}")


def run(args: argparse.Namespace) -> int:
  """Runs the demo; prints timings and the shapes metric table."""
  t_start = time.time()
  if args.quick:
    args.train_steps, args.num_examples = "20", 600
    args.num_prompts = min(args.num_prompts, 16)
    args.sample_steps = "8"
  train_steps = per_stage_values("train_steps", args.train_steps, 3, int)
  batch_sizes = per_stage_values("batch_size", str(args.batch_size), 3, int)
  sampler = per_stage_values("sampler", args.sampler, 3, str)
  sample_steps = per_stage_values("sample_steps", args.sample_steps, 3, int)
  guidance = per_stage_values("guidance", args.guidance, 3, float)
  thresholding = per_stage_values("thresholding", args.thresholding, 3, str)
  from imagen_jax.inference import cascade

  # Built (and so validated) before anything trains.
  settings = [
    cascade.StageSampling(sampler=name, num_steps=s, guidance_weight=g, thresholding=th)
    for name, s, g, th in zip(sampler, sample_steps, guidance, thresholding, strict=True)
  ]
  if min(batch_sizes) < 1 or args.num_examples < max(batch_sizes):
    raise ValueError(
      f"--batch_size={args.batch_size!r}: each batch must be between 1 and --num_examples "
      f"({args.num_examples})"
    )
  if args.num_prompts < 1:
    raise ValueError(f"--num_prompts={args.num_prompts}; must be >= 1")
  if args.concurrent_stages < 1:
    raise ValueError(f"--concurrent_stages={args.concurrent_stages}; must be >= 1")
  out = os.path.abspath(args.out)
  work = os.path.join(out, "work")
  os.makedirs(work, exist_ok=True)
  timings = {}

  _log(f"1-2/5 shapes ({args.num_examples} x 64px), vocabulary, random tiny T5, precompute")
  t0 = time.time()
  vocab, data = build_data(work, args.num_examples, args.seed)
  timings["data"] = time.time() - t0

  stage_dirs = _train_stages(work, data, train_steps, batch_sizes, args, timings)

  import numpy as np

  from imagen_jax import images
  from imagen_jax.evaluation import shapes as eval_shapes

  _log(f"4/5 sampling {args.num_prompts} prompts through the cascade")
  t0 = time.time()
  model = cascade.Cascade.from_stage_dirs(stage_dirs, vocab_path=vocab)
  prompts = demo_prompts(args.num_prompts, args.seed)
  seeds = [args.seed + i for i in range(len(prompts))]
  result = model.sample(prompts, seeds, settings, batch_size=min(32, len(prompts)), progress=True)
  timings["sample"] = time.time() - t0
  final = images.to_uint8(result.images)
  sample_dir = os.path.join(out, "samples")
  settings_json = {
    st.config.name: x.to_json() for st, x in zip(model.stages, settings, strict=True)
  }
  index = images.ImageIndex(sample_dir, {"settings": settings_json})
  for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
    index.add(i, final[i], {"prompt": p, "seed": s})
  index.write()
  # The grid shows every stage: rows of 16 px (upscaled), 32 px (upscaled) and 64 px outputs.
  n_show = min(16, len(prompts))
  rows = [
    [images.resize_nearest(x, 64) for x in images.to_uint8(stage_out[:n_show])]
    for stage_out in result.per_stage
  ]
  grid = images.make_grid(np.asarray([x for row in rows for x in row]), columns=n_show)
  images.save_png(grid, os.path.join(out, "samples.png"))
  images.save_png(images.make_grid(final, columns=8), os.path.join(out, "samples_64.png"))

  _log("5/5 shapes metric")
  accuracy, records = eval_shapes.evaluate_dir(sample_dir)
  table = eval_shapes.format_table(accuracy, len(records), eval_shapes.QUALITY_BAR)
  total = time.time() - t_start
  timings["total"] = total
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump({"accuracy": accuracy, "timings_s": timings, "args": vars(args)}, f, indent=1)
  print(table)
  print(
    "timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()),
    f"\nwrote {os.path.join(out, 'samples.png')} (rows: 16, 32, 64 px stages)",
  )
  return 0


def _train_stages(
  work: str,
  data: str,
  train_steps: list[int],
  batch_sizes: list[int],
  args: argparse.Namespace,
  timings: dict,
) -> list[str]:
  """Trains the stages not yet trained to their step count, --concurrent_stages at a time;
  returns the stage dirs in cascade order."""
  model_dirs, jobs, steps = {}, [], {}  # by stage name, in cascade order
  for gin_file, n, batch in zip(STAGE_GINS, train_steps, batch_sizes, strict=True):
    name = os.path.basename(gin_file).removeprefix("demo_").removesuffix(".gin")
    model_dir = model_dirs[name] = os.path.join(work, name)
    if demo.trained_steps(model_dir) >= n:
      _log(f"3/5 {name}: already trained to step {n} in {model_dir}")
      continue
    os.makedirs(model_dir, exist_ok=True)
    jobs.append(demo.stage_train_job(gin_file, model_dir, data, n, batch, args.seed, args.gin_file))
    steps[name] = n
    _log(f"3/5 training {name}: {n} steps at batch {batch} (log: {jobs[-1].log_path})")
  if not jobs:
    return list(model_dirs.values())
  _log(f"    {len(jobs)} stage(s), {args.concurrent_stages} at a time")
  t0 = time.time()
  progress = demo.StageProgress({name: model_dirs[name] for name in steps}, steps)
  took = job_pool.run_jobs(jobs, args.concurrent_stages, on_tick=progress)
  timings["train"] = time.time() - t0
  for name in steps:
    timings[f"train_{name}"] = took[name]
    loss = demo.last_metrics(model_dirs[name]).get("loss")
    _log(f"    {name} done in {took[name]:.0f}s (last loss {loss})")
  return list(model_dirs.values())

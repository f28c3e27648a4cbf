"""Where the demo cascade loses small shapes: the shapes metric after every stage, per sampler.

  python benchmarks/demo_shapes_study.py --demo_out=demo_out [--num_prompts=256] [--seed=100] \
      [--variant='ddim=ddim/64,32,32/8,1,1' ...] [--truth] [--out=benchmarks/results/demo_shapes.md]

Loads a trained demo cascade (`imagen-jax demo`'s OUT/work/{base16,sr32,sr64}), samples
`--num_prompts` grammar prompts (seed `--seed`; 256 rather than the demo's 64, where one image
moves shape by 1.6 points) with each variant's sampler, steps and guidance, and scores the
images after each stage with `imagen_jax.evaluation.shapes`. Variants sharing a stage's settings
(and those of the stages before it) share its samples. `--truth` adds the ceiling rows: the
detector on true renders at 16, 32 and 64 px, and the SR stages fed true low-res renders, which
separates what the base draws wrong from what the SR stages round off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base16", "sr32", "sr64")
# The README's step-count study: DDIM at the demo's steps, a half and a quarter of them, and
# DPM-Solver++(2M) at a half, a quarter and an eighth.
DEFAULT_VARIANTS = (
  "DDIM 64/32/32=ddim/64,32,32/8,1,1",
  "DDIM 32/16/16=ddim/32,16,16/8,1,1",
  "DDIM 16/8/8=ddim/16,8,8/8,1,1",
  "DPM-Solver++(2M) 32/16/16=dpmpp_2m/32,16,16/8,1,1",
  "DPM-Solver++(2M) 16/8/8=dpmpp_2m/16,8,8/8,1,1",
  "DPM-Solver++(2M) 8/4/4=dpmpp_2m/8,4,4/8,1,1",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--demo_out", required=True, help="an `imagen-jax demo --out` directory")
  parser.add_argument("--num_prompts", type=int, default=256, help="grammar prompts scored")
  parser.add_argument("--seed", type=int, default=100, help="prompts and sampling seeds")
  parser.add_argument(
    "--variant",
    action="append",
    help="NAME=SAMPLER/STEPS/GUIDANCE, each one value or one per stage (repeatable; default: "
    "the README's step-count study)",
  )
  parser.add_argument("--thresholding", default="static", help="per stage, as in the demo")
  parser.add_argument("--batch_size", type=int, default=32, help="images per sampling call")
  parser.add_argument("--truth", action="store_true", help="add the true-render ceiling rows")
  parser.add_argument("--out", default=None, help="markdown report (default: print only)")
  args = parser.parse_args(argv)
  if args.num_prompts < 1 or args.batch_size < 1:
    parser.error("--num_prompts and --batch_size must be >= 1")
  sys.path.insert(0, REPO)
  from imagen_jax import errors

  try:  # each variant is parsed and range-checked before anything loads
    args.variants = [parse_variant(v, args.thresholding) for v in args.variant or DEFAULT_VARIANTS]
  except (errors.UserError, ValueError) as e:
    parser.error(str(e))
  work = os.path.join(args.demo_out, "work")
  missing = [s for s in STAGES if not os.path.isdir(os.path.join(work, s, "checkpoints"))]
  if missing:
    parser.error(
      f"--demo_out={args.demo_out}: no trained {', '.join(missing)} under {work}; "
      "run `imagen-jax demo --out=DIR` first"
    )
  return args


def parse_variant(text: str, thresholding: str) -> tuple[str, list]:
  """'NAME=SAMPLER/STEPS/GUIDANCE' -> (name, one StageSampling per stage)."""
  from imagen_jax.cli.sample import per_stage_values
  from imagen_jax.inference.settings import StageSampling

  name, sep, spec = text.partition("=")
  parts = spec.split("/")
  if not sep or len(parts) != 3:
    raise ValueError(f"--variant={text!r}: expected NAME=SAMPLER/STEPS/GUIDANCE")
  sampler = per_stage_values("sampler", parts[0], len(STAGES), str)
  steps = per_stage_values("steps", parts[1], len(STAGES), int)
  guidance = per_stage_values("guidance", parts[2], len(STAGES), float)
  th = per_stage_values("thresholding", thresholding, len(STAGES), str)
  try:
    settings = [
      StageSampling(sampler=a, num_steps=b, guidance_weight=c, thresholding=d)
      for a, b, c, d in zip(sampler, steps, guidance, th, strict=True)
    ]
  except ValueError as e:
    raise ValueError(f"--variant={text!r}: {e}") from e
  return name.strip(), settings


class StudyRunner:
  """Samples stage by stage, reusing the samples of every settings prefix already run."""

  def __init__(self, model, prompts: list[str], seeds: list[int], batch_size: int):
    self.model, self.prompts, self.seeds, self.batch_size = model, prompts, seeds, batch_size
    self.emb, self.mask = model.encode(prompts)
    self._cache: dict = {}

  def stage_output(self, k: int, settings: list, lowres=None, first: int = 0):
    """(images after stage k, seconds) for these settings; stage `first` starts from
    `lowres` (None: the base, from text alone)."""
    key = (first, tuple(json.dumps(s.to_json(), sort_keys=True) for s in settings[: k + 1]))
    if key not in self._cache:
      prev = lowres if k == first else self.stage_output(k - 1, settings, lowres, first)[0]
      t0 = time.time()
      result = self.model.sample_embeddings(
        self.emb,
        self.mask,
        self.seeds,
        settings,
        lowres=prev,
        stop_after=k + 1,
        batch_size=self.batch_size,
      )
      self._cache[key] = (result.images, time.time() - t0)
    return self._cache[key]


def score(images_u8, prompts: list[str]) -> tuple[dict, int]:
  """(accuracies, small shapes read wrong) of uint8 images."""
  from imagen_jax.evaluation import shapes as eval_shapes

  acc, records = eval_shapes.score(images_u8, prompts)
  small_wrong = sum(not r["correct"]["shape"] and r["expected"]["size"] == "small" for r in records)
  return acc, small_wrong


def variant_row(runner: StudyRunner, name: str, settings: list) -> str:
  from imagen_jax import images

  per_stage, seconds = [], []
  for k in range(len(STAGES)):
    out, s = runner.stage_output(k, settings)
    per_stage.append(score(images.to_uint8(out), runner.prompts))
    seconds.append(s)
  (acc, small_wrong), n = per_stage[-1], len(runner.prompts)
  shape = " / ".join(f"{100 * a['shape']:.1f}" for a, _ in per_stage)
  secs = " / ".join(f"{s:.1f}" for s in seconds)
  others = [f"{a} {100 * v:.1f}%" for a, v in acc.items() if a not in ("shape", "all") and v < 1]
  return (
    f"| {name} | {shape} | {100 * acc['all']:.1f}% | {small_wrong} of {n} | {secs} | "
    f"{1e3 * sum(seconds) / n:.0f} | {', '.join(others) or '-'} |"
  )


def truth_rows(runner: StudyRunner, specs: list, settings: list) -> list[str]:
  """The detector on true renders, and the SR stages fed true 16 px and 32 px renders."""
  import numpy as np

  from imagen_jax import images
  from imagen_jax.data import shapes

  true = {r: np.stack([shapes.render(s, r) for s in specs]) for r in (16, 32, 64)}
  rows = []
  for r in (16, 32, 64):
    acc, small_wrong = score(true[r], runner.prompts)
    rows.append(f"| true renders at {r} px | {100 * acc['shape']:.1f}% | {small_wrong} |")
  for r, label in ((16, "SR-32, SR-64 fed true 16 px"), (32, "SR-64 fed true 32 px")):
    lowres = true[r].astype(np.float32) / 127.5 - 1.0
    first = STAGES.index("sr32" if r == 16 else "sr64")
    out, _ = runner.stage_output(len(STAGES) - 1, settings, lowres, first)
    acc, small_wrong = score(images.to_uint8(out), runner.prompts)
    rows.append(f"| {label}: shape at 64 px | {100 * acc['shape']:.1f}% | {small_wrong} |")
  return rows


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from imagen_jax.data import shapes
  from imagen_jax.demo import demo_prompt_specs
  from imagen_jax.inference import cascade

  variants = args.variants
  work = os.path.join(args.demo_out, "work")
  model = cascade.Cascade.from_stage_dirs(
    [os.path.join(work, s) for s in STAGES], vocab_path=os.path.join(work, "spm.model")
  )
  specs = demo_prompt_specs(args.num_prompts, args.seed)  # the demo's own prompts for a seed
  prompts = [shapes.caption(s) for s in specs]
  seeds = [args.seed + i for i in range(len(prompts))]
  runner = StudyRunner(model, prompts, seeds, args.batch_size)
  lines = [
    f"# Demo cascade shapes study: {args.num_prompts} prompts, seed {args.seed}",
    "",
    "| variant | shape at 16 / 32 / 64 px (%) | all five | small shapes wrong | "
    "seconds (base / SR-32 / SR-64) | ms / image | other attributes below 100% at 64 px |",
    "|---|---|---:|---:|---|---:|---|",
  ]
  for name, settings in variants:
    lines.append(variant_row(runner, name, settings))
    print(lines[-1], flush=True)
  if args.truth:
    lines += [
      "",
      f"| ceiling ({variants[0][0]}'s SR settings) | shape | small wrong |",
      "|---|---:|---:|",
    ]
    lines += truth_rows(runner, specs, variants[0][1])
  report = "\n".join(lines) + "\n"
  print(report)
  if args.out:
    with open(args.out, "w") as f:
      f.write(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())

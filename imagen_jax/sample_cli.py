"""`imagen-jax sample`: prompts -> PNGs + index.json through a bundle or training stage dirs.

Per-stage knobs take one value for every stage or a comma-separated value per stage, e.g.
`--steps=64,32,32 --guidance=3,3,1`. Image i (prompt p, copy j) uses seed `--seed + i`, so an
image is reproduced by its (prompt, seed, settings) entry in index.json alone.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

_KNOBS = {
  # flag: (StageSampling field, type, default, help)
  "sampler": ("sampler", str, "ddim", "ddim | ancestral"),
  "steps": ("num_steps", int, "64", "denoising steps"),
  "eta": ("eta", float, "0", "DDIM eta (0 = deterministic)"),
  "guidance": ("guidance_weight", float, "1", "classifier-free guidance weight w (1 = off)"),
  "thresholding": ("thresholding", str, "dynamic", "dynamic | static | none"),
  "percentile": ("percentile", float, "99.5", "dynamic thresholding percentile p"),
  "aug_level": ("aug_level", float, "default", "SR noise-conditioning level (default: stage's)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of `imagen-jax sample`."""
  a = parser.add_argument
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--bundle", default=None, help="an export bundle (imagen-jax export)")
  src.add_argument(
    "--stage_dirs", default=None, help="comma-separated training MODEL_DIRs, base stage first"
  )
  a("--prompt", action="append", default=[], help="a prompt (repeatable); '' = unconditional")
  a("--prompts_file", default=None, help="a text file with one prompt per line")
  a("--out", required=True, help="output directory for PNGs and index.json")
  a("--overwrite", action="store_true", help="write into --out even if it has an index.json")
  a("--num_per_prompt", type=int, default=1, help="images per prompt")
  a("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
  a("--negative_prompt", default=None, help="guidance's unconditional branch for every image")
  for flag, (_, _, default, help_text) in _KNOBS.items():
    a(f"--{flag}", default=default, help=f"{help_text}; one value or one per stage (a,b,c)")
  a("--stop_after", type=int, default=None, help="stop after this stage (1-based)")
  a(
    "--lowres_image",
    default=None,
    help="start from this PNG (super-resolution only): it enters the SR stage for its size",
  )
  a("--batch_size", type=int, default=16, help="images per compiled program call")
  a("--grid", action="store_true", help="also write grid.png of all images")
  a("--save_stages", action="store_true", help="also write every stage's output per image")
  a("--vocab", default=None, help="--stage_dirs: SentencePiece model (default: beside the data)")
  a("--t5_checkpoint", default=None, help="T5 checkpoint (default: the bundle's/data's)")
  a("--t5_size", default=None, help="--stage_dirs: T5 size (default: the data manifest's)")
  a("--no_progress", action="store_true", help="no progress bars")


def _per_stage(flag: str, raw: str, num_stages: int, cast) -> list[Any]:
  values = [v.strip() for v in str(raw).split(",")]
  if len(values) == 1:
    values = values * num_stages
  if len(values) != num_stages:
    raise ValueError(
      f"--{flag}={raw!r}: give one value or one per stage ({num_stages} stages), not {len(values)}"
    )
  out = []
  for v in values:
    if v in ("default", "none", "") and flag == "aug_level":
      out.append(None)
      continue
    try:
      out.append(cast(v))
    except ValueError as e:
      raise ValueError(f"--{flag}={raw!r}: {v!r} is not a {cast.__name__}") from e
  return out


def stage_settings(args: argparse.Namespace, num_stages: int) -> list[Any]:
  """One StageSampling per stage from the per-stage flags."""
  from imagen_jax.cascade import StageSampling

  columns = {
    field: _per_stage(flag, getattr(args, flag), num_stages, cast)
    for flag, (field, cast, _, _) in _KNOBS.items()
  }
  return [StageSampling(**{f: columns[f][k] for f in columns}) for k in range(num_stages)]


def read_prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    if not os.path.isfile(args.prompts_file):
      raise FileNotFoundError(f"--prompts_file={args.prompts_file!r} does not exist")
    with open(args.prompts_file) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise ValueError("no prompts: pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return prompts


def run(args: argparse.Namespace) -> int:
  """Runs `imagen-jax sample`."""
  import numpy as np

  from imagen_jax import cascade, images

  prompts = read_prompts(args)
  if args.num_per_prompt < 1:
    raise ValueError(f"--num_per_prompt={args.num_per_prompt}; must be >= 1")
  if args.batch_size < 1:
    raise ValueError(f"--batch_size={args.batch_size}; must be >= 1")
  if os.path.exists(os.path.join(args.out, "index.json")) and not args.overwrite:
    raise FileExistsError(
      f"--out={args.out!r} already holds samples (index.json); pass --overwrite or another --out"
    )
  lowres = None
  if args.lowres_image:
    from PIL import Image

    if not os.path.isfile(args.lowres_image):
      raise FileNotFoundError(f"--lowres_image={args.lowres_image!r} does not exist")
    with Image.open(args.lowres_image) as im:
      pixels = np.asarray(im.convert("RGB"), np.float32)
    if pixels.shape[0] != pixels.shape[1]:
      raise ValueError(f"--lowres_image must be square, got {pixels.shape[1]}x{pixels.shape[0]}")
    lowres = (pixels / 127.5 - 1.0)[None]

  if args.bundle:
    source = {"bundle": os.path.abspath(args.bundle)}
    from imagen_jax import export

    model = export.load_bundle(args.bundle, t5_checkpoint=args.t5_checkpoint)
  else:
    dirs = [d for d in args.stage_dirs.split(",") if d]
    source = {"stage_dirs": [os.path.abspath(d) for d in dirs]}
    model = cascade.Cascade.from_stage_dirs(
      dirs, vocab_path=args.vocab, t5_checkpoint=args.t5_checkpoint, t5_size=args.t5_size
    )
  settings = stage_settings(args, len(model.stages))
  all_prompts = [p for p in prompts for _ in range(args.num_per_prompt)]
  seeds = [args.seed + i for i in range(len(all_prompts))]
  result = model.sample(
    all_prompts,
    seeds,
    settings,
    negative_prompts=args.negative_prompt,
    lowres=lowres,
    stop_after=args.stop_after,
    batch_size=min(args.batch_size, len(all_prompts)),
    progress=not args.no_progress,
  )
  os.makedirs(args.out, exist_ok=True)
  stage_names = [model.stages[k].config.name for k in result.stages_run]
  settings_json = {model.stages[k].config.name: settings[k].to_json() for k in result.stages_run}
  entries = []
  final = images.to_uint8(result.images)
  for i, (prompt, seed) in enumerate(zip(all_prompts, seeds, strict=True)):
    name = f"{i:05d}.png"
    images.save_png(final[i], os.path.join(args.out, name))
    entry = {
      "file": name,
      "prompt": prompt,
      "seed": seed,
      "negative_prompt": args.negative_prompt,
      "stages": stage_names,
      "settings": settings_json,
    }
    if args.save_stages:
      entry["stage_files"] = {}
      for k, out in zip(result.stages_run, result.per_stage, strict=True):
        stage_file = f"{i:05d}_{model.stages[k].config.name}.png"
        images.save_png(images.to_uint8(out[i]), os.path.join(args.out, stage_file))
        entry["stage_files"][model.stages[k].config.name] = stage_file
    entries.append(entry)
  index = {
    "source": source,
    "resolution": int(final.shape[1]),
    "seconds_per_stage": dict(zip(stage_names, result.seconds, strict=True)),
    "images": entries,
  }
  with open(os.path.join(args.out, "index.json"), "w") as f:
    json.dump(index, f, indent=1)
  if args.grid:
    columns = args.num_per_prompt if args.num_per_prompt > 1 else None
    images.save_png(images.make_grid(final, columns), os.path.join(args.out, "grid.png"))
  print(
    f"sample: {len(entries)} images at {final.shape[1]}px -> {args.out} "
    f"({', '.join(f'{n} {s:.1f}s' for n, s in zip(stage_names, result.seconds, strict=True))})"
  )
  return 0

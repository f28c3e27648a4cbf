"""`imagen-jax sample`: prompts -> PNGs + index.json through a bundle or training stage dirs.

Per-stage knobs take one value for every stage or a comma-separated value per stage, e.g.
`--steps=64,32,32 --guidance=3,3,1`. Image i (prompt p, copy j) uses seed `--seed + i`, so an
image is reproduced by its (prompt, seed, settings) entry in index.json alone.

Images stream through the cascade `--batch_size` at a time: only one batch's prompts,
embeddings and images are in memory, and each batch's PNGs and index.json are written as soon as
it is done, so an interrupted run leaves whole PNGs and an index listing exactly those. Rerunning
the same command into the same --out continues where it stopped; other settings into an --out
that holds images are refused before any model loads (--overwrite or a new --out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from imagen_jax import errors

if TYPE_CHECKING:  # at run time images (numpy, PIL) is imported where used: flags parse fast
  from imagen_jax import images

_KNOBS = {
  # flag: (StageSampling field, type, default, help)
  "sampler": ("sampler", str, "ddim", "ddim | ancestral | dpmpp_2m"),
  "steps": ("num_steps", int, "64", "denoising steps"),
  "eta": ("eta", float, "0", "DDIM eta (0 = deterministic)"),
  "guidance": (
    "guidance_weight",
    float,
    "1",
    "classifier-free guidance weight w >= 0 (1 = off, larger = follow the prompt more)",
  ),
  "thresholding": ("thresholding", str, "dynamic", "dynamic | static | none"),
  "percentile": ("percentile", float, "99.5", "dynamic thresholding percentile p"),
  "aug_level": ("aug_level", float, "default", "SR noise-conditioning level (default: stage's)"),
  "time_spacing": ("time_spacing", str, "uniform_t", "uniform_t | uniform_log_snr"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of `imagen-jax sample`."""
  add_source_flags(parser)
  a = parser.add_argument
  a("--prompt", action="append", default=[], help="a prompt (repeatable); '' = unconditional")
  a("--prompts_file", default=None, help="a text file with one prompt per line")
  a(
    "--out",
    required=True,
    help="output directory for PNGs and index.json; rerunning the same command continues there",
  )
  add_sampling_flags(parser)


def add_source_flags(parser: argparse.ArgumentParser) -> None:
  """--bundle | --stage_dirs (also mounted by `imagen-jax eval coco`)."""
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--bundle", default=None, help="an export bundle (imagen-jax export)")
  src.add_argument(
    "--stage_dirs", default=None, help="comma-separated training MODEL_DIRs, base stage first"
  )


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
  """The flags after --out (also mounted by `imagen-jax eval coco`)."""
  a = parser.add_argument
  a(
    "--overwrite",
    action="store_true",
    help="resample every image into --out even if it holds images (of any settings)",
  )
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
  a(
    "--batch_size",
    type=int,
    default=16,
    help="images per compiled program call; each batch's PNGs are written when it is done",
  )
  a("--grid", action="store_true", help="also write grid.png of all images")
  a("--save_stages", action="store_true", help="also write every stage's output per image")
  a("--vocab", default=None, help="--stage_dirs: SentencePiece model (default: beside the data)")
  a("--t5_checkpoint", default=None, help="T5 checkpoint (default: the bundle's/data's)")
  a("--t5_size", default=None, help="--stage_dirs: T5 size (default: the data manifest's)")
  a("--no_progress", action="store_true", help="no progress bar")


# ================================================================================================
# Flags -> validated settings (before any model loads)
# ================================================================================================


def _per_stage(flag: str, raw: str, num_stages: int, cast) -> list[Any]:
  values = [v.strip() for v in str(raw).split(",")]
  if len(values) == 1:
    values = values * num_stages
  if len(values) != num_stages:
    raise errors.UserError(
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
      kind = "an integer" if cast is int else "a number"
      raise errors.UserError(f"--{flag}={raw!r}: {v!r} is not {kind}") from e
  return out


def stage_settings(args: argparse.Namespace, num_stages: int) -> list[Any]:
  """One StageSampling per stage from the per-stage flags; UserError naming a bad flag."""
  from imagen_jax.cascade import StageSampling

  columns = {}
  for flag, (field, cast, _, _) in _KNOBS.items():
    raw = getattr(args, flag)
    columns[field] = _per_stage(flag, raw, num_stages, cast)
    # StageSampling holds the range checks; each value alone, so the error names its flag.
    for k, value in enumerate(columns[field]):
      try:
        StageSampling(**{field: value})
      except ValueError as e:
        where = f" (stage {k + 1})" if "," in str(raw) else ""
        raise errors.UserError(f"--{flag}={raw!r}{where}: {errors.one_line(e)}") from e
  return [StageSampling(**{f: columns[f][k] for f in columns}) for k in range(num_stages)]


def read_prompts(args: argparse.Namespace) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    if not os.path.isfile(args.prompts_file):
      raise errors.UserError(f"--prompts_file={args.prompts_file!r} does not exist")
    with open(args.prompts_file) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise errors.UserError("no prompts: pass --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return prompts


def _check_counts(args: argparse.Namespace, total: int) -> None:
  from imagen_jax import cascade

  for flag in ("num_per_prompt", "batch_size"):
    if getattr(args, flag) < 1:
      raise errors.UserError(f"--{flag}={getattr(args, flag)}: must be >= 1")
  try:  # the first and last seed bound them all
    cascade.check_seeds([args.seed, args.seed + total - 1])
  except ValueError as e:
    raise errors.UserError(
      f"--seed={args.seed} with {total} images uses seeds {args.seed}..{args.seed + total - 1}: "
      f"{errors.one_line(e)}"
    ) from e


def _stage_dirs(args: argparse.Namespace) -> list[str]:
  return [d.strip() for d in args.stage_dirs.split(",") if d.strip()]


def model_source(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
  """(the source index.json records, its number of stages), checked without loading weights."""
  if args.bundle:
    from imagen_jax import export

    try:  # the load verifies every file's sha256; the stage count needs only the manifest
      manifest = export.read_manifest(args.bundle, verify=False)
    except (OSError, ValueError) as e:
      raise errors.UserError(f"--bundle={args.bundle}: {errors.one_line(e)}") from e
    return {"bundle": os.path.abspath(args.bundle)}, len(manifest["stages"])
  dirs = _stage_dirs(args)
  if not dirs:
    raise errors.UserError("--stage_dirs is empty: give training MODEL_DIRs, base stage first")
  for d in dirs:
    if not os.path.isdir(os.path.join(d, "checkpoints")):
      problem = "does not exist" if not os.path.exists(d) else "has no checkpoints/ directory"
      raise errors.UserError(
        f"--stage_dirs: {d} {problem}; give the MODEL_DIRs the stages were trained into"
      )
  return {"stage_dirs": [os.path.abspath(d) for d in dirs]}, len(dirs)


def read_lowres(path: str | None) -> tuple[Any, str | None]:
  """(--lowres_image as float [1, h, w, 3] in [−1, 1], its file's sha256), or (None, None)."""
  if not path:
    return None, None
  import numpy as np

  from imagen_jax import images

  if not os.path.isfile(path):
    raise errors.UserError(f"--lowres_image={path!r} does not exist")
  pixels = images.load_png(path).astype(np.float32)
  if pixels.shape[0] != pixels.shape[1]:
    raise errors.UserError(
      f"--lowres_image must be square, got {pixels.shape[1]}x{pixels.shape[0]}"
    )
  with open(path, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  return (pixels / 127.5 - 1.0)[None], sha


# ================================================================================================
# Resuming: which images of --out are finished
# ================================================================================================


def run_settings(
  args: argparse.Namespace,
  prompts: list[str],
  settings: list[Any],
  source: dict[str, Any],
  lowres_sha: str | None,
) -> dict[str, Any]:
  """Everything the images depend on (index.json "run"); a rerun resumes only if it is equal.

  --grid and --no_progress are left out (no image changes), and so is --batch_size: an image's
  bits can move with its batch's size only by float rounding (at most 1 of 255 in a PNG pixel).
  """
  prompts_sha = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
  return {
    "source": source,
    "text_encoder": {
      "vocab": args.vocab and os.path.abspath(args.vocab),
      "t5_checkpoint": args.t5_checkpoint and os.path.abspath(args.t5_checkpoint),
      "t5_size": args.t5_size,
    },
    "prompts_sha256": prompts_sha,
    "num_prompts": len(prompts),
    "num_per_prompt": args.num_per_prompt,
    "seed": args.seed,
    "negative_prompt": args.negative_prompt,
    "settings": [s.to_json() for s in settings],
    "stop_after": args.stop_after,
    "lowres_image_sha256": lowres_sha,
    "save_stages": bool(args.save_stages),
  }


def _refuse(out: str, why: str) -> errors.UserError:
  return errors.UserError(
    f"--out={out} already holds {why}; pass --overwrite to sample afresh into it, or choose a "
    "new --out"
  )


def finished_images(
  args: argparse.Namespace, settings: dict[str, Any]
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
  """The images of --out a rerun keeps, by number, and the old index (empty when fresh).

  Finished: listed in index.json and present on disk (stage files too with --save_stages).
  Raises a UserError if --out holds images of other settings (unless --overwrite).
  """
  from imagen_jax import images

  try:
    index = images.read_index(args.out)
  except ValueError as e:
    if args.overwrite:
      return {}, {}
    raise _refuse(args.out, f"an index.json that cannot be resumed ({errors.one_line(e)})") from e
  if index is None or args.overwrite or not index.get("images"):
    return {}, {}
  old, count = index.get("run"), len(index["images"])
  if not isinstance(old, dict):
    raise _refuse(args.out, f"{count} images whose index.json records no run settings")
  if old != settings:
    differ = sorted(
      k.removesuffix("_sha256") for k in set(settings) | set(old) if old.get(k) != settings.get(k)
    )
    raise _refuse(
      args.out, f"{count} images sampled with other settings (changed: {', '.join(differ)})"
    )
  done = {}
  for entry in index["images"]:
    number = images.image_number(entry)
    files = [entry.get("file", "")] + list(entry.get("stage_files", {}).values())
    if number is not None and all(os.path.isfile(os.path.join(args.out, f)) for f in files):
      done[number] = entry
  return done, index


# ================================================================================================
# The run
# ================================================================================================


def _load_model(args: argparse.Namespace, source: dict[str, Any]):
  from imagen_jax import cascade

  if "bundle" in source:
    from imagen_jax import export

    return export.load_bundle(args.bundle, t5_checkpoint=args.t5_checkpoint)
  return cascade.Cascade.from_stage_dirs(
    _stage_dirs(args), vocab_path=args.vocab, t5_checkpoint=args.t5_checkpoint, t5_size=args.t5_size
  )


def _write_grid(args: argparse.Namespace, entries: dict[int, dict[str, Any]]) -> None:
  import numpy as np

  from imagen_jax import images

  # Read back from disk: the run keeps only one batch of images in memory.
  tiles = [images.load_png(os.path.join(args.out, e["file"])) for _, e in sorted(entries.items())]
  columns = args.num_per_prompt if args.num_per_prompt > 1 else None
  images.save_png(images.make_grid(np.asarray(tiles), columns), os.path.join(args.out, "grid.png"))


def _sample_batches(
  args: argparse.Namespace,
  model: Any,
  prompts: list[str],
  settings: list[Any],
  lowres: Any,
  batches: list[range],
  batch_size: int,
  index: images.ImageIndex,
) -> int:
  """Samples `batches` (ranges of image numbers) into `index`; returns the new images' count.

  Each batch's PNGs are listed as soon as they are written, and index.json is rewritten after
  every batch and on the way out (Ctrl-C included), so it always lists exactly the PNGs on disk.
  """
  from imagen_jax import images

  bar = None
  if not args.no_progress:
    from tqdm import tqdm

    done = len(index.entries)
    bar = tqdm(
      total=index.header["total"], initial=done, desc="sample", unit="img", dynamic_ncols=True
    )
  new = 0
  seconds = index.header["seconds_per_stage"]
  try:
    for numbers in batches:
      result = model.sample(
        [prompts[i // args.num_per_prompt] for i in numbers],
        [args.seed + i for i in numbers],
        settings,
        negative_prompts=args.negative_prompt,
        lowres=lowres,
        stop_after=args.stop_after,
        batch_size=batch_size,
      )
      names = [model.stages[k].config.name for k in result.stages_run]
      stage_json = {model.stages[k].config.name: settings[k].to_json() for k in result.stages_run}
      final = images.to_uint8(result.images)
      for j, i in enumerate(numbers):
        if i in index.entries:
          continue  # finished before an interruption; its batch ran again only for its bits
        entry = {
          "prompt": prompts[i // args.num_per_prompt],
          "seed": args.seed + i,
          "negative_prompt": args.negative_prompt,
          "stages": names,
          "settings": stage_json,
        }
        per_stage = None
        if args.save_stages:
          per_stage = {
            n: images.to_uint8(x[j]) for n, x in zip(names, result.per_stage, strict=True)
          }
        index.add(i, final[j], entry, per_stage)
        new += 1
        if bar is not None:
          bar.update(1)
      for n, s in zip(names, result.seconds, strict=True):
        seconds[n] = seconds.get(n, 0.0) + s
      index.header["resolution"] = int(final.shape[1])
      index.write(force=False)
  finally:
    index.write()
    if bar is not None:
      bar.close()
  return new


def run(args: argparse.Namespace) -> int:
  """Runs `imagen-jax sample`."""
  from imagen_jax import images

  # Every flag is checked before any model loads (loading can take minutes).
  prompts = read_prompts(args)
  total = len(prompts) * args.num_per_prompt
  _check_counts(args, total)
  source, num_stages = model_source(args)
  settings = stage_settings(args, num_stages)
  if args.stop_after is not None and not 1 <= args.stop_after <= num_stages:
    raise errors.UserError(f"--stop_after={args.stop_after}: must be between 1 and {num_stages}")
  lowres, lowres_sha = read_lowres(args.lowres_image)
  run_key = run_settings(args, prompts, settings, source, lowres_sha)
  done, old_index = finished_images(args, run_key)

  # Fixed batches of the whole image list: a batch with any unfinished image is sampled whole,
  # so a resumed run computes exactly the batches an uninterrupted one does (same bits).
  batch = min(args.batch_size, total)
  batches = [
    range(start, min(start + batch, total))
    for start in range(0, total, batch)
    if any(i not in done for i in range(start, min(start + batch, total)))
  ]
  index = images.ImageIndex(
    args.out,
    {
      "run": run_key,
      "source": source,
      "weights": old_index.get("weights"),
      "total": total,
      "resolution": old_index.get("resolution"),
      "seconds_per_stage": dict(old_index.get("seconds_per_stage", {})),
    },
    done,
  )
  grid_path = os.path.join(args.out, "grid.png")
  if not batches:
    if args.grid and not os.path.isfile(grid_path):
      _write_grid(args, index.entries)
    print(f"sample: all {total} images are already in {args.out} (index.json); nothing to do")
    return 0
  errors.check_writable_dir(args.out, "--out")
  index.write()  # before the model loads: records the run
  left = total - len(done)
  resumed = f" (resuming: {len(done)} already done)" if done else ""
  print(f"sample: {left} images -> {args.out}{resumed}; loading the model", flush=True)

  model = _load_model(args, source)
  weights = [st.spec.get("source") for st in model.stages]
  if done and index.header["weights"] not in (None, weights):
    raise _refuse(args.out, f"{len(done)} images sampled with other weights (checkpoints)")
  index.header["weights"] = weights

  new = _sample_batches(args, model, prompts, settings, lowres, batches, batch, index)
  if args.grid:
    _write_grid(args, index.entries)
  timing = ", ".join(f"{n} {s:.1f}s" for n, s in index.header["seconds_per_stage"].items())
  print(
    f"sample: {new} images at {index.header['resolution']}px -> {args.out} "
    f"({len(index.entries)}/{total} done; {timing})"
  )
  return 0

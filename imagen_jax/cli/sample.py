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
import math
import os
import re
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
  "percentile": (
    "percentile",
    float,
    "default",
    "dynamic thresholding percentile p (default: the stage's: 99.5 as the paper, 95 for IF)",
  ),
  "max_threshold": (
    "max_threshold",
    float,
    "default",
    "cap on dynamic thresholding's s (default: the stage's: none, 1.5 for IF; none = no cap)",
  ),
  "aug_level": ("aug_level", float, "default", "SR noise-conditioning level (default: stage's)"),
  "time_spacing": ("time_spacing", str, "uniform_t", "uniform_t | uniform_log_snr"),
}


# Knobs whose 'default' is the stage's own value (None in StageSampling).
_STAGE_DEFAULT_KNOBS = ("aug_level", "percentile", "max_threshold")


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
  add_device_flags(parser)


def add_device_flags(parser: argparse.ArgumentParser) -> None:
  """--mesh and the multi-host flags (launch/local.py sets the latter for local N-process runs)."""
  a = parser.add_argument
  a(
    "--mesh",
    default=None,
    help="this process's devices as AXIS=SIZE,... over data/fsdp/model, e.g. data=2,fsdp=4 "
    "(batch over data×fsdp, params FSDP-sharded over fsdp; default: all devices on data)",
  )
  a("--coordinator_address", default=None, help="multi-host: host:port of process 0")
  a("--num_processes", type=int, default=None, help="multi-host: process count")
  a("--process_id", type=int, default=None, help="multi-host: this process's id")
  a("--multihost", action="store_true", help="jax.distributed with auto-detected settings (pods)")
  a("--num_cpu_devices", type=int, default=None, help="simulate this many CPU devices per process")


def add_source_flags(parser: argparse.ArgumentParser) -> None:
  """--bundle | --stage_dirs (also mounted by `imagen-jax eval coco`)."""
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--bundle", default=None, help="an export bundle (imagen-jax export)")
  src.add_argument(
    "--stage_dirs",
    default=None,
    help="comma-separated training MODEL_DIRs, base stage first (if:PATH = a DeepFloyd IF dir)",
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


def per_stage_values(flag: str, raw: str, num_stages: int, cast: Any) -> list[Any]:
  """A per-stage flag: one value for every stage or one per stage (a,b,c), each cast."""
  values = [v.strip() for v in str(raw).split(",")]
  if len(values) == 1:
    values = values * num_stages
  if len(values) != num_stages:
    raise errors.UserError(
      f"--{flag}={raw!r}: give one value or one per stage ({num_stages} stages), not {len(values)}"
    )
  out = []
  for v in values:
    if v in ("default", "") and flag in _STAGE_DEFAULT_KNOBS:
      out.append(None)
      continue
    if v == "none" and flag in ("aug_level", "max_threshold"):  # aug: the stage's; cap: none
      out.append(None if flag == "aug_level" else math.inf)
      continue
    try:
      out.append(cast(v))
    except ValueError as e:
      kind = "an integer" if cast is int else "a number"
      raise errors.UserError(f"--{flag}={raw!r}: {v!r} is not {kind}") from e
  return out


def stage_settings(args: argparse.Namespace, num_stages: int) -> list[Any]:
  """One StageSampling per stage from the per-stage flags; UserError naming a bad flag."""
  from imagen_jax.inference.cascade import StageSampling

  columns = {}
  for flag, (field, cast, _, _) in _KNOBS.items():
    raw = getattr(args, flag)
    columns[field] = per_stage_values(flag, raw, num_stages, cast)
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
  from imagen_jax.inference import cascade

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
    from imagen_jax.inference import bundle

    try:  # the load verifies every file's sha256; the stage count needs only the manifest
      manifest = bundle.read_manifest(args.bundle, verify=False)
    except (OSError, ValueError) as e:
      raise errors.UserError(f"--bundle={args.bundle}: {errors.one_line(e)}") from e
    return {"bundle": os.path.abspath(args.bundle)}, len(manifest["stages"])
  from imagen_jax.inference import cascade

  dirs = cascade.checked_stage_dirs(args.stage_dirs)
  return {"stage_dirs": dirs}, len(dirs)


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


def mesh_config(args: argparse.Namespace) -> Any:
  """--mesh as a `parallel.MeshConfig` (None when unset); UserError on a bad spelling."""
  if not getattr(args, "mesh", None):
    return None
  from imagen_jax import parallel

  try:
    return parallel.parse_mesh_flag(args.mesh)
  except ValueError as e:
    raise errors.UserError(f"--mesh={args.mesh!r}: {errors.one_line(e)}; e.g. data=2,fsdp=4") from e


def start_jax(args: argparse.Namespace, mesh: Any) -> None:
  """Simulated CPU devices and jax.distributed (multi-host), before any backend starts; then
  --mesh checked against this process's device count."""
  import jax

  from imagen_jax import parallel

  if args.num_cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={args.num_cpu_devices}"
    )
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  if args.multihost or args.coordinator_address or (args.num_processes or 1) > 1:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  if mesh is not None:
    try:
      mesh.resolved_sizes(jax.local_device_count())
    except ValueError as e:
      raise errors.UserError(f"--mesh={args.mesh!r}: {errors.one_line(e)}") from e


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


def part_file(process: int) -> str:
  """The index of one process of a multi-process run, merged into index.json at its end."""
  return f"index.process{process}.json"


def _part_files(out: str) -> list[str]:
  if not os.path.isdir(out):
    return []
  names = [n for n in os.listdir(out) if re.fullmatch(r"index\.process\d+\.json", n)]
  return [os.path.join(out, n) for n in sorted(names)]


def _read_part(path: str) -> dict[str, Any]:
  """A process's index (written whole by rename); ValueError if it is not readable JSON."""
  try:
    with open(path) as f:
      return dict(json.load(f))
  except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f"{path} is unreadable ({e})") from e


def finished_images(
  args: argparse.Namespace, settings: dict[str, Any]
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
  """The images of --out a rerun keeps, by number, and the old index (empty when fresh).

  Finished: listed in index.json or in a process's index (an interrupted multi-process run's)
  and present on disk (stage files too with --save_stages). Raises a UserError if --out holds
  images of other settings (unless --overwrite).
  """
  from imagen_jax import images

  try:
    found = [images.read_index(args.out), *(_read_part(p) for p in _part_files(args.out))]
  except ValueError as e:
    if args.overwrite:
      return {}, {}
    raise _refuse(args.out, f"an index that cannot be resumed ({errors.one_line(e)})") from e
  found = [index for index in found if index and index.get("images")]
  if args.overwrite or not found:
    return {}, {}
  done = {}
  for index in found:
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
    for entry in index["images"]:
      number = images.image_number(entry)
      files = [entry.get("file", "")] + list(entry.get("stage_files", {}).values())
      if number is not None and all(os.path.isfile(os.path.join(args.out, f)) for f in files):
        done[number] = entry
  return done, found[0]


# ================================================================================================
# The run
# ================================================================================================


def _load_model(args: argparse.Namespace, source: dict[str, Any]):
  from imagen_jax.inference import cascade

  mesh = mesh_config(args)
  if "bundle" in source:
    from imagen_jax.inference import bundle

    return bundle.load_bundle(args.bundle, t5_checkpoint=args.t5_checkpoint, mesh=mesh)
  return cascade.Cascade.from_stage_dirs(
    _stage_dirs(args),
    vocab_path=args.vocab,
    t5_checkpoint=args.t5_checkpoint,
    t5_size=args.t5_size,
    mesh=mesh,
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


def _process_index(out: str, header: dict[str, Any], done: dict[int, dict[str, Any]]):
  """This process's ImageIndex: index.json for one process, else its own part file."""
  import jax

  from imagen_jax import images

  class ProcessIndex(images.ImageIndex):
    @property
    def path(self) -> str:
      return os.path.join(self.directory, part_file(jax.process_index()))

  cls = images.ImageIndex if jax.process_count() == 1 else ProcessIndex
  return cls(out, header, done)


def merge_process_indexes(
  out: str, index: images.ImageIndex, old_seconds: dict[str, float]
) -> images.ImageIndex:
  """Process 0, after every process finished: one index.json listing every image of --out
  (each process's part file and what was done before), then the part files removed.

  Returns:
    The merged index (as written to index.json).
  """
  import jax

  from imagen_jax import images

  merged = images.ImageIndex(out, dict(index.header), dict(index.entries))
  seconds = dict(old_seconds)
  parts = [os.path.join(out, part_file(p)) for p in range(jax.process_count())]
  for part in (_read_part(p) for p in parts if jax.process_count() > 1 and os.path.isfile(p)):
    merged.entries.update({images.image_number(e): e for e in part["images"]})
    for field in ("resolution", "weights"):
      merged.header[field] = merged.header[field] or part.get(field)
    for name, s in part.get("seconds_per_stage", {}).items():  # each part started from the old
      seconds[name] = seconds.get(name, 0.0) + s - old_seconds.get(name, 0.0)
  if jax.process_count() > 1:
    merged.header["seconds_per_stage"] = seconds
  merged.write()
  for path in _part_files(out):  # all listed in index.json now (each held what was done)
    os.remove(path)
  return merged


def _my_batches(batches: list[range]) -> list[range]:
  """This process's share of the run's unfinished batches (round-robin over processes)."""
  import jax

  return batches[jax.process_index() :: jax.process_count()]


def run(args: argparse.Namespace) -> int:
  """Runs `imagen-jax sample` (in every process of a multi-host job: each samples its share of
  the batches on its own devices, writes its PNGs and its own index; process 0 merges them)."""
  # Every flag is checked before any model loads (loading can take minutes).
  prompts = read_prompts(args)
  total = len(prompts) * args.num_per_prompt
  _check_counts(args, total)
  source, num_stages = model_source(args)
  settings = stage_settings(args, num_stages)
  if args.stop_after is not None and not 1 <= args.stop_after <= num_stages:
    raise errors.UserError(f"--stop_after={args.stop_after}: must be between 1 and {num_stages}")
  start_jax(args, mesh_config(args))
  lowres, lowres_sha = read_lowres(args.lowres_image)
  run_key = run_settings(args, prompts, settings, source, lowres_sha)
  done, old_index = finished_images(args, run_key)
  status = _run_batches(args, prompts, settings, source, lowres, run_key, done, old_index)
  _end_processes()
  return status


def _end_processes() -> None:
  """Every process meets before the coordination service shuts down (no racing its barrier)."""
  import jax

  if jax.process_count() > 1:
    from imagen_jax import parallel

    parallel.wait_for_all_processes("sample_end")
    jax.distributed.shutdown()


def _run_batches(
  args: argparse.Namespace,
  prompts: list[str],
  settings: list[Any],
  source: dict[str, Any],
  lowres: Any,
  run_key: dict[str, Any],
  done: dict[int, dict[str, Any]],
  old_index: dict[str, Any],
) -> int:
  import jax

  from imagen_jax import parallel

  total = len(prompts) * args.num_per_prompt
  # Fixed batches of the whole image list: a batch with any unfinished image is sampled whole,
  # so a resumed run computes exactly the batches an uninterrupted one does (same bits).
  batch = min(args.batch_size, total)
  batches = [
    range(start, min(start + batch, total))
    for start in range(0, total, batch)
    if any(i not in done for i in range(start, min(start + batch, total)))
  ]
  # Every process has read --out before any writes to it, so all split the same batch list.
  parallel.wait_for_all_processes("sample_plan")
  mine = _my_batches(batches)
  old_seconds = dict(old_index.get("seconds_per_stage", {}))
  index = _process_index(
    args.out,
    {
      "run": run_key,
      "source": source,
      "weights": old_index.get("weights"),
      "total": total,
      "resolution": old_index.get("resolution"),
      "seconds_per_stage": dict(old_seconds),
    },
    done,
  )
  lead = jax.process_index() == 0
  grid_path = os.path.join(args.out, "grid.png")
  if not batches:
    if lead and _part_files(args.out):  # interrupted after its last image, before the merge
      merge_process_indexes(args.out, index, old_seconds)
    if lead and args.grid and not os.path.isfile(grid_path):
      _write_grid(args, index.entries)
    if lead:
      print(f"sample: all {total} images are already in {args.out} (index.json); nothing to do")
    return 0
  errors.check_writable_dir(args.out, "--out")
  index.write()  # before the model loads: records the run
  left = sum(len(b) for b in mine)
  resumed = f" (resuming: {len(done)} already done)" if done else ""
  where = (
    f"process {jax.process_index()}/{jax.process_count()}: " if jax.process_count() > 1 else ""
  )
  print(f"sample: {where}{left} images -> {args.out}{resumed}; loading the model", flush=True)

  new = 0
  if mine:
    model = _load_model(args, source)
    weights = [st.spec.get("source") for st in model.stages]
    if done and index.header["weights"] not in (None, weights):
      raise _refuse(args.out, f"{len(done)} images sampled with other weights (checkpoints)")
    index.header["weights"] = weights
    new = _sample_batches(args, model, prompts, settings, lowres, mine, batch, index)
  parallel.wait_for_all_processes("sample_written")
  if not lead:
    return 0
  merged = merge_process_indexes(args.out, index, old_seconds)
  if args.grid:
    _write_grid(args, merged.entries)
  timing = ", ".join(f"{n} {s:.1f}s" for n, s in merged.header["seconds_per_stage"].items())
  print(
    f"sample: {where}{new} images at {merged.header['resolution']}px -> {args.out} "
    f"({len(merged.entries)}/{total} done; {timing})"
  )
  return 0

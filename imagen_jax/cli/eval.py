"""`imagen-jax eval BENCHMARK`: score images.

  shapes     the synthetic grammar's attribute accuracy (`imagen_jax.evaluation.shapes`);
  fid        FID of a folder of images against reference statistics (.npz) or a folder;
  reference  write the FID statistics (.npz: mu, sigma) of a folder of images;
  clip       CLIP score of a folder of images against the prompts in its index.json;
  coco       the COCO-30K protocol: sample captions through the cascade, then FID + CLIP score.
FID uses pytorch-fid's Inception weights, which the user brings (`--inception=...pth`); CLIP
score a Hugging Face CLIP folder (`--clip=DIR`). Inputs are checked before the network loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from imagen_jax import errors
from imagen_jax.evaluation import shapes as eval_shapes
from imagen_jax.utils import files

WEIGHTS_HELP = (
  "pytorch-fid's FID Inception weights, pt_inception-2015-12-05-6726825d.pth (read without torch)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """One sub-parser per benchmark."""
  subs = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
  shapes = _add(subs, "shapes", "score sampled images against their prompts (shapes grammar)")
  eval_shapes.add_flags(shapes)

  fid = _add(subs, "fid", "FID of a folder of images against reference statistics or images")
  fid.add_argument("--images", required=True, help="folder of generated images (PNG/JPG)")
  fid.add_argument(
    "--reference",
    required=True,
    help="STATS.npz (mu, sigma: from `eval reference`, pytorch-fid or clean-fid) or a folder",
  )
  fid.add_argument("--inception", required=True, help=WEIGHTS_HELP)
  fid.add_argument("--out", default=None, help="write a JSON report (fid, counts, paths) here")
  fid.add_argument(
    "--matrix_sqrt",
    choices=("sqrtm", "eigh"),
    default="sqrtm",
    help="sqrtm: scipy's, as pytorch-fid (default, published numbers); eigh: the same trace "
    "via symmetric eigenvalues, several times faster on CPU",
  )
  _batch_size_flag(fid)

  ref = _add(
    subs,
    "reference",
    "write FID reference statistics (.npz) of a folder of images, precomputed shards or a "
    "prepared TFDS dataset",
  )
  ref.add_argument(
    "--source",
    required=True,
    help="a folder of images, a folder of precomputed shards (imagen-jax precompute --out) or a "
    "prepared TFDS dataset directory (e.g. coco_captions), one image per record",
  )
  ref.add_argument(
    "--split", default="train", help="shards / TFDS: the split to read (default train)"
  )
  ref.add_argument("--inception", required=True, help=WEIGHTS_HELP)
  ref.add_argument("--out", required=True, help="the statistics file to write (STATS.npz)")
  _batch_size_flag(ref)

  from imagen_jax.evaluation.clip import DEFAULT_BATCH_SIZE as CLIP_BATCH

  clip = _add(
    subs, "clip", "CLIP score of a folder of images against the prompts of its index.json"
  )
  clip.add_argument(
    "--images", required=True, help="folder written by `imagen-jax sample` (PNGs + index.json)"
  )
  clip.add_argument(
    "--clip",
    required=True,
    help="Hugging Face CLIP folder: config.json, model.safetensors, vocab.json, merges.txt "
    "(e.g. openai/clip-vit-large-patch14, the papers' ViT-L/14)",
  )
  clip.add_argument("--out", default=None, help="write a JSON report (clip_score, per image) here")
  clip.add_argument(
    "--batch_size",
    type=int,
    default=CLIP_BATCH,
    help=f"images per batch, split over all local devices (default {CLIP_BATCH}; rounded up to a "
    "multiple of the device count)",
  )

  _add_coco(subs)


def _add_coco(subs) -> None:
  from imagen_jax.cli import sample as sample_cli
  from imagen_jax.evaluation.clip import DEFAULT_BATCH_SIZE as CLIP_BATCH
  from imagen_jax.evaluation.fid import DEFAULT_BATCH_SIZE as FID_BATCH

  coco = _add(
    subs,
    "coco",
    "COCO-30K: sample captions through the cascade (resumable), then FID and CLIP score",
  )
  sample_cli.add_source_flags(coco)
  a = coco.add_argument
  a(
    "--captions",
    required=True,
    help="COCO captions_val2014.json ({'annotations': [{'image_id', 'caption'}]}) or a text "
    "file with one prompt per line",
  )
  a("--num", type=int, default=30000, help="images to draw, one caption each (default 30000)")
  a("--caption_seed", type=int, default=0, help="seed of the image and caption draw")
  a(
    "--reference",
    required=True,
    help="FID reference: STATS.npz (e.g. `eval reference` of the COCO val images) or a folder",
  )
  a("--inception", required=True, help=WEIGHTS_HELP)
  a(
    "--clip",
    required=True,
    help="Hugging Face CLIP folder (config.json, model.safetensors, vocab.json, merges.txt)",
  )
  a(
    "--out",
    required=True,
    help="run folder: prompts.txt/json, images/ (PNGs + index.json), report.json, report.md; "
    "rerunning the same command continues there",
  )
  a("--matrix_sqrt", choices=("sqrtm", "eigh"), default="sqrtm", help="as `eval fid`")
  a(
    "--fid_batch_size",
    type=int,
    default=FID_BATCH,
    help="images per Inception batch, split over all local devices",
  )
  a("--clip_batch_size", type=int, default=CLIP_BATCH, help="images per CLIP batch")
  sample_cli.add_sampling_flags(coco)
  sample_cli.add_device_flags(coco)


def _add(subs, name: str, help_text: str) -> argparse.ArgumentParser:
  return subs.add_parser(name, help=help_text, description=help_text)


def _batch_size_flag(parser: argparse.ArgumentParser) -> None:
  from imagen_jax.evaluation.fid import DEFAULT_BATCH_SIZE

  parser.add_argument(
    "--batch_size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    help=f"images per Inception batch, split over all local devices (default "
    f"{DEFAULT_BATCH_SIZE}, pytorch-fid's; rounded up to a multiple of the device count)",
  )


def run(args: argparse.Namespace) -> int:
  """Runs the chosen benchmark."""
  if args.benchmark == "shapes":
    return eval_shapes.run(args)
  if args.benchmark == "fid":
    return run_fid(args)
  if args.benchmark == "clip":
    return run_clip(args)
  if args.benchmark == "coco":
    return run_coco(args)
  return run_reference(args)


def _check_batch_size(args: argparse.Namespace) -> None:
  if args.batch_size < 1:
    raise errors.UserError(f"--batch_size={args.batch_size} must be at least 1")


def _check_common(args: argparse.Namespace) -> None:
  _check_batch_size(args)
  _check_inception(args.inception)


def _check_out_dir(path: str) -> None:
  errors.check_writable_dir(os.path.dirname(os.path.abspath(path)), "--out")
  if os.path.isdir(path):
    raise errors.UserError(f"--out={path!r} is a directory: pass a file path")


def _read_reference(reference: str) -> tuple[Any, list[str] | None]:
  """(saved statistics, None) or (None, image files) of --reference; checked, nothing computed."""
  from imagen_jax.evaluation import fid, inception

  if os.path.isfile(reference):
    ref_stats = fid.load_stats(reference)
    if ref_stats[0].shape[0] != inception.FEATURE_DIM:
      raise errors.UserError(
        f"--reference={reference!r} has {ref_stats[0].shape[0]}-d statistics, the FID "
        f"network gives {inception.FEATURE_DIM}-d pool3 features: use 2048-d statistics"
      )
    return ref_stats, None
  if os.path.isdir(reference):
    return None, fid.list_images(reference, "--reference")
  raise errors.UserError(
    f"--reference={reference!r} is neither a statistics .npz nor a folder of images"
  )


def _frechet(
  files: list[str], reference: tuple[Any, list[str] | None], extractor: Any, matrix_sqrt: str
) -> dict[str, Any]:
  """FID of `files` against a `_read_reference`; {"fid", counts, "warnings"} (also printed)."""
  from imagen_jax.evaluation import fid, inception

  ref_stats, ref_files = reference
  stats = fid.directory_stats(files, extractor, desc="fid images")
  if ref_files is not None:
    ref = fid.directory_stats(ref_files, extractor, desc="fid reference")
    ref_mu, ref_sigma, ref_count = ref.mean, ref.sigma, ref.count
  else:
    ref_mu, ref_sigma, ref_count = ref_stats
  notes = [
    n
    for n in (
      fid.few_images_warning(stats.count, inception.FEATURE_DIM),
      None if ref_count is None else fid.few_images_warning(ref_count, inception.FEATURE_DIM),
    )
    if n
  ]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", fid.FIDWarning)
    value = fid.frechet_distance(stats.mean, stats.sigma, ref_mu, ref_sigma, method=matrix_sqrt)
  notes += [str(w.message) for w in caught if issubclass(w.category, fid.FIDWarning)]
  notes = list(dict.fromkeys(notes))
  for note in notes:
    print(f"imagen-jax eval fid: warning: {note}", file=sys.stderr)
  print(f"FID: {value:.4f} ({stats.count} images vs {ref_count or 'unknown'} reference images)")
  return {
    "fid": value,
    "num_images": stats.count,
    "num_reference_images": ref_count,
    "warnings": notes,
  }


def run_fid(args: argparse.Namespace) -> int:
  """`eval fid`: prints FID and writes the optional JSON report."""
  from imagen_jax import images
  from imagen_jax.evaluation import fid

  _check_common(args)
  files = fid.list_images(args.images, "--images")
  reference = _read_reference(args.reference)
  if args.out:
    _check_out_dir(args.out)

  extractor = fid.FeatureExtractor.from_file(args.inception, args.batch_size)
  result = _frechet(files, reference, extractor, args.matrix_sqrt)
  if args.out:
    report = {
      **result,
      "images": os.path.abspath(args.images),
      "reference": os.path.abspath(args.reference),
      "inception": os.path.abspath(args.inception),
      "batch_size": args.batch_size,
      "matrix_sqrt": args.matrix_sqrt,
    }
    images.write_json(args.out, report)
  return 0


def run_reference(args: argparse.Namespace) -> int:
  """`eval reference`: writes mu, sigma (pytorch-fid's .npz layout) of an image source."""
  from imagen_jax.evaluation import fid, image_sources

  _check_common(args)
  source = image_sources.open_images(args.source, args.split, "--source")
  _check_out_dir(args.out)
  extractor = fid.FeatureExtractor.from_file(args.inception, args.batch_size)
  stats = fid.source_stats(source, extractor, desc="fid reference")
  fid.save_stats(args.out, stats.mean, stats.sigma, stats.count)
  print(
    f"wrote FID statistics of {stats.count} images ({source.kind}: {source.description}) "
    f"to {args.out}"
  )
  return 0


CLIP_DEFINITION = "mean over images of 100 * max(cos(image, prompt), 0)"


def _check_clip(directory: str) -> tuple[Any, list[str], Any]:
  """(config, weight files, tokenizer) of a --clip folder, checked before any weights load."""
  from imagen_jax.evaluation import clip_model, clip_tokenizer

  if not os.path.isdir(directory):
    raise errors.UserError(
      f"--clip={directory!r} is not a directory: pass {clip_model.WHERE_TO_GET}"
    )
  config = clip_model.read_config(directory)
  files = clip_model.weight_files(directory)
  return config, files, clip_tokenizer.CLIPTokenizer.from_directory(directory)


def _clip_cosines(
  pairs: list[tuple[str, str]], directory: str, checked: tuple[Any, list[str], Any], batch_size: int
) -> tuple[Any, Any]:
  """(per-image cosines, the scorer) of (image path, prompt) pairs."""
  from imagen_jax.evaluation import clip, clip_model

  config, files, tokenizer = checked
  model, variables = clip_model.load(directory, config, files)
  scorer = clip.Scorer(model, variables, tokenizer, batch_size)
  return clip.cosine_pairs(pairs, scorer), scorer


def run_clip(args: argparse.Namespace) -> int:
  """`eval clip`: prints the mean CLIP score and writes the optional JSON report."""
  from imagen_jax import images
  from imagen_jax.evaluation import clip

  _check_batch_size(args)
  pairs = images.indexed_prompts(args.images, "--images")
  checked = _check_clip(args.clip)
  if args.out:
    _check_out_dir(args.out)

  cosines, scorer = _clip_cosines(pairs, args.clip, checked, args.batch_size)
  scores = clip.from_cosine(cosines)
  value = float(scores.mean())
  print(
    f"CLIP score: {value:.4f} ({len(pairs)} images, {os.path.basename(os.path.normpath(args.clip))})"
  )
  if args.out:
    report = {
      "clip_score": value,
      "num_images": len(pairs),
      "images": os.path.abspath(args.images),
      "clip": os.path.abspath(args.clip),
      "batch_size": scorer.batch_size,
      "devices": len(scorer.devices),
      "definition": CLIP_DEFINITION,
      "per_image": [
        {
          "file": os.path.relpath(p, args.images),
          "prompt": t,
          "clip_score": float(s),
          "cosine": float(c),
        }
        for (p, t), s, c in zip(pairs, scores, cosines, strict=True)
      ],
    }
    images.write_json(args.out, report)
  return 0


def _check_inception(path: str) -> None:
  if not os.path.isfile(path):
    raise errors.UserError(
      f"--inception={path!r} is not a file: pass pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (from its releases page, or a pytorch-fid cache)"
    )


def _write_prompts(out: str, chosen: list[dict[str, str]]) -> str:
  """prompts.json (image ids + captions) and prompts.txt (what `sample` reads); its path."""
  from imagen_jax import images

  images.write_json(os.path.join(out, "prompts.json"), chosen)
  path = os.path.join(out, "prompts.txt")
  _write_text(path, "".join(c["caption"] + "\n" for c in chosen))
  return path


def _write_text(path: str, text: str) -> None:
  from imagen_jax import images

  # Whole or not at all: a kill mid-write leaves the old file (every host may write the same).
  with images._atomic_local_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def _coco_report(
  args: argparse.Namespace,
  chosen: list[dict[str, str]],
  pairs: list[tuple[str, str]],
  fid_result: dict[str, Any],
  scores: Any,
  devices: int,
) -> dict[str, Any]:
  """report.json: the headline numbers, what they were measured with, and each image's score."""
  from imagen_jax import images

  index = images.read_index(os.path.join(args.out, "images"))
  return {
    **fid_result,
    "clip_score": float(scores.mean()),
    "clip_definition": CLIP_DEFINITION,
    "settings": {
      "captions": os.path.abspath(args.captions),
      "captions_sha256": files.sha256(args.captions),
      "num": args.num,
      "caption_seed": args.caption_seed,
      "num_per_prompt": args.num_per_prompt,
      "reference": os.path.abspath(args.reference),
      "inception": os.path.abspath(args.inception),
      "clip": os.path.abspath(args.clip),
      "matrix_sqrt": args.matrix_sqrt,
      "sampling": index["run"],
      "weights": index.get("weights"),
      "devices": devices,
    },
    "per_image": [
      {
        "file": os.path.relpath(p, args.out),
        "image_id": chosen[k // args.num_per_prompt]["image_id"],
        "prompt": t,
        "clip_score": float(s),
      }
      for k, ((p, t), s) in enumerate(zip(pairs, scores, strict=True))
    ],
  }


def _sample_args(args: argparse.Namespace, prompts_file: str, out: str) -> argparse.Namespace:
  """`imagen-jax sample`'s arguments: its own defaults for every flag (eval coco need not mount
  them all), then the values eval coco was given, then the drawn prompts and OUT/images."""
  from imagen_jax.cli import sample as sample_cli

  parser = argparse.ArgumentParser(add_help=False)
  sample_cli.add_arguments(parser)
  source = f"--bundle={args.bundle}" if args.bundle else f"--stage_dirs={args.stage_dirs}"
  merged = vars(parser.parse_args([source, f"--out={out}"]))
  merged.update({k: v for k, v in vars(args).items() if k in merged and k != "out"})
  return argparse.Namespace(**{**merged, "prompts_file": prompts_file})


def run_coco(args: argparse.Namespace) -> int:
  """`eval coco`: draws the prompts, samples them with `imagen-jax sample` into OUT/images
  (which resumes a killed run), then writes FID + CLIP score to OUT/report.json and report.md."""
  from imagen_jax import images
  from imagen_jax.cli import sample as sample_cli
  from imagen_jax.evaluation import clip, coco, fid

  # Everything is checked before sampling (hours at 30K) and before any weights load.
  for flag in ("fid_batch_size", "clip_batch_size"):
    if getattr(args, flag) < 1:
      raise errors.UserError(f"--{flag}={getattr(args, flag)} must be at least 1")
  _check_inception(args.inception)
  reference = _read_reference(args.reference)
  checked_clip = _check_clip(args.clip)
  chosen = coco.select(coco.read_captions(args.captions), args.num, args.caption_seed)
  errors.check_writable_dir(args.out, "--out")

  images_dir = os.path.join(args.out, "images")
  status = sample_cli.run(_sample_args(args, _write_prompts(args.out, chosen), images_dir))
  if status:
    return status

  pairs = images.indexed_prompts(images_dir, "--out")
  extractor = fid.FeatureExtractor.from_file(args.inception, args.fid_batch_size)
  result = _frechet([p for p, _ in pairs], reference, extractor, args.matrix_sqrt)
  cosines, scorer = _clip_cosines(pairs, args.clip, checked_clip, args.clip_batch_size)
  scores = clip.from_cosine(cosines)
  print(f"CLIP score: {float(scores.mean()):.4f} ({len(pairs)} images)")
  report = _coco_report(args, chosen, pairs, result, scores, len(scorer.devices))
  images.write_json(os.path.join(args.out, "report.json"), report)
  _write_text(os.path.join(args.out, "report.md"), coco.markdown(report))
  print(f"eval coco: report -> {os.path.join(args.out, 'report.json')} (and report.md)")
  return 0

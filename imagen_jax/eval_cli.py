"""`imagen-jax eval BENCHMARK`: score images.

  shapes     the synthetic grammar's attribute accuracy (`imagen_jax.eval_shapes`);
  fid        FID of a folder of images against reference statistics (.npz) or a folder;
  reference  write the FID statistics (.npz: mu, sigma) of a folder of images;
  clip       CLIP score of a folder of images against the prompts in its index.json.
FID uses pytorch-fid's Inception weights, which the user brings (`--inception=...pth`); CLIP
score a Hugging Face CLIP folder (`--clip=DIR`). Inputs are checked before the network loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from imagen_jax import errors, eval_shapes

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

  ref = _add(subs, "reference", "write FID reference statistics (.npz) of a folder of images")
  ref.add_argument("--source", required=True, help="folder of reference images (PNG/JPG)")
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


def _add(subs, name: str, help_text: str) -> argparse.ArgumentParser:
  return subs.add_parser(name, help=help_text, description=help_text)


def _batch_size_flag(parser: argparse.ArgumentParser) -> None:
  from imagen_jax.evaluation.fid import DEFAULT_BATCH_SIZE

  parser.add_argument(
    "--batch_size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    help=f"images per Inception batch (default {DEFAULT_BATCH_SIZE}, pytorch-fid's)",
  )


def run(args: argparse.Namespace) -> int:
  """Runs the chosen benchmark."""
  if args.benchmark == "shapes":
    return eval_shapes.run(args)
  if args.benchmark == "fid":
    return run_fid(args)
  if args.benchmark == "clip":
    return run_clip(args)
  return run_reference(args)


def _check_batch_size(args: argparse.Namespace) -> None:
  if args.batch_size < 1:
    raise errors.UserError(f"--batch_size={args.batch_size} must be at least 1")


def _check_common(args: argparse.Namespace) -> None:
  _check_batch_size(args)
  if not os.path.isfile(args.inception):
    raise errors.UserError(
      f"--inception={args.inception!r} is not a file: pass pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (from its releases page, or a pytorch-fid cache)"
    )


def _check_out_dir(path: str) -> None:
  errors.check_writable_dir(os.path.dirname(os.path.abspath(path)), "--out")
  if os.path.isdir(path):
    raise errors.UserError(f"--out={path!r} is a directory: pass a file path")


def run_fid(args: argparse.Namespace) -> int:
  """`eval fid`: prints FID and writes the optional JSON report."""
  from imagen_jax import images
  from imagen_jax.evaluation import fid, inception

  _check_common(args)
  files = fid.list_images(args.images, "--images")
  ref_stats, ref_files = None, None
  if os.path.isfile(args.reference):
    ref_stats = fid.load_stats(args.reference)
    if ref_stats[0].shape[0] != inception.FEATURE_DIM:
      raise errors.UserError(
        f"--reference={args.reference!r} has {ref_stats[0].shape[0]}-d statistics, the FID "
        f"network gives {inception.FEATURE_DIM}-d pool3 features: use 2048-d statistics"
      )
  elif os.path.isdir(args.reference):
    ref_files = fid.list_images(args.reference, "--reference")
  else:
    raise errors.UserError(
      f"--reference={args.reference!r} is neither a statistics .npz nor a folder of images"
    )
  if args.out:
    _check_out_dir(args.out)

  extractor = fid.FeatureExtractor.from_file(args.inception, args.batch_size)
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
    value = fid.frechet_distance(
      stats.mean, stats.sigma, ref_mu, ref_sigma, method=args.matrix_sqrt
    )
  notes += [str(w.message) for w in caught if issubclass(w.category, fid.FIDWarning)]
  for note in dict.fromkeys(notes):
    print(f"imagen-jax eval fid: warning: {note}", file=sys.stderr)
  print(f"FID: {value:.4f} ({stats.count} images vs {ref_count or 'unknown'} reference images)")
  if args.out:
    report = {
      "fid": value,
      "num_images": stats.count,
      "num_reference_images": ref_count,
      "images": os.path.abspath(args.images),
      "reference": os.path.abspath(args.reference),
      "inception": os.path.abspath(args.inception),
      "batch_size": args.batch_size,
      "matrix_sqrt": args.matrix_sqrt,
      "warnings": list(dict.fromkeys(notes)),
    }
    images.write_json(args.out, report)
  return 0


def run_reference(args: argparse.Namespace) -> int:
  """`eval reference`: writes mu, sigma (pytorch-fid's .npz layout) of a folder of images."""
  from imagen_jax.evaluation import fid

  _check_common(args)
  files = fid.list_images(args.source, "--source")
  _check_out_dir(args.out)
  extractor = fid.FeatureExtractor.from_file(args.inception, args.batch_size)
  stats = fid.directory_stats(files, extractor, desc="fid reference")
  fid.save_stats(args.out, stats.mean, stats.sigma, stats.count)
  print(f"wrote FID statistics of {stats.count} images to {args.out}")
  return 0


def run_clip(args: argparse.Namespace) -> int:
  """`eval clip`: prints the mean CLIP score and writes the optional JSON report."""
  from imagen_jax import images
  from imagen_jax.evaluation import clip, clip_model, clip_tokenizer

  _check_batch_size(args)
  pairs = clip.indexed_prompts(args.images, "--images")
  if not os.path.isdir(args.clip):
    raise errors.UserError(
      f"--clip={args.clip!r} is not a directory: pass {clip_model.WHERE_TO_GET}"
    )
  config = clip_model.read_config(args.clip)
  files = clip_model.weight_files(args.clip)
  tokenizer = clip_tokenizer.CLIPTokenizer.from_directory(args.clip)
  if args.out:
    _check_out_dir(args.out)

  model, variables = clip_model.load(args.clip, config, files)
  scorer = clip.Scorer(model, variables, tokenizer, args.batch_size)
  cosines = clip.cosine_pairs(pairs, scorer)
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
      "definition": "mean over images of 100 * max(cos(image, prompt), 0)",
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

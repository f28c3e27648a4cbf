"""`imagen-jax export`: training MODEL_DIRs (or IF dirs) -> an inference bundle."""

from __future__ import annotations

import os

from imagen_jax import errors
from imagen_jax.inference.bundle import FORMAT_VERSION, PARAM_DTYPES, export_bundle


def add_arguments(parser) -> None:
  """Flags of `imagen-jax export`."""
  a = parser.add_argument
  a(
    "--stage_dirs",
    required=True,
    help="comma-separated training MODEL_DIRs, base stage first (if:PATH = a DeepFloyd IF dir)",
  )
  a("--out", required=True, help="bundle directory to write (must not exist)")
  a("--overwrite", action="store_true", help="replace an existing --out bundle")
  a("--param_dtype", default="float32", choices=PARAM_DTYPES, help="dtype of the stored params")
  a(
    "--no_portable_step",
    action="store_true",
    help="skip the jax.export (StableHLO) denoising step per stage",
  )
  a("--vocab", default=None, help="SentencePiece model (default: found beside the stages' data)")
  a("--t5_checkpoint", default=None, help="T5 checkpoint to reference (default: the data's)")
  a("--t5_size", default=None, help="T5 size (default: the data manifest's)")


def run(args) -> int:
  """Runs `imagen-jax export`."""

  from imagen_jax.inference import cascade

  stage_dirs = cascade.checked_stage_dirs(args.stage_dirs)
  if os.path.exists(args.out) and not args.overwrite:
    raise FileExistsError(f"--out={args.out!r} already exists; pass --overwrite to replace it")
  # Before any stage loads (minutes for big ones): the bundle is written beside --out.
  errors.check_writable_dir(
    os.path.dirname(os.path.abspath(args.out)), f"--out={args.out}: its parent directory"
  )
  stages = [cascade.load_stage_dir(d) for d in stage_dirs]
  ref, vocab = cascade.resolve_encoder_reference(
    stages, args.vocab, args.t5_checkpoint, args.t5_size
  )
  manifest = export_bundle(
    stages,
    ref,
    vocab,
    args.out,
    overwrite=args.overwrite,
    param_dtype=args.param_dtype,
    portable_step=not args.no_portable_step,
  )
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in manifest["files"])
  print(
    f"export: {len(stages)} stages -> {args.out} ({len(manifest['files'])} files, "
    f"{size / 2**20:.1f} MiB, format_version {FORMAT_VERSION})"
  )
  return 0

"""`imagen-jax precompute`: flags → `precompute.PrecomputeConfig` → `precompute.run_precompute`."""

from __future__ import annotations

import logging
import os

from imagen_jax.data import shards
from imagen_jax.data.precompute import (
  OLD_RANDOM_WEIGHTS,
  RANDOM_WEIGHTS,
  PrecomputeConfig,
  canonical_t5_checkpoint,
  run_precompute,
)

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
  """Flags of `imagen-jax precompute`."""
  parser.description = (
    "Encode captions once with the frozen T5 encoder and write resumable TFRecord shards of "
    "{key, caption, image bytes, bf16 embedding of the real tokens, token length} + a manifest. "
    "Rerunning with the same flags skips finished shards that pass cheap checks and rewrites "
    "the others; add --verify to also check every record's CRCs."
  )
  _add_data_flags(parser.add_argument_group("data").add_argument)
  _add_encoder_flags(parser.add_argument_group("text encoder and output").add_argument)
  _add_job_flags(parser.add_argument_group("the job").add_argument)


def _add_data_flags(a) -> None:
  """What to read: the source, task or mixture, and its filters."""
  a(
    "--source",
    default=None,
    help="shapes | image_text_folder | a prepared TFDS name (e.g. coco_captions), read by record "
    "index; webdataset = --task=imagen_webdataset",
  )
  a(
    "--task",
    default=None,
    help="a registered seqio Task: imagen_shapes | imagen_image_text_folder | "
    "imagen_coco_captions | imagen_webdataset | one a --module registers",
  )
  a("--mixture", default=None, help="a registered seqio Mixture (one set of shards, rates kept)")
  a(
    "--module",
    action="append",
    default=None,
    help="Python module imported before the lookup, registering tasks / mixtures (repeatable)",
  )
  a(
    "--source_dir",
    default=None,
    help="image_text_folder: the folder of images + captions; webdataset: a directory or glob "
    "of .tar shards (local or gs://)",
  )
  a(
    "--min_image_size",
    type=int,
    default=0,
    help="webdataset: drop images whose shorter side is smaller (0 = off)",
  )
  a(
    "--max_aspect_ratio",
    type=float,
    default=0.0,
    help="webdataset: drop images whose long/short side ratio is larger (0 = off)",
  )
  a(
    "--min_caption_length",
    type=int,
    default=0,
    help="webdataset: drop shorter captions (characters)",
  )
  a("--max_caption_length", type=int, default=0, help="webdataset: drop longer captions (0 = off)")
  a(
    "--tfds_data_dir",
    default=None,
    help="TFDS data dir (default OUT/tfds for shapes / image_text_folder, else $TFDS_DATA_DIR or ~/tensorflow_datasets)",
  )


def _add_encoder_flags(a) -> None:
  """The frozen encoder and where its shards go."""
  a("--out", required=True, help="output directory for shards and manifest.json")
  a("--vocab", required=True, help="SentencePiece .model of the T5 vocabulary")
  a(
    "--t5_checkpoint",
    default=RANDOM_WEIGHTS,
    help=f"T5 encoder checkpoint (T5X / HF); {RANDOM_WEIGHTS!r} = random weights (demos, tests)",
  )
  a("--t5_size", default="base", help="T5 v1.1 size: tiny | small | base | large | xl | xxl")
  a("--max_length", type=int, default=128, help="text length in tokens (EOS included)")
  a(
    "--t5_padding",
    default="zero",
    choices=("zero", "keep"),
    help="embeddings at padding positions: zero (Imagen) | keep (DeepFloyd IF fine-tuning)",
  )


def _add_job_flags(a) -> None:
  """How the job is cut into shards and hosts, and what it does besides encoding."""
  a("--examples_per_shard", type=int, default=1024, help="source examples per shard")
  a(
    "--split", action="append", default=None, help="split(s) to process (repeatable; default train)"
  )
  a(
    "--num_examples",
    type=int,
    default=10_000,
    help="shapes: train examples; tasks / mixtures: take (at most) the stream's first N",
  )
  a("--num_validation", type=int, default=1_000, help="shapes: validation examples")
  a("--resolution", type=int, default=64, help="shapes: image resolution")
  a("--seed", type=int, default=0, help="shapes: generation seed; mixtures: sampling seed")
  a(
    "--batch_size",
    type=int,
    default=64,
    help="encoder batch (rounded up to the local device count)",
  )
  a("--process_index", type=int, default=None, help="this host (default: jax.process_index())")
  a(
    "--process_count", type=int, default=None, help="number of hosts (default: jax.process_count())"
  )
  a("--no_progress", action="store_true", help="no progress bars (ours and TFDS's)")
  a(
    "--verify",
    action="store_true",
    help="also read every finished shard and check each record's CRCs; rewrites the bad ones",
  )
  a(
    "--after_shard",
    default=None,
    metavar="MODULE:FUNCTION",
    help="call FUNCTION(path) after each shard is complete, e.g. to copy it to a bucket "
    "(MODULE is imported like --module's)",
  )


def _t5_checkpoint_flag(value: str) -> str:
  if value == OLD_RANDOM_WEIGHTS:
    logger.warning(
      "precompute: --t5_checkpoint=%s is deprecated; spell it --t5_checkpoint=%s",
      OLD_RANDOM_WEIGHTS,
      RANDOM_WEIGHTS,
    )
  return canonical_t5_checkpoint(value)


def run(args) -> int:
  """Runs `imagen-jax precompute`; prints throughput and size per example."""
  if args.process_index is None or args.process_count is None:
    from imagen_jax import parallel

    args.process_index, args.process_count = parallel.process_placement(
      args.process_index, args.process_count
    )
  cfg = PrecomputeConfig(
    source=args.source,
    task=args.task,
    mixture=args.mixture,
    modules=tuple(args.module or ()),
    min_image_size=args.min_image_size,
    max_aspect_ratio=args.max_aspect_ratio,
    min_caption_length=args.min_caption_length,
    max_caption_length=args.max_caption_length,
    out=args.out,
    vocab=args.vocab,
    t5_checkpoint=_t5_checkpoint_flag(args.t5_checkpoint),
    t5_size=args.t5_size,
    max_length=args.max_length,
    t5_padding=args.t5_padding,
    examples_per_shard=args.examples_per_shard,
    splits=tuple(args.split or ["train"]),
    source_dir=args.source_dir,
    tfds_data_dir=args.tfds_data_dir,
    num_examples=args.num_examples,
    num_validation=args.num_validation,
    resolution=args.resolution,
    seed=args.seed,
    batch_size=args.batch_size,
    process_index=args.process_index,
    process_count=args.process_count,
    progress=not args.no_progress,
    verify=args.verify,
    after_shard=args.after_shard,
  )
  manifest = run_precompute(cfg)
  st = manifest["stats"]
  checked = "CRC-verified" if cfg.verify else "checked"
  print(
    f"precompute: {st['examples']} examples in {st['seconds']:.1f}s "
    f"({st['examples_per_s']:.1f} examples/s), {st['shards_written']} shards written "
    f"({st['shards_rewritten']} rewritten as bad), {st['shards_skipped']} already complete "
    f"({checked}), {st['bytes_per_example']:.0f} bytes/example; "
    f"manifest {os.path.join(cfg.out, shards.MANIFEST)}"
  )
  for split, entry in manifest["splits"].items() if cfg.uses_tasks else ():
    if split not in cfg.splits:
      continue
    per_task = entry.get("task_records")
    skipped = entry.get("skipped")
    pending = "pending other hosts" if per_task is None else None
    print(
      f"precompute: {split}: {entry['num_source_examples']} examples taken from "
      f"{manifest['source']['name']}; records per task: {pending or _counts(per_task)}; "
      f"skipped: {pending or _counts(skipped) or 'none'}"
    )
  return 0


def _counts(counts: dict[str, int]) -> str:
  return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

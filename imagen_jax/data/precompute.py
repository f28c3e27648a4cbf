"""The embedding precompute job: source -> frozen T5 encoder -> sharded TFRecords + manifest.

Work is cut into shards of `examples_per_shard` source examples in the source's on-disk order;
process p of P writes shards p, p + P, p + 2P, ... (at least one each). The frozen encoder is
sharded over the process's local devices only: hosts never talk to each other, so one slow or
restarted host does not stall the rest. A rerun skips shards already complete.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_jax.data import records, shards

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = ("shapes", "image_text_folder")


@dataclasses.dataclass
class PrecomputeConfig:
  """What to precompute; see `imagen-jax precompute --help` for each field."""

  source: str
  out: str
  vocab: str
  t5_checkpoint: str = "none"
  t5_size: str = "base"
  max_length: int = 128
  examples_per_shard: int = 1024
  splits: Sequence[str] = ("train",)
  source_dir: str | None = None
  tfds_data_dir: str | None = None
  num_examples: int = 10_000
  num_validation: int = 1_000
  resolution: int = 64
  seed: int = 0
  batch_size: int = 64
  process_index: int = 0
  process_count: int = 1
  progress: bool = True
  # Test hook: sleep this long after each shard, so a test can kill the job between shards.
  debug_shard_delay_s: float = 0.0

  def validate(self) -> None:
    """Raises ValueError / FileNotFoundError on bad arguments, before any expensive work."""
    if self.max_length < 1:
      raise ValueError(f"--max_length={self.max_length}; must be >= 1")
    if self.examples_per_shard < 1:
      raise ValueError(f"--examples_per_shard={self.examples_per_shard}; must be >= 1")
    if self.batch_size < 1:
      raise ValueError(f"--batch_size={self.batch_size}; must be >= 1")
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(
        f"process_index={self.process_index} must be in [0, process_count={self.process_count})"
      )
    if not os.path.isfile(self.vocab):
      raise FileNotFoundError(f"--vocab={self.vocab!r}: no such SentencePiece model file")
    if self.t5_checkpoint != "none" and not os.path.exists(self.t5_checkpoint):
      raise FileNotFoundError(f"--t5_checkpoint={self.t5_checkpoint!r} does not exist")
    if self.source == "image_text_folder" and not self.source_dir:
      raise ValueError("--source=image_text_folder needs --source_dir=FOLDER")
    if self.source == "shapes" and (self.num_examples < 1 or self.resolution < 8):
      raise ValueError(
        f"--num_examples={self.num_examples} must be >= 1 and --resolution={self.resolution} "
        ">= 8 for shapes"
      )
    if not self.splits:
      raise ValueError("--split: give at least one split")


def prepare_source(cfg: PrecomputeConfig) -> str:
  """Builds (shapes / image_text_folder) or finds (other TFDS names) the source dataset.

  Returns:
    The TFDS dataset directory (holding dataset_info.json).
  """
  tfds_dir = cfg.tfds_data_dir or os.path.join(cfg.out, "tfds")
  if cfg.source in BUILTIN_SOURCES and cfg.process_index != 0:
    # Process 0 builds; the others wait for it rather than racing on the same directory.
    return _wait_for_tfds(tfds_dir, cfg.source)
  if cfg.source == "shapes":
    from imagen_jax.data import shapes

    builder = shapes.build(
      tfds_dir, cfg.resolution, cfg.num_examples, cfg.num_validation, seed=cfg.seed
    )
    return os.fspath(builder.data_path)
  if cfg.source == "image_text_folder":
    from imagen_jax.data import image_text_folder

    builder = image_text_folder.build(cfg.source_dir, tfds_dir)
    return os.fspath(builder.data_path)
  data_dir = cfg.tfds_data_dir or os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )
  return records.find_tfds_dir(data_dir, cfg.source)


def _wait_for_tfds(tfds_dir: str, name: str, timeout_s: float = 3600) -> str:
  deadline = time.time() + timeout_s
  while True:
    try:
      return records.find_tfds_dir(tfds_dir, name)
    except FileNotFoundError:
      if time.time() > deadline:
        raise
      time.sleep(5)


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image, reading only its header."""
  from PIL import Image

  with Image.open(io.BytesIO(data)) as im:
    return im.height, im.width


def plan_shards(num_examples: int, examples_per_shard: int, process_count: int) -> list[range]:
  """Source-example ranges of every shard; shrinks shards so each process gets at least one.

  Raises:
    ValueError: fewer examples than processes.
  """
  if num_examples < process_count:
    raise ValueError(
      f"{num_examples} examples cannot give each of {process_count} processes a shard"
    )
  per_shard = min(examples_per_shard, math.ceil(num_examples / process_count))
  num_shards = max(math.ceil(num_examples / per_shard), process_count)
  bounds = [min(num_examples, i * per_shard) for i in range(num_shards + 1)]
  return [range(bounds[i], bounds[i + 1]) for i in range(num_shards)]


class _Progress:
  """tqdm bar with examples/s and ETA (or periodic log lines without a terminal)."""

  def __init__(self, total: int, enabled: bool):
    self.start = time.time()
    self.count = 0
    self.bar = None
    if enabled:
      from tqdm import tqdm

      self.bar = tqdm(total=total, unit="ex", desc="precompute", smoothing=0.1)

  def update(self, n: int) -> None:
    self.count += n
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> float:
    if self.bar is not None:
      self.bar.close()
    elapsed = max(time.time() - self.start, 1e-9)
    return self.count / elapsed


def run_precompute(cfg: PrecomputeConfig, encoder: Any = None) -> dict[str, Any]:
  """Runs the whole job for this process.

  Args:
    cfg: the job.
    encoder: an already loaded TextEncoder (tests); by default loaded from cfg.

  Returns:
    The manifest, plus 'stats' {'examples', 'seconds', 'examples_per_s', 'bytes_written',
    'shards_written', 'shards_skipped'} for this process.
  """
  import tensorflow as tf

  from imagen_jax.text import vocabulary

  cfg.validate()
  tf.io.gfile.makedirs(cfg.out)
  vocab = vocabulary.load_vocabulary(cfg.vocab)
  tfds_dir = prepare_source(cfg)
  sources = {split: records.TfdsSource(tfds_dir, split) for split in cfg.splits}
  plans = {
    split: plan_shards(len(src), cfg.examples_per_shard, cfg.process_count)
    for split, src in sources.items()
  }
  if encoder is None:
    encoder = _load_encoder(cfg)
  if encoder.max_length != cfg.max_length:
    raise ValueError(
      f"the text encoder's max_length {encoder.max_length} != --max_length={cfg.max_length}"
    )

  todo = []
  skipped = 0
  for split, plan in plans.items():
    for s in range(cfg.process_index, len(plan), cfg.process_count):
      path = os.path.join(cfg.out, shards.shard_name(split, s, len(plan)))
      if shards.shard_is_complete(path):
        skipped += 1
      else:
        # Leftovers of a killed run; only this process ever writes shard s, so they are ours.
        for stale in tf.io.gfile.glob(path + ".tmp-*"):
          tf.io.gfile.remove(stale)
        todo.append((split, s, path))
  total = sum(len(plans[split][s]) for split, s, _ in todo)
  logger.info("precompute: %d shards to write, %d already complete", len(todo), skipped)

  progress = _Progress(total, cfg.progress)
  written_bytes, written = 0, 0
  t0 = time.time()
  for split, s, path in todo:
    payloads, sizes = _encode_range(sources[split], plans[split][s], vocab, encoder, cfg, progress)
    meta = shards.write_shard(path, payloads, sizes)
    written_bytes += meta["size_bytes"]
    written += 1
    if cfg.debug_shard_delay_s:
      time.sleep(cfg.debug_shard_delay_s)
  seconds = time.time() - t0
  rate = progress.close()

  manifest = _manifest(cfg, tfds_dir, sources, plans, encoder, vocabulary.file_sha256(cfg.vocab))
  shards.atomic_write_text(os.path.join(cfg.out, shards.MANIFEST), _dumps(manifest))
  examples = progress.count
  manifest["stats"] = {
    "examples": examples,
    "seconds": seconds,
    "examples_per_s": rate if examples else 0.0,
    "bytes_written": written_bytes,
    "bytes_per_example": written_bytes / examples if examples else 0.0,
    "shards_written": written,
    "shards_skipped": skipped,
  }
  return manifest


def _dumps(obj: Any) -> str:
  import json

  return json.dumps(obj, indent=1, sort_keys=True)


def _load_encoder(cfg: PrecomputeConfig):
  import jax

  from imagen_jax import parallel
  from imagen_jax.text import encoder as text_encoder

  # 'none' = random weights (demos, tests); the manifest's encoder identity records it.
  checkpoint = None if cfg.t5_checkpoint == "none" else cfg.t5_checkpoint
  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices())
  return text_encoder.load_text_encoder(
    checkpoint, cfg.vocab, size=cfg.t5_size, max_length=cfg.max_length, mesh=mesh
  )


def _encode_range(source, indices: range, vocab, encoder, cfg: PrecomputeConfig, progress):
  """Reads, tokenizes and encodes the source examples `indices` into shard records."""
  from imagen_jax.text import vocabulary

  pairs = []
  for i in indices:
    try:
      pairs.extend(source.pairs(i))
    except records.CorruptRecordError as e:
      logger.warning("skipping corrupt source record %d of %s: %s", i, source.split, e)
  payloads, sizes = [], []
  batch = _encode_batch_size(cfg.batch_size)
  for start in range(0, len(pairs), batch):
    chunk = pairs[start : start + batch]
    tokens = vocabulary.tokenize(vocab, [c for _, c, _ in chunk], cfg.max_length)
    # A fixed batch shape: the last, short batch is padded so the encoder never recompiles.
    padded = np.zeros((batch, cfg.max_length), np.int32)
    padded[: len(chunk)] = tokens
    emb, mask = encoder.encode_tokens(padded)
    emb, mask = np.asarray(emb), np.asarray(mask)
    for j, (key, text, image) in enumerate(chunk):
      n = int(mask[j].sum())
      h, w = image_size(image)
      sizes.append((h, w))
      payloads.append(
        shards.make_record(key, text, image, h, w, tokens[j, :n], emb[j, :n].astype(np.float32))
      )
    progress.update(len(chunk))
  return payloads, sizes


def _encode_batch_size(batch_size: int) -> int:
  import jax

  n = jax.local_device_count()
  return max(n, math.ceil(batch_size / n) * n)


def _count_records(out: str, names: list[str]) -> int | None:
  """Records over all shards, or None while another process is still writing some."""
  import json

  import tensorflow as tf

  total = 0
  for name in names:
    path = os.path.join(out, name)
    if not shards.shard_is_complete(path):
      return None
    with tf.io.gfile.GFile(path + ".json") as f:
      total += int(json.load(f)["num_records"])
  return total


def _manifest(cfg, tfds_dir, sources, plans, encoder, vocab_sha) -> dict[str, Any]:
  identity = dict(encoder.identity())
  splits = {}
  for split, plan in plans.items():
    names = [shards.shard_name(split, s, len(plan)) for s in range(len(plan))]
    splits[split] = {
      "num_source_examples": len(sources[split]),
      "num_records": _count_records(cfg.out, names),
      "num_shards": len(plan),
      "shards": names,
    }
  return {
    "format": shards.FORMAT,
    "encoder": identity,
    "vocab_sha256": vocab_sha,
    "vocab_file": os.path.basename(cfg.vocab),
    "max_length": cfg.max_length,
    "embedding_width": int(encoder.width),
    "embedding_dtype": "bfloat16",
    "embedding_holds": "real tokens only (EOS included); re-pad to max_length with zeros",
    "source": {"name": cfg.source, "tfds_dir": tfds_dir, "seed": cfg.seed},
    "examples_per_shard": cfg.examples_per_shard,
    "process_count": cfg.process_count,
    "splits": splits,
  }


# ----------------------------------------------------------------------------------------------
# `imagen-jax precompute`
# ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
  """Flags of `imagen-jax precompute`."""
  parser.description = (
    "Encode captions once with the frozen T5 encoder and write resumable TFRecord shards of "
    "{key, caption, image bytes, bf16 embedding of the real tokens, token length} + a manifest. "
    "Rerunning with the same flags skips finished shards."
  )
  a = parser.add_argument
  a(
    "--source",
    required=True,
    help="shapes | image_text_folder | a prepared TFDS name (e.g. coco_captions)",
  )
  a("--source_dir", default=None, help="image_text_folder: the folder of images + captions")
  a(
    "--tfds_data_dir",
    default=None,
    help="TFDS data dir (default OUT/tfds for shapes / image_text_folder, else $TFDS_DATA_DIR or ~/tensorflow_datasets)",
  )
  a("--out", required=True, help="output directory for shards and manifest.json")
  a("--vocab", required=True, help="SentencePiece .model of the T5 vocabulary")
  a(
    "--t5_checkpoint",
    default="none",
    help="T5 encoder checkpoint (T5X / HF); 'none' = random weights (demos, tests)",
  )
  a("--t5_size", default="base", help="T5 v1.1 size: tiny | small | base | large | xl | xxl")
  a("--max_length", type=int, default=128, help="text length in tokens (EOS included)")
  a("--examples_per_shard", type=int, default=1024, help="source examples per shard")
  a(
    "--split", action="append", default=None, help="split(s) to process (repeatable; default train)"
  )
  a("--num_examples", type=int, default=10_000, help="shapes: train examples")
  a("--num_validation", type=int, default=1_000, help="shapes: validation examples")
  a("--resolution", type=int, default=64, help="shapes: image resolution")
  a("--seed", type=int, default=0, help="shapes: generation seed")
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
  a("--no_progress", action="store_true", help="no progress bar")
  a("--debug_shard_delay_s", type=float, default=0.0, help=argparse_suppress())


def argparse_suppress():
  import argparse

  return argparse.SUPPRESS


def run(args) -> int:
  """Runs `imagen-jax precompute`; prints throughput and size per example."""
  if args.process_index is None or args.process_count is None:
    import jax

    args.process_index = jax.process_index() if args.process_index is None else args.process_index
    args.process_count = jax.process_count() if args.process_count is None else args.process_count
  cfg = PrecomputeConfig(
    source=args.source,
    out=args.out,
    vocab=args.vocab,
    t5_checkpoint=args.t5_checkpoint,
    t5_size=args.t5_size,
    max_length=args.max_length,
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
    debug_shard_delay_s=args.debug_shard_delay_s,
  )
  manifest = run_precompute(cfg)
  st = manifest["stats"]
  print(
    f"precompute: {st['examples']} examples in {st['seconds']:.1f}s "
    f"({st['examples_per_s']:.1f} examples/s), {st['shards_written']} shards written, "
    f"{st['shards_skipped']} already complete, {st['bytes_per_example']:.0f} bytes/example; "
    f"manifest {os.path.join(cfg.out, shards.MANIFEST)}"
  )
  return 0

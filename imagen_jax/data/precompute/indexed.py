"""Record-index sources (`--source=shapes|image_text_folder|NAME`): a prepared TFDS split,
read by record index.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from imagen_jax import errors
from imagen_jax.data import records, shards
from imagen_jax.data.precompute.config import BUILTIN_SOURCES, PrecomputeConfig
from imagen_jax.data.precompute.manifest import (
  build_manifest,
  finish_job,
  previous_manifest,
  split_entries,
)
from imagen_jax.data.precompute.work import encode_rows, image_size, plan_job

logger = logging.getLogger(__name__)


def prepare_source(cfg: PrecomputeConfig) -> str:
  """Builds (shapes / image_text_folder) or finds (other TFDS names) the source dataset.

  Returns:
    The TFDS dataset directory (holding dataset_info.json).
  """
  import tensorflow_datasets as tfds

  # TFDS draws its own bars while building; --no_progress silences them too.
  tfds.display_progress_bar(cfg.progress)
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
  return records.find_tfds_dir(resolved_tfds_dir(cfg), cfg.source)


def resolved_tfds_dir(cfg: PrecomputeConfig) -> str:
  """Where prepared TFDS datasets are looked up: --tfds_data_dir, else TFDS's own default."""
  return cfg.tfds_data_dir or os.environ.get(
    "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
  )


def _wait_for_tfds(tfds_dir: str, name: str, timeout_s: float = 3600) -> str:
  deadline = time.time() + timeout_s
  while True:
    try:
      return records.find_tfds_dir(tfds_dir, name)
    except FileNotFoundError:
      if time.time() > deadline:
        raise
      time.sleep(5)


def run_indexed_job(cfg: PrecomputeConfig, encoder: Any = None) -> dict[str, Any]:
  """`run_precompute` for a record-index source (cfg already validated)."""
  from imagen_jax.text import vocabulary

  vocab = vocabulary.load_vocabulary(cfg.vocab)
  vocab_sha = vocabulary.file_sha256(cfg.vocab)
  previous = previous_manifest(cfg, vocab_sha)
  # A prepared TFDS source is only looked up: it and its splits are checked before any write.
  prepared = cfg.source not in BUILTIN_SOURCES
  if prepared:
    tfds_dir, sources = _open_sources(cfg)
  # Every check above reads only; from here on the job writes.
  errors.check_writable_dir(cfg.out, "--out")
  if not prepared:
    tfds_dir, sources = _open_sources(cfg)
  sizes = {split: len(src) for split, src in sources.items()}
  plans, todo, skipped, rewritten, encoder, progress = plan_job(cfg, sizes, previous, encoder)
  written_bytes, written = 0, 0
  after_shard = cfg.shard_hook()
  t0 = time.time()
  for split, s, path in todo:
    payloads, image_sizes = _encode_range(
      sources[split], plans[split][s], vocab, encoder, cfg, progress
    )
    meta = shards.write_shard(path, payloads, image_sizes, source=plans[split][s])
    written_bytes += meta["size_bytes"]
    written += 1
    after_shard(path)
  seconds = time.time() - t0
  splits = split_entries(cfg, plans, sizes)
  available = next(iter(sources.values())).available_splits
  # The source's splits: a 'validation' missing here was not built (--num_validation=0).
  source = {"name": cfg.source, "tfds_dir": tfds_dir, "seed": cfg.seed, "splits": available}
  manifest = build_manifest(cfg, encoder, vocab_sha, source, splits)
  return finish_job(
    cfg, manifest, previous, progress, seconds, written_bytes, written, skipped, rewritten
  )


def _open_sources(cfg: PrecomputeConfig) -> tuple[str, dict[str, records.TfdsSource]]:
  tfds_dir = prepare_source(cfg)
  return tfds_dir, {split: records.TfdsSource(tfds_dir, split) for split in cfg.splits}


def _encode_range(source, indices: range, vocab, encoder, cfg: PrecomputeConfig, progress):
  """Reads, tokenizes and encodes the source examples `indices` into shard records."""
  from imagen_jax.text import vocabulary

  pairs = []
  for i in indices:
    try:
      pairs.extend(source.pairs(i))
    except records.CorruptRecordError as e:
      logger.warning("skipping corrupt source record %d of %s: %s", i, source.split, e)
  tokens = vocabulary.tokenize(vocab, [c for _, c, _ in pairs], cfg.max_length)
  rows = [
    (key, text, image, image_size(image), tokens[j]) for j, (key, text, image) in enumerate(pairs)
  ]
  return encode_rows(rows, encoder, cfg, progress)

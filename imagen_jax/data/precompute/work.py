"""What every precompute job shares: the shard plan, which shards a rerun still owes, the
encoder and the progress bar.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_jax import errors
from imagen_jax.data import shards
from imagen_jax.data.precompute.config import RANDOM_WEIGHTS, PrecomputeConfig

logger = logging.getLogger(__name__)


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


def plan_job(cfg: PrecomputeConfig, sizes: dict[str, int], previous, encoder):
  """Shard plans of splits of `sizes` examples, this process's work, the encoder, a progress bar.

  Returns:
    (plans, todo, shards skipped, shards rewritten, encoder, progress).
  """
  plans = {
    split: plan_shards(n, cfg.examples_per_shard, cfg.process_count) for split, n in sizes.items()
  }
  todo, skipped, rewritten = _plan_work(cfg, plans, previous)
  total = sum(len(plans[split][s]) for split, s, _ in todo)
  encoder = _encoder_for(cfg, encoder, todo, skipped, rewritten, previous)
  return plans, todo, skipped, rewritten, encoder, _Progress(total, cfg.progress)


def _encoder_for(cfg, encoder, todo, skipped: int, rewritten: list, previous):
  """The encoder to use: `encoder`, loaded from cfg, or (nothing to encode) the previous facts."""
  logger.info(
    "precompute: %d shards to write (%d rewritten), %d already complete",
    len(todo),
    len(rewritten),
    skipped,
  )
  if encoder is None:
    # Nothing to encode (a rerun that only checked): the previous run's manifest, made with
    # these very flags, already says what the manifest needs of the encoder.
    reuse = not todo and previous is not None and "flags" in previous
    encoder = _EncoderFacts(previous) if reuse else _load_encoder(cfg)
  if encoder.max_length != cfg.max_length:
    raise errors.UserError(
      f"the text encoder's max_length {encoder.max_length} != --max_length={cfg.max_length}; "
      "fix: pass the same length to both"
    )
  return encoder


def _plan_work(
  cfg: PrecomputeConfig, plans: dict[str, list[range]], previous: dict[str, Any] | None
) -> tuple[list[tuple[str, int, str]], int, list[tuple[str, str]]]:
  """This process's shards to write, how many are already complete, and the bad ones.

  Returns:
    ([(split, shard index, path)] to write, number skipped, [(shard name, why rewritten)]).
  """
  import tensorflow as tf

  todo, skipped, rewritten = [], 0, []
  for split, plan in plans.items():
    counts = _recorded_counts(previous, split, len(plan))
    for s in range(cfg.process_index, len(plan), cfg.process_count):
      name = shards.shard_name(split, s, len(plan))
      path = os.path.join(cfg.out, name)
      # Leftovers of a killed run (the shard's and its sidecar's temporary files) go now, even
      # for a shard that is complete and will not be written again.
      shards.remove_temporaries(path)
      shards.remove_temporaries(path + ".json")
      if tf.io.gfile.exists(path):
        problem = shards.shard_problem(
          path, num_records=counts[s], source=plan[s], check_crc=cfg.verify
        )
        if problem is None:
          skipped += 1
          continue
        logger.warning("precompute: rewriting %s: %s", name, problem)
        rewritten.append((name, problem))
        # Removed now, not replaced at its turn: if the job dies before then, the shard reads
        # as unfinished and a plain rerun writes it.
        tf.io.gfile.remove(path)
      todo.append((split, s, path))
  return todo, skipped, rewritten


def _recorded_counts(previous: dict[str, Any] | None, split: str, num_shards: int) -> list:
  """Per-shard record counts of the previous manifest (None where unknown)."""
  entry = (previous or {}).get("splits", {}).get(split, {})
  counts = entry.get("shard_records")
  if entry.get("num_shards") != num_shards or not isinstance(counts, list):
    return [None] * num_shards
  return [c if isinstance(c, int) else None for c in counts] + [None] * (num_shards - len(counts))


class _EncoderFacts:
  """What the manifest needs of the encoder, from the previous manifest, when none was loaded."""

  def __init__(self, previous: dict[str, Any]):
    self.max_length = int(previous["max_length"])
    self.width = int(previous["embedding_width"])
    self._identity = dict(previous["encoder"])

  def identity(self) -> dict[str, Any]:
    return self._identity


def _load_encoder(cfg: PrecomputeConfig):
  import jax

  from imagen_jax import parallel
  from imagen_jax.text import encoder as text_encoder

  # Random weights (demos, tests): the manifest's encoder identity records it.
  checkpoint = None if cfg.t5_checkpoint == RANDOM_WEIGHTS else cfg.t5_checkpoint
  mesh = parallel.create_mesh(data=-1, devices=jax.local_devices())
  return text_encoder.load_text_encoder(
    checkpoint,
    cfg.vocab,
    size=cfg.t5_size,
    max_length=cfg.max_length,
    mesh=mesh,
    zero_padding=cfg.t5_padding == "zero",
  )


def encode_rows(
  rows: Sequence[tuple[str, str, bytes, tuple[int, int], np.ndarray]],
  encoder,
  cfg: PrecomputeConfig,
  progress,
) -> tuple[list[bytes], list[tuple[int, int]]]:
  """Encodes (key, caption, image bytes, (height, width), tokens) rows into shard records.

  Returns:
    (payloads, image sizes), in the rows' order.
  """
  payloads, sizes = [], []
  batch = _encode_batch_size(cfg.batch_size)
  for start in range(0, len(rows), batch):
    chunk = rows[start : start + batch]
    # A fixed batch shape: the last, short batch is padded so the encoder never recompiles.
    padded = np.zeros((batch, cfg.max_length), np.int32)
    for j, row in enumerate(chunk):
      tokens = row[4][: cfg.max_length]
      padded[j, : len(tokens)] = tokens
    emb, mask = encoder.encode_tokens(padded)
    emb, mask = np.asarray(emb), np.asarray(mask)
    for j, (key, caption, image, (h, w), _) in enumerate(chunk):
      n = int(mask[j].sum())
      sizes.append((h, w))
      payloads.append(
        shards.make_record(key, caption, image, h, w, padded[j, :n], emb[j, :n].astype(np.float32))
      )
    progress.update(len(chunk))
  return payloads, sizes


def _encode_batch_size(batch_size: int) -> int:
  import jax

  n = jax.local_device_count()
  return max(n, math.ceil(batch_size / n) * n)

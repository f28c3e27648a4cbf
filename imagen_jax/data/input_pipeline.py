"""Training input: per-host examples -> per-stage numpy batches, with exactly resumable state.

The order is independent of the number of processes: each epoch is one permutation of the
whole split (a pure function of seed and epoch), cut into global batches of
`batch_size × process_count` across epoch boundaries, and process p reads only rows
[p·B, (p+1)·B) of each global batch (random access into any shard). Hence, per epoch, processes
see disjoint examples whose union is the split; 1 process × 8 devices and 2 processes × 4
devices train on identical global batches; and the state (epoch, global position) is the same
on every process, so a checkpoint written by process 0 resumes every host, even on a slice of a
different size. A corrupt record is replaced by another example of the same local batch (so
global positions never shift) and counted; `set_state` on a fresh iterator continues with
exactly the next batch.

Batches (numpy, per process):
  image      float32 [B, H, W, 3] in [-1, 1]   (H = W = crop_size or resolution)
  lowres     float32 [B, h, w, 3] in [-1, 1]   SR stages: the (cropped) image downsampled
  text_emb   float32 [B, max_length, D]        zero after the real tokens
  text_mask  bool    [B, max_length]
  key        str     [B]                        host-side only
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from imagen_jax import errors
from imagen_jax.data import records, shards

logger = logging.getLogger(__name__)

STATE_VERSION = 2
DEFAULT_MAX_CORRUPT_FRACTION = 0.01
# Gin macro for the tolerance of `make_train_iterator` (and so of `imagen-jax train`):
# `--gin.MAX_CORRUPT_FRACTION=0.05` on the command line, `MAX_CORRUPT_FRACTION = 0.05` in a file.
TOLERANCE_MACRO = "MAX_CORRUPT_FRACTION"


class ImageTooSmallError(ValueError):
  """An image is smaller than the stage resolution."""


def _check_stage_args(
  batch_size: int, resolution: int, lowres_resolution: int | None, crop_size: int | None
) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; must be >= 1 (it is the per-process batch)")
  if resolution < 1:
    raise ValueError(f"resolution={resolution}; must be >= 1")
  if lowres_resolution is not None and not 0 < lowres_resolution < resolution:
    raise ValueError(
      f"lowres_resolution={lowres_resolution} must be in (0, resolution={resolution})"
    )
  if crop_size is not None:
    if not 0 < crop_size <= resolution:
      raise ValueError(f"crop_size={crop_size} must be in (0, resolution={resolution}]")
    if lowres_resolution is not None and (crop_size * lowres_resolution) % resolution:
      raise ValueError(
        f"crop_size={crop_size} x lowres_resolution={lowres_resolution} / resolution="
        f"{resolution} is not an integer: the low-res crop must keep the stage's ratio"
      )


def process_image(
  data: bytes,
  resolution: int,
  lowres_resolution: int | None = None,
  crop_size: int | None = None,
  rng: np.random.Generator | None = None,
  name: str = "image",
) -> tuple[np.ndarray, np.ndarray | None]:
  """Decodes one image and makes the stage's (high, low) pair.

  The image is centre-cropped to a square and resized to `resolution` (antialiased); with
  `crop_size` a random `crop_size` square is cut from it; the low-res image is that (cropped)
  image downsampled with antialiasing by the stage's ratio.

  Returns:
    (float32 [S, S, 3] in [-1, 1], float32 [s, s, 3] in [-1, 1] or None).

  Raises:
    ImageTooSmallError: the image's shorter side is below `resolution` (naming `name`).
    records.CorruptRecordError: the bytes do not decode.
  """
  from PIL import Image

  try:
    im = Image.open(io.BytesIO(data))
    im.load()
    im = im.convert("RGB")
  except (OSError, ValueError, SyntaxError) as e:
    raise records.CorruptRecordError(f"{name}: undecodable image: {e}") from e
  w, h = im.size
  if min(h, w) < resolution:
    raise ImageTooSmallError(
      f"{name} is {h}x{w}, smaller than the stage resolution {resolution}; filter such images "
      "out or train a lower-resolution stage"
    )
  if h != w:
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    im = im.crop((left, top, left + side, top + side))
  if im.size != (resolution, resolution):
    im = im.resize((resolution, resolution), Image.Resampling.BICUBIC, reducing_gap=None)
  if crop_size is not None and crop_size < resolution:
    rng = rng if rng is not None else np.random.default_rng(0)
    oy, ox = (int(v) for v in rng.integers(0, resolution - crop_size + 1, size=2))
    im = im.crop((ox, oy, ox + crop_size, oy + crop_size))
  lowres = None
  if lowres_resolution is not None:
    size = im.size[0] * lowres_resolution // resolution
    lowres = im.resize((size, size), Image.Resampling.BICUBIC)
    lowres = np.asarray(lowres, np.float32) / 127.5 - 1.0
  return np.asarray(im, np.float32) / 127.5 - 1.0, lowres


# ----------------------------------------------------------------------------------------------
# Per-process example sources
# ----------------------------------------------------------------------------------------------


class PrecomputedExamples:
  """All records of the precomputed shards of one split, by random access."""

  def __init__(
    self,
    data_dir: str,
    split: str,
    max_length: int | None,
    expected_encoder: dict | None,
    resolution: int,
    text_encoder: Any,
  ):
    manifest = shards.read_manifest(data_dir)
    path = os.path.join(data_dir, shards.MANIFEST)
    shards.check_manifest(
      manifest,
      path,
      max_length=max_length,
      expected_encoder=expected_encoder,
      width=None if text_encoder is None else int(text_encoder.width),
    )
    if split not in manifest["splits"]:
      raise ValueError(f"{path} has no split {split!r}; it has {sorted(manifest['splits'])}")
    # Every process indexes every shard (their small .json metas); it then reads only its rows.
    local = manifest["splits"][split]["shards"]
    self.width = int(manifest["embedding_width"])
    self.manifest = manifest
    self.paths, file_idx, offsets = [], [], []
    for name in local:
      shard_path = os.path.join(data_dir, name)
      try:
        meta = shards.read_shard_meta(shard_path)
      except (FileNotFoundError, ValueError) as e:
        raise records.CorruptDataError(f"{e}; fix: {self.repair_hint()}") from e
      if meta["num_records"] and min(meta["min_height"], meta["min_width"]) < resolution:
        raise ImageTooSmallError(
          f"shard {shard_path} holds images as small as {meta['min_height']}x"
          f"{meta['min_width']}, below the stage resolution {resolution}"
        )
      file_idx.extend([len(self.paths)] * meta["num_records"])
      offsets.extend(meta["offsets"])
      self.paths.append(shard_path)
    self._file_idx = np.asarray(file_idx, np.int32)
    self._offsets = np.asarray(offsets, np.int64)
    self._readers = records.RandomReaders()

  def __len__(self) -> int:
    return len(self._offsets)

  def file_of(self, index: int) -> str:
    """The shard file holding record `index`."""
    return self.paths[self._file_idx[index]]

  def repair_hint(self) -> str:
    """How to rewrite bad shards: the manifest's own precompute command, with --verify."""
    cmd = self.manifest.get("command")
    if not cmd:
      return "rerun your precompute command with --verify (it rewrites only the bad shards)"
    return f"rerun `{cmd} --verify` (it rewrites only the bad shards)"

  def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    del rng
    payload = self._readers.read(self.file_of(index), int(self._offsets[index]))
    return shards.decode_record(payload, self.width)


class TfdsExamples:
  """On-the-fly text mode: the records of a prepared TFDS split."""

  def __init__(self, data_dir: str, tfds_name: str | None, split: str):
    self.source = records.TfdsSource(records.find_tfds_dir(data_dir, tfds_name), split)
    self._indices = np.arange(len(self.source), dtype=np.int64)
    if not len(self._indices):
      raise ValueError(f"{self.source.dataset_dir} split {split!r} has no records")

  def __len__(self) -> int:
    return len(self._indices)

  def file_of(self, index: int) -> str:
    """The TFDS file holding record `index`."""
    return self.source.file_of(int(self._indices[index]))

  def repair_hint(self) -> str:
    return f"rebuild the TFDS dataset in {self.source.dataset_dir}"

  def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    pairs = self.source.pairs(int(self._indices[index]))
    # Datasets with several captions per image (coco_captions) get one at random per visit.
    key, caption, image = pairs[int(rng.integers(len(pairs)))] if len(pairs) > 1 else pairs[0]
    return {"key": key, "caption": caption, "image": image}


# ----------------------------------------------------------------------------------------------
# The iterator
# ----------------------------------------------------------------------------------------------


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Infinite, exactly resumable iterator of per-process training batches (module docstring)."""

  def __init__(
    self,
    examples,
    *,
    batch_size: int,
    resolution: int,
    lowres_resolution: int | None,
    crop_size: int | None,
    max_length: int,
    width: int,
    seed: int,
    process_index: int,
    process_count: int = 1,
    text_encoder: Any = None,
    max_corrupt_fraction: float = DEFAULT_MAX_CORRUPT_FRACTION,
    num_threads: int = 4,
    emb_dtype: Any = np.float32,
  ):
    self._examples = examples
    self.batch_size = batch_size
    self.resolution = resolution
    self.lowres_resolution = lowres_resolution
    self.crop_size = crop_size
    self.max_length = max_length
    self.width = width
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.text_encoder = text_encoder
    self.max_corrupt_fraction = max_corrupt_fraction
    self.emb_dtype = emb_dtype
    self._pool = (
      concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="input")
      if num_threads > 1
      else None
    )
    self._epoch = 0
    self._position = 0
    self._corrupt: set[int] = set()
    self._order_epoch = -1
    self._order: np.ndarray | None = None

  # -- state --------------------------------------------------------------------------------

  @property
  def num_examples(self) -> int:
    """Examples in the split (each process reads 1/process_count of them per epoch)."""
    return len(self._examples)

  @property
  def corrupt_count(self) -> int:
    """Distinct corrupt records met so far (skipped)."""
    return len(self._corrupt)

  def get_state(self) -> dict[str, Any]:
    """JSON-able state; `set_state` of it on a fresh iterator continues with the next batch."""
    return {
      "version": STATE_VERSION,
      "epoch": self._epoch,
      "position": self._position,
      "corrupt": sorted(self._corrupt),
      "seed": self.seed,
      "num_examples": self.num_examples,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restores `get_state()` output.

    Raises:
      ValueError: the state belongs to other data, another seed or another process.
    """
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"input state version {state.get('version')} != {STATE_VERSION}")
    for field, mine in (("seed", self.seed), ("num_examples", self.num_examples)):
      if state.get(field) != mine:
        raise ValueError(
          f"input state has {field}={state.get(field)} but this iterator has {mine}: the data, "
          "or seed changed since the checkpoint"
        )
    self._epoch = int(state["epoch"])
    self._position = int(state["position"])
    self._corrupt = {int(i) for i in state["corrupt"]}

  # -- batches ------------------------------------------------------------------------------

  def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of the numeric batch fields, known before reading anything."""
    b, s = self.batch_size, self.crop_size or self.resolution
    out = {
      "image": ((b, s, s, 3), np.dtype(np.float32)),
      "text_emb": ((b, self.max_length, self.width), np.dtype(self.emb_dtype)),
      "text_mask": ((b, self.max_length), np.dtype(bool)),
    }
    if self.lowres_resolution is not None:
      ls = s * self.lowres_resolution // self.resolution
      out["lowres"] = ((b, ls, ls, 3), np.dtype(np.float32))
    return out

  def _order_for(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._order = rng.permutation(self.num_examples)
      self._order_epoch = epoch
    return self._order

  def _next_positions(self, n: int) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
      if self._position >= self.num_examples:
        self._epoch += 1
        self._position = 0
      out.append((self._epoch, self._position))
      self._position += 1
    return out

  def _load(self, item: tuple[int, int, int]):
    index, epoch, pos = item
    if index in self._corrupt:
      return index, None
    rng = np.random.default_rng([self.seed, epoch, pos, 1])
    try:
      ex = self._examples.load(index, rng)
      image, lowres = process_image(
        ex["image"],
        self.resolution,
        self.lowres_resolution,
        self.crop_size,
        rng,
        name=f"image of example {ex['key']!r}",
      )
    except records.CorruptRecordError as e:
      logger.warning("skipping corrupt record %d: %s", index, e)
      return index, None
    ex["image"], ex["lowres"] = image, lowres
    return index, ex

  def __next__(self) -> dict[str, np.ndarray]:
    global_positions = self._next_positions(self.batch_size * self.process_count)
    start = self.process_index * self.batch_size
    positions = global_positions[start : start + self.batch_size]
    # Indices are resolved here, so worker threads only read and decode: the batch is the
    # same whatever the thread timing.
    items = [(int(self._order_for(e)[p]), e, p) for e, p in positions]
    loaded = list(records.map_in_order(self._load, items, self._pool))
    for index, ex in loaded:
      if ex is None:
        self._corrupt.add(index)
    if len(self._corrupt) > self.max_corrupt_fraction * self.num_examples:
      raise self._corrupt_error(
        f"{len(self._corrupt)} of {self.num_examples} records are corrupt, more than "
        f"max_corrupt_fraction={self.max_corrupt_fraction}",
        sorted(self._corrupt),
      )
    good = [ex for _, ex in loaded if ex is not None]
    if not good:
      raise self._corrupt_error(
        f"every record of a batch is corrupt (indices {[i for i, _ in loaded]})",
        [i for i, _ in loaded],
      )
    # A corrupt row takes the next good example of this batch: positions never shift, so every
    # process stays on the same global schedule.
    batch = [ex if ex is not None else good[i % len(good)] for i, (_, ex) in enumerate(loaded)]
    return self._collate(batch)

  def _corrupt_error(self, problem: str, indices: list[int]) -> records.CorruptDataError:
    """One line: what is corrupt, in which files, the command that repairs them, the knob."""
    files = list(dict.fromkeys(self._examples.file_of(i) for i in indices))
    where = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    # Twice the fraction seen so far, rounded up to a percent: what would have gone on.
    suggest = min(1.0, max(0.01, math.ceil(200 * len(self._corrupt) / self.num_examples) / 100))
    return records.CorruptDataError(
      f"{problem}, in {where}; fix: {self._examples.repair_hint()}, or tolerate more with "
      f"--gin.{TOLERANCE_MACRO}={suggest:g}"
    )

  def _collate(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    b, length = len(examples), self.max_length
    batch = {
      "image": np.stack([ex["image"] for ex in examples]),
      "key": np.asarray([ex["key"] for ex in examples]),
    }
    if self.lowres_resolution is not None:
      batch["lowres"] = np.stack([ex["lowres"] for ex in examples])
    if self.text_encoder is not None and "embedding" not in examples[0]:
      emb, mask = self.text_encoder.encode([ex["caption"] for ex in examples])
      batch["text_emb"] = np.asarray(emb).astype(self.emb_dtype)
      batch["text_mask"] = np.asarray(mask).astype(bool)
      return batch
    emb = np.zeros((b, length, self.width), self.emb_dtype)
    mask = np.zeros((b, length), bool)
    for i, ex in enumerate(examples):
      n = ex["embedding"].shape[0]
      if n > length:
        raise ValueError(f"example {ex['key']!r} has {n} tokens > max_length={length}")
      emb[i, :n] = ex["embedding"].astype(self.emb_dtype)
      mask[i, :n] = True
    batch["text_emb"], batch["text_mask"] = emb, mask
    return batch

  def close(self) -> None:
    """Stops the worker threads."""
    if self._pool is not None:
      self._pool.shutdown(wait=False)


def make_train_iterator(
  data_dir: str,
  *,
  batch_size: int,
  resolution: int,
  lowres_resolution: int | None = None,
  crop_size: int | None = None,
  max_length: int,
  seed: int = 0,
  split: str = "train",
  process_index: int | None = None,
  process_count: int | None = None,
  text_encoder: Any = None,
  tfds_name: str | None = None,
  expected_encoder: dict[str, Any] | None = None,
  max_corrupt_fraction: float | None = None,
  num_threads: int = 4,
  emb_dtype: Any = np.float32,
) -> TrainIterator:
  """Opens this process's training input. Every check runs here, before anything compiles.

  Args:
    data_dir: precomputed dir (with manifest.json), or, with `text_encoder`, a TFDS data dir /
      dataset dir to encode captions on the fly.
    batch_size: per-process batch.
    resolution: the stage's image resolution (images are centre-cropped and resized to it).
    lowres_resolution: SR stages: resolution of the conditioning image.
    crop_size: random crops of this size of the (high, low) pair (e.g. 256 for the 1024 stage).
    max_length: text length of the training config.
    seed: shuffling / cropping seed.
    split: dataset split.
    process_index, process_count: this host and the number of hosts (default: jax's).
    text_encoder: TextEncoder for on-the-fly text, or to check its width against the data.
    tfds_name: on-the-fly mode: dataset name under `data_dir` (e.g. 'shapes/r64').
    expected_encoder: identity the embeddings must have been made with (any subset of
      `TextEncoder.identity()`).
    max_corrupt_fraction: fail once more than this fraction of records is corrupt (default:
      the gin macro MAX_CORRUPT_FRACTION if bound, else 0.01).
    num_threads: decode threads.
    emb_dtype: dtype of `text_emb` (float32, or ml_dtypes.bfloat16 to halve host memory).

  Returns:
    A TrainIterator.

  Raises:
    FileNotFoundError: missing data dir, manifest or shard.
    ValueError: manifest mismatch, corrupt shard file, images smaller than `resolution`, or bad
      arguments (each message names the file and the mismatch).
  """
  import tensorflow as tf

  _check_stage_args(batch_size, resolution, lowres_resolution, crop_size)
  if max_length < 1:
    raise ValueError(f"max_length={max_length}; must be >= 1")
  max_corrupt_fraction = _checked_tolerance(max_corrupt_fraction)
  process_index, process_count = _checked_process(process_index, process_count)
  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"data dir {data_dir!r} does not exist")
  examples, width, encoder_for_batches = _open_examples(
    data_dir, split, max_length, resolution, text_encoder, tfds_name, expected_encoder
  )
  return TrainIterator(
    examples,
    batch_size=batch_size,
    resolution=resolution,
    lowres_resolution=lowres_resolution,
    crop_size=crop_size,
    max_length=max_length,
    width=width,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    text_encoder=encoder_for_batches,
    max_corrupt_fraction=max_corrupt_fraction,
    num_threads=num_threads,
    emb_dtype=emb_dtype,
  )


def _checked_tolerance(max_corrupt_fraction: float | None) -> float:
  """The corrupt-record tolerance: the argument, else the gin macro, else 1%; in [0, 1]."""
  if max_corrupt_fraction is None:
    max_corrupt_fraction = configured_max_corrupt_fraction()
  if not 0 <= max_corrupt_fraction <= 1:
    raise errors.UserError(
      f"max_corrupt_fraction={max_corrupt_fraction} is not in [0, 1]; fix: pass e.g. "
      f"--gin.{TOLERANCE_MACRO}=0.01"
    )
  return max_corrupt_fraction


def _checked_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(this host, number of hosts), jax's where not given."""
  if process_index is None or process_count is None:
    from imagen_jax import parallel

    process_index, process_count = parallel.process_placement(process_index, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def _open_examples(
  data_dir: str,
  split: str,
  max_length: int,
  resolution: int,
  text_encoder: Any,
  tfds_name: str | None,
  expected_encoder: dict[str, Any] | None,
) -> tuple[Any, int, Any]:
  """The examples of `split`: precomputed shards (a manifest in data_dir) or a TFDS build whose
  captions `text_encoder` encodes per batch.

  Returns:
    (examples, text embedding width, the encoder batches need or None).
  """
  import tensorflow as tf

  if tf.io.gfile.exists(os.path.join(data_dir, shards.MANIFEST)):
    examples = PrecomputedExamples(
      data_dir, split, max_length, expected_encoder, resolution, text_encoder
    )
    return examples, examples.width, None
  if text_encoder is None:
    shards.read_manifest(data_dir)  # raises the "no manifest" error naming the path
  if text_encoder.max_length != max_length:
    raise ValueError(
      f"text encoder max_length {text_encoder.max_length} != config max_length {max_length}"
    )
  examples = TfdsExamples(data_dir, tfds_name, split)
  _check_tfds_image_size(examples.source.dataset_dir, resolution)
  return examples, int(text_encoder.width), text_encoder


def configured_max_corrupt_fraction() -> float:
  """The gin macro MAX_CORRUPT_FRACTION if a parsed config binds it, else the default."""
  import gin

  try:
    value = gin.query_parameter(f"%{TOLERANCE_MACRO}")
  except ValueError:
    return DEFAULT_MAX_CORRUPT_FRACTION
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise errors.UserError(
      f"{TOLERANCE_MACRO}={value!r} is not a number; fix: pass e.g. --gin.{TOLERANCE_MACRO}=0.01"
    )
  return float(value)


def _check_tfds_image_size(dataset_dir: str, resolution: int) -> None:
  """Fails early when the TFDS features declare a fixed image size below `resolution`."""
  import json

  import tensorflow as tf

  path = os.path.join(dataset_dir, "features.json")
  if not tf.io.gfile.exists(path):
    return
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    feats = json.loads(text)["featuresDict"]["features"]["image"]["image"]["shape"]["dimensions"]
    h, w = int(feats[0]), int(feats[1])
  except (KeyError, ValueError, TypeError, IndexError):
    return  # variable-size images: checked per example
  if h > 0 and w > 0 and min(h, w) < resolution:
    raise ImageTooSmallError(
      f"{dataset_dir} holds {h}x{w} images, smaller than the stage resolution {resolution}"
    )

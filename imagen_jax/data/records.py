"""Random access to TFRecord files, and image-caption examples read straight from TFDS datasets.

TFRecord framing per record: uint64 length, uint32 masked CRC of the length, payload, uint32
masked CRC of the payload. TensorFlow's random reader checks both CRCs, so a flipped bit surfaces
as `CorruptRecordError` for that record only, and the reader can skip it and go on.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from imagen_jax import errors

HEADER_BYTES = 12  # uint64 length + uint32 CRC
FOOTER_BYTES = 4  # uint32 CRC


class CorruptRecordError(Exception):
  """One record failed its checksum or could not be parsed."""


class CorruptDataError(errors.UserError):
  """Data files too damaged to train on; the one-line message names the files and the repair."""


def record_size(payload_len: int) -> int:
  """Bytes one record of `payload_len` bytes takes in a TFRecord file."""
  return HEADER_BYTES + payload_len + FOOTER_BYTES


def scan_offsets(path: str) -> list[int]:
  """Byte offsets of every record of an uncompressed TFRecord file (reads headers only).

  Raises:
    ValueError: the file is truncated or its framing is broken (naming the file).
  """
  import tensorflow as tf

  offsets = []
  size = tf.io.gfile.stat(path).length
  with tf.io.gfile.GFile(path, "rb") as f:
    pos = 0
    while pos < size:
      f.seek(pos)
      header = f.read(HEADER_BYTES)
      if len(header) < HEADER_BYTES:
        raise ValueError(f"TFRecord file {path} is truncated at byte {pos} (of {size})")
      (length,) = struct.unpack("<Q", header[:8])
      end = pos + record_size(length)
      if end > size:
        raise ValueError(
          f"TFRecord file {path}: record at byte {pos} claims {length} bytes, past the end of "
          f"the file ({size} bytes): truncated or corrupt"
        )
      offsets.append(pos)
      pos = end
  return offsets


class RandomReaders:
  """A small LRU of open random-access TFRecord readers (one per file)."""

  def __init__(self, capacity: int = 64):
    self._capacity = capacity
    self._open: collections.OrderedDict[str, Any] = collections.OrderedDict()
    # Reads are short; decoding (the slow part) runs outside the lock in the callers' threads.
    self._lock = threading.Lock()

  def read(self, path: str, offset: int) -> bytes:
    """The payload of the record at `offset` of `path`.

    Raises:
      CorruptRecordError: bad CRC or framing at that offset.
    """
    import tensorflow as tf
    from tensorflow.python.lib.io import tf_record  # the only random-access TFRecord reader

    with self._lock:
      reader = self._open.get(path)
      if reader is None:
        reader = tf_record.tf_record_random_reader(path)
        self._open[path] = reader
        if len(self._open) > self._capacity:
          _, old = self._open.popitem(last=False)
          old.close()
      else:
        self._open.move_to_end(path)
      try:
        payload, _ = reader.read(offset)
      except (tf.errors.DataLossError, IndexError, tf.errors.OutOfRangeError) as e:
        raise CorruptRecordError(f"{path} @ byte {offset}: {e}") from e
    return payload


def check_records(path: str, offsets: Sequence[int], size: int) -> str | None:
  """Reads every record of a TFRecord file by its index, checking both CRCs of each.

  Returns:
    The first problem (a record that fails its CRCs, or is not where `offsets` says, or records
    that do not fill `size` bytes exactly), or None.
  """
  import tensorflow as tf
  from tensorflow.python.lib.io import tf_record

  reader = tf_record.tf_record_random_reader(path)
  try:
    pos = 0
    for i, offset in enumerate(offsets):
      if offset != pos:
        return f"record {i} is at byte {pos}, its index says {offset}"
      try:
        _, pos = reader.read(offset)
      except (tf.errors.DataLossError, IndexError, tf.errors.OutOfRangeError) as e:
        return f"record {i} (byte {offset}) fails its CRC ({str(e).splitlines()[0]})"
    if pos != size:
      return f"its {len(offsets)} indexed records end at byte {pos} of {size}"
    return None
  finally:
    reader.close()


def parse_example(payload: bytes) -> dict[str, list]:
  """A serialized tf.train.Example as {feature name: list of values}.

  Raises:
    CorruptRecordError: the bytes are not a tf.train.Example.
  """
  import tensorflow as tf
  from google.protobuf.message import DecodeError

  try:
    example = tf.train.Example.FromString(payload)
  except DecodeError as e:
    raise CorruptRecordError(f"not a tf.train.Example: {e}") from e
  out = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    out[name] = list(getattr(feature, kind).value) if kind else []
  return out


# ----------------------------------------------------------------------------------------------
# TFDS datasets read as (key, caption, encoded image) triples
# ----------------------------------------------------------------------------------------------

# (key, caption, encoded image bytes)
Pair = tuple[str, str, bytes]


def _text(values: list, name: str) -> str:
  if not values:
    raise CorruptRecordError(f"feature {name!r} is empty")
  value = values[0]
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _generic_pairs(features: dict[str, list], fallback_key: str) -> list[Pair]:
  """Works for shapes, image_text_folder and any dataset with 'image' + a caption feature."""
  if "image" not in features:
    raise CorruptRecordError(f"no 'image' feature (has {sorted(features)})")
  image = features["image"][0]
  key = fallback_key
  for name in ("key", "image/id", "id", "image/filename"):
    if features.get(name):
      key = _text(features[name], name)
      break
  for name in ("caption", "text", "captions/text", "caption/text"):
    if features.get(name):
      texts = [v.decode("utf-8") for v in features[name]]
      if len(texts) == 1:
        return [(key, texts[0], image)]
      return [(f"{key}/{j}", t, image) for j, t in enumerate(texts)]
  raise CorruptRecordError(f"no caption feature (has {sorted(features)})")


class TfdsSource:
  """A prepared TFRecord TFDS split, read by record index without tf.data.

  Records are in TFDS's on-disk order (deterministic for a given build). One record may hold
  several captions (e.g. coco_captions): `pairs(i)` returns all of them.
  """

  def __init__(self, dataset_dir: str, split: str):
    """Opens `split` of the TFDS dataset whose `dataset_info.json` is in `dataset_dir`.

    Raises:
      FileNotFoundError: no dataset_info.json there.
      ValueError: unknown split or a non-TFRecord dataset.
    """
    import tensorflow as tf

    info_path = os.path.join(dataset_dir, "dataset_info.json")
    if not tf.io.gfile.exists(info_path):
      raise FileNotFoundError(
        f"{dataset_dir} is not a prepared TFDS dataset (no dataset_info.json)"
      )
    with tf.io.gfile.GFile(info_path) as f:
      info = json.load(f)
    self.dataset_dir = dataset_dir
    self.name = info.get("name", "")
    self.split = split
    splits = {s["name"]: s for s in info.get("splits", [])}
    self.available_splits = sorted(splits)
    if split not in splits:
      raise ValueError(f"split={split!r} is not in {dataset_dir}; it has {sorted(splits)}")
    file_format = info.get("fileFormat", "tfrecord")
    if file_format != "tfrecord":
      raise ValueError(
        f"{dataset_dir} is stored as {file_format}; prepare it with file_format='tfrecord'"
      )
    lengths = [int(n) for n in splits[split].get("shardLengths", [])]
    template = f"{self.name}-{split}.tfrecord-{{:05d}}-of-{len(lengths):05d}"
    self.files = [os.path.join(dataset_dir, template.format(i)) for i in range(len(lengths))]
    self.shard_lengths = lengths
    self._starts = [0]
    for n in lengths:
      self._starts.append(self._starts[-1] + n)
    self._offsets: dict[int, list[int]] = {}
    self._readers = RandomReaders()

  def __len__(self) -> int:
    return self._starts[-1]

  def _locate(self, index: int) -> tuple[int, int]:
    import bisect

    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._starts, index) - 1
    return f, index - self._starts[f]

  def file_of(self, index: int) -> str:
    """The TFRecord file holding record `index`."""
    return self.files[self._locate(index)[0]]

  def record(self, index: int) -> bytes:
    """Raw serialized record `index` of the split."""
    f, i = self._locate(index)
    if f not in self._offsets:
      offsets = scan_offsets(self.files[f])
      if len(offsets) != self.shard_lengths[f]:
        raise ValueError(
          f"{self.files[f]} holds {len(offsets)} records; dataset_info.json says "
          f"{self.shard_lengths[f]}: the dataset is corrupt, rebuild it"
        )
      self._offsets[f] = offsets
    return self._readers.read(self.files[f], self._offsets[f][i])

  def pairs(self, index: int) -> list[Pair]:
    """The (key, caption, image bytes) pairs of record `index`."""
    features = parse_example(self.record(index))
    return _generic_pairs(features, fallback_key=f"{self.split}/{index}")


def find_tfds_dir(data_dir: str, tfds_name: str | None = None) -> str:
  """The directory holding dataset_info.json for `tfds_name` (e.g. 'shapes/r64') in `data_dir`.

  `data_dir` may itself be that directory. Among several versions the newest wins.

  Raises:
    FileNotFoundError: nothing prepared there (the message lists what was looked for).
  """
  import tensorflow as tf

  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"data dir {data_dir!r} does not exist")
  root = os.path.join(data_dir, tfds_name.replace(":", "/")) if tfds_name else data_dir
  found = []
  for dirpath, _, files in tf.io.gfile.walk(root):
    if "dataset_info.json" in files and "incomplete." not in dirpath:
      found.append(dirpath)
  if not found:
    raise FileNotFoundError(
      f"no prepared TFDS dataset (dataset_info.json) under {root!r}; build it first "
      "(e.g. imagen-jax precompute --source=shapes) or pass the dataset's directory"
    )

  def version_key(path: str) -> tuple:
    parts = os.path.basename(path).split(".")
    return tuple(int(p) if p.isdigit() else -1 for p in parts)

  roots = {os.path.dirname(p) for p in found}
  if len(roots) > 1:
    raise FileNotFoundError(
      f"several TFDS datasets under {root!r}: {sorted(roots)}; pass tfds_name to pick one"
    )
  return max(found, key=version_key)


def map_in_order(fn: Callable[[Any], Any], items: Sequence[Any], pool) -> list[Any]:
  """`[fn(x) for x in items]`, on `pool` (a ThreadPoolExecutor) if given."""
  if pool is None or len(items) <= 1:
    return [fn(x) for x in items]
  return list(pool.map(fn, items))

"""The precomputed-embedding shard format: TFRecord shards + a JSON sidecar each + a manifest.

OUT/
  manifest.json                     encoder identity, vocabulary hash, max length, width, splits
  {split}-{s:05d}-of-{S:05d}.tfrecord       tf.train.Example records (see `RECORD_FEATURES`)
  {split}-{s:05d}-of-{S:05d}.tfrecord.json  sidecar: record count, byte offsets, file size, min
                                            image height/width

A shard is complete iff its .tfrecord exists: the sidecar is written first, the records go to a
temporary name and are renamed last, so a crash leaves either a complete shard or none.
`shard_problem` says whether a complete shard is also intact (cheaply, or CRC by CRC).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_jax.data import records

FORMAT = "imagen_jax.precomputed/v1"
MANIFEST = "manifest.json"
# Feature name -> kind, for documentation and validation.
RECORD_FEATURES = {
  "key": "bytes",  # stable example key
  "caption": "bytes",  # utf-8
  "image": "bytes",  # encoded PNG / JPEG, as in the source
  "image_height": "int64",
  "image_width": "int64",
  "tokens": "int64",  # the real tokens incl. EOS (length = `length`)
  "length": "int64",  # number of real tokens (incl. EOS)
  "embedding": "bytes",  # bfloat16 [length, width], little-endian, row-major
}


def shard_name(split: str, index: int, num_shards: int) -> str:
  """File name of shard `index` of `num_shards` for `split`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def remove_temporaries(path: str, writer: str = "") -> None:
  """Removes the temporary files a killed writer of `path` left beside it.

  Args:
    path: the file.
    writer: for a file several processes write (the manifest), this one's tag: only its own
      temporaries go, not the in-flight ones of the others. Each (file, writer) has one writer,
      so every earlier temporary of it is dead.
  """
  import tensorflow as tf

  for stale in tf.io.gfile.glob(f"{path}.tmp-{writer}*"):
    tf.io.gfile.remove(stale)


def temporary_path(path: str, writer: str = "") -> str:
  """A fresh temporary name beside `path`, once the dead writers' temporaries are gone."""
  remove_temporaries(path, writer)
  return f"{path}.tmp-{writer}{uuid.uuid4().hex}"


def atomic_write_text(path: str, text: str, writer: str = "") -> None:
  """Writes `text` to a temporary file beside `path`, then renames it over `path`.

  `writer` tags the temporary of a file that several processes write (see remove_temporaries).
  """
  import tensorflow as tf

  tmp = temporary_path(path, writer)
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def make_record(
  key: str,
  caption: str,
  image: bytes,
  image_height: int,
  image_width: int,
  tokens: np.ndarray,
  embedding: np.ndarray,
) -> bytes:
  """One serialized tf.train.Example of the shard format.

  Args:
    key, caption, image, image_height, image_width: the example.
    tokens: int [length] real tokens (EOS included).
    embedding: [length, width] encoder output of those tokens; stored as bfloat16.
  """
  import ml_dtypes
  import tensorflow as tf

  tokens = np.asarray(tokens)
  embedding = np.asarray(embedding)
  if embedding.ndim != 2 or embedding.shape[0] != tokens.shape[0]:
    raise ValueError(
      f"embedding shape {embedding.shape} must be [length={tokens.shape[0]}, width] for key {key}"
    )
  emb_bytes = np.ascontiguousarray(embedding.astype(ml_dtypes.bfloat16)).view(np.uint16)
  emb_bytes = emb_bytes.astype("<u2").tobytes()

  def b(v: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def i(v: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

  example = tf.train.Example(
    features=tf.train.Features(
      feature={
        "key": b(key.encode("utf-8")),
        "caption": b(caption.encode("utf-8")),
        "image": b(image),
        "image_height": i([image_height]),
        "image_width": i([image_width]),
        "tokens": i(tokens.tolist()),
        "length": i([tokens.shape[0]]),
        "embedding": b(emb_bytes),
      }
    )
  )
  return example.SerializeToString()


def decode_record(payload: bytes, width: int) -> dict[str, Any]:
  """Parses one shard record.

  Returns:
    {'key': str, 'caption': str, 'image': bytes, 'image_height': int, 'image_width': int,
     'tokens': int32 [length], 'embedding': bfloat16 [length, width]}.

  Raises:
    records.CorruptRecordError: malformed record.
  """
  import ml_dtypes

  f = records.parse_example(payload)
  try:
    length = int(f["length"][0])
    emb = np.frombuffer(f["embedding"][0], dtype="<u2")
    if emb.size != length * width:
      raise ValueError(f"embedding has {emb.size} values, expected {length}x{width}")
    return {
      "key": f["key"][0].decode("utf-8"),
      "caption": f["caption"][0].decode("utf-8"),
      "image": f["image"][0],
      "image_height": int(f["image_height"][0]),
      "image_width": int(f["image_width"][0]),
      "tokens": np.asarray(f["tokens"], np.int32),
      "embedding": emb.view(ml_dtypes.bfloat16).reshape(length, width),
    }
  except (KeyError, IndexError, ValueError, UnicodeDecodeError) as e:
    raise records.CorruptRecordError(f"malformed shard record: {e}") from e


def write_shard(
  path: str,
  payloads: Sequence[bytes],
  image_sizes: Sequence[tuple[int, int]],
  source: range | None = None,
  extra: dict[str, Any] | None = None,
):
  """Writes one shard atomically: sidecar first, records to a temporary name, then renamed.

  Args:
    path: final .tfrecord path.
    payloads: serialized records.
    image_sizes: (height, width) per record, summarised in the sidecar.
    source: the source examples the shard holds (recorded, so a rerun with another plan
      notices).
    extra: more JSON facts for the sidecar (e.g. records per task, skipped source examples).

  Returns:
    The sidecar dict.
  """
  import tensorflow as tf

  tmp = temporary_path(path)
  offsets, pos = [], 0
  with tf.io.TFRecordWriter(tmp) as writer:
    for payload in payloads:
      writer.write(payload)
      offsets.append(pos)
      pos += records.record_size(len(payload))
  actual = tf.io.gfile.stat(tmp).length
  if actual != pos:
    raise RuntimeError(f"{tmp}: wrote {actual} bytes, expected {pos} (compressed writer?)")
  meta = {
    "num_records": len(payloads),
    "size_bytes": pos,
    "offsets": offsets,
    "min_height": int(min((h for h, _ in image_sizes), default=0)),
    "min_width": int(min((w for _, w in image_sizes), default=0)),
  }
  if source is not None:
    meta["source_range"] = [source.start, source.stop]
  meta.update(extra or {})
  atomic_write_text(path + ".json", json.dumps(meta))
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return meta


def shard_is_complete(path: str) -> bool:
  """True iff the shard and its sidecar both exist (see the module docstring)."""
  import tensorflow as tf

  return tf.io.gfile.exists(path) and tf.io.gfile.exists(path + ".json")


def read_shard_meta(path: str) -> dict[str, Any]:
  """The sidecar of `path`, checked against itself and the file size (`load_shard_meta` adds
  advice to the errors).

  Raises:
    FileNotFoundError: shard or sidecar missing.
    ValueError: the sidecar and the file disagree. Messages read f"shard {path}: {reason}".
  """
  import tensorflow as tf

  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"shard {path}: it is missing")
  try:
    with tf.io.gfile.GFile(path + ".json") as f:
      meta = json.load(f)
    offsets = [int(o) for o in meta["offsets"]]
    size = int(meta["size_bytes"])
    if len(offsets) != int(meta["num_records"]):
      raise ValueError("offsets and num_records disagree")
    # The index of a TFRecord file: the first record at 0, then strictly increasing offsets,
    # each record at least a header and a footer long.
    ends = [*offsets[1:], size]
    if offsets and (
      offsets[0] != 0 or any(e - o < records.record_size(0) for o, e in zip(offsets, ends))
    ):
      raise ValueError("its offsets are not the index of a TFRecord file of that size")
  except (tf.errors.NotFoundError, FileNotFoundError) as e:
    raise FileNotFoundError(f"shard {path}: its sidecar is missing") from e
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"shard {path}: its sidecar is corrupt: {e}") from e
  actual = tf.io.gfile.stat(path).length
  if actual != size:
    raise ValueError(f"shard {path}: it is {actual} bytes but its sidecar says {size}")
  return meta


def load_shard_meta(path: str) -> dict[str, Any]:
  """Reads and checks a shard's sidecar against the file on disk.

  Raises:
    FileNotFoundError: shard or sidecar missing (precompute incomplete).
    ValueError: unreadable sidecar, or file size differs (corrupt / partially copied shard).
  """
  try:
    return read_shard_meta(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"{e}: the precompute did not finish (rerun it with the same flags; it resumes)"
    ) from e
  except ValueError as e:
    raise ValueError(
      f"{e}: the file is corrupt or partially copied (rerun the precompute with the same flags; "
      "it rewrites bad shards)"
    ) from e


def shard_problem(
  path: str,
  *,
  num_records: int | None = None,
  source: range | None = None,
  check_crc: bool = False,
) -> str | None:
  """Why the finished shard `path` must be rewritten, or None if it is intact.

  The cheap checks read only the sidecar and the file size: the sidecar parses, its index is
  that of a TFRecord file of the file's size, and its record count and source range are the
  ones expected. `check_crc` also reads every record: both CRCs, and each record at its offset.

  Args:
    path: the shard's .tfrecord path (it and its sidecar exist).
    num_records: the record count the manifest recorded for this shard, if any.
    source: the source examples the shard must hold (checked if the sidecar records them).
    check_crc: read and checksum every record.
  """
  try:
    meta = read_shard_meta(path)
  except (FileNotFoundError, ValueError) as e:
    return str(e).removeprefix(f"shard {path}: ")
  if num_records is not None and meta["num_records"] != num_records:
    return f"its sidecar counts {meta['num_records']} records, the manifest {num_records}"
  held = meta.get("source_range")
  if source is not None and held is not None and list(held) != [source.start, source.stop]:
    return (
      f"it holds source examples [{held[0]}, {held[1]}), the shard plan says "
      f"[{source.start}, {source.stop})"
    )
  if not check_crc:
    return None
  return records.check_records(path, meta["offsets"], int(meta["size_bytes"]))


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Loads `data_dir/manifest.json`.

  Raises:
    FileNotFoundError: no data dir or no manifest.
    ValueError: not a manifest of this format.
  """
  import tensorflow as tf

  if not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(f"data dir {data_dir!r} does not exist")
  path = os.path.join(data_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {data_dir!r} holds no precomputed embeddings (run imagen-jax "
      "precompute, or give a text encoder to encode captions on the fly)"
    )
  try:
    with tf.io.gfile.GFile(path) as f:
      manifest = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} has format {manifest.get('format')!r}; expected {FORMAT!r}")
  return manifest


def check_manifest(
  manifest: dict[str, Any],
  path: str,
  *,
  max_length: int | None = None,
  expected_encoder: dict[str, Any] | None = None,
  width: int | None = None,
) -> None:
  """Raises ValueError naming every way `manifest` differs from what training expects."""
  problems = []
  if max_length is not None and manifest["max_length"] != max_length:
    problems.append(f"max_length: data {manifest['max_length']} != config {max_length}")
  if width is not None and manifest["embedding_width"] != width:
    problems.append(f"embedding width: data {manifest['embedding_width']} != encoder {width}")
  if expected_encoder:
    have = manifest.get("encoder", {})
    for k, v in expected_encoder.items():
      if have.get(k) != v:
        problems.append(f"encoder {k}: data {have.get(k)!r} != expected {v!r}")
  if problems:
    raise ValueError(
      f"{path} was precomputed for a different text encoder / config: " + "; ".join(problems)
    )

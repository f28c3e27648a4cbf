"""webdataset / img2dataset tar shards as a seqio source, with image and caption filters.

Layout: a directory (or a glob, local or `gs://`) of `.tar` files; the members of one example
are adjacent and share a key, webdataset's rule: `dir/000123.jpg` + `dir/000123.txt` (+
`dir/000123.json`) form example `dir/000123`. Images may be jpg / jpeg / png / webp; the caption
is the stripped `.txt`.

Every member group gets an ordinal in the sorted tar order, its `source_index`. Groups that
cannot become an example (undecodable image, no caption, no image, a tar that stops reading)
are skipped and noted in the source's `Tally` under their ordinal; the examples that are kept
carry `source_index`, so a reader can attribute every skipped group to the stretch of the stream
it fell in (precompute records them per shard, exactly, however often the stream is re-read).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Iterator, Sequence
from typing import Any

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Why a member group was skipped (the keys of the counts in the manifest).
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
MISSING_IMAGE = "missing_image"
UNREADABLE_TAR = "unreadable_tar"


def list_tars(pattern: str) -> list[str]:
  """The `.tar` files of a directory, or those matching a glob, sorted.

  Raises:
    FileNotFoundError: nothing matches (the message says what was looked for).
  """
  import tensorflow as tf

  if any(c in pattern for c in "*?["):
    found = tf.io.gfile.glob(pattern)
  elif tf.io.gfile.isdir(pattern):
    found = tf.io.gfile.glob(os.path.join(pattern, "*.tar"))
  elif tf.io.gfile.exists(pattern) and pattern.endswith(".tar"):
    found = [pattern]
  else:
    raise FileNotFoundError(f"{pattern!r} is neither a directory, a .tar file nor a glob")
  tars = sorted(p for p in found if p.endswith(".tar"))
  if not tars:
    raise FileNotFoundError(f"no .tar shards in {pattern!r}")
  return tars


class Tally:
  """Skipped member groups of one source, by ordinal; `total` once a full pass finished."""

  def __init__(self):
    self.skipped: dict[int, tuple[str, str]] = {}  # ordinal -> (key, reason)
    self.total: int | None = None
    self._lock = threading.Lock()

  def note(self, ordinal: int, key: str, reason: str) -> None:
    with self._lock:
      if ordinal not in self.skipped:
        logger.warning("webdataset: skipping %s: %s", key, reason.replace("_", " "))
      self.skipped[ordinal] = (key, reason)

  def count(self, start: int, stop: int | None) -> dict[str, int]:
    """Skips per reason among ordinals in [start, stop) (stop None: to the end)."""
    out: dict[str, int] = {}
    with self._lock:
      for ordinal, (_, reason) in self.skipped.items():
        if ordinal >= start and (stop is None or ordinal < stop):
          out[reason] = out.get(reason, 0) + 1
    return out


def _split_member(name: str) -> tuple[str, str]:
  """(key, extension) of a tar member, webdataset's way: the basename up to its first dot."""
  directory, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_groups(tars: Sequence[str]) -> Iterator[tuple[str, dict[str, bytes] | None]]:
  """(key, {extension: bytes}) per member group, in tar order; (tar, None) for a tar that breaks.

  A tar that stops reading (truncated, not a tar) yields the groups read so far, then one
  (path, None).
  """
  import tensorflow as tf

  for path in tars:
    key, group = None, {}
    try:
      with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
          if not member.isfile():
            continue
          k, ext = _split_member(member.name)
          if k != key and key is not None:
            yield key, group
            group = {}
          key = k
          data = tar.extractfile(member)
          group[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
      if key is not None:
        yield key, group
      logger.warning(
        "webdataset: %s stops reading (%s); its remaining members are skipped", path, e
      )
      yield path, None
      continue
    if key is not None:
      yield key, group


def decode_group(key: str, group: dict[str, bytes] | None) -> tuple[dict[str, Any] | None, str]:
  """One example {'key', 'caption', 'image', 'image_height', 'image_width', 'metadata'} from a
  member group, or (None, why it is skipped)."""
  from imagen_jax.data import image_text_folder

  if group is None:
    return None, UNREADABLE_TAR
  ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
  if ext is None:
    return None, MISSING_IMAGE
  caption = group.get("txt", b"").decode("utf-8", errors="replace").strip()
  if not caption:
    return None, MISSING_CAPTION
  loaded = image_text_folder.rgb_image_bytes(group[ext])
  if loaded is None:
    return None, UNDECODABLE_IMAGE
  data, height, width = loaded
  metadata = group.get("json", b"")
  try:
    json.loads(metadata or b"{}")
  except ValueError:
    metadata = b""  # broken metadata is not a reason to lose the image
  return {
    "key": key,
    "caption": caption,
    "image": data,
    "image_height": height,
    "image_width": width,
    "metadata": metadata,
  }, ""


def _dataset(tars: Sequence[str], tally: Tally):
  import tensorflow as tf

  def generate():
    ordinal = 0
    for key, group in iter_groups(tars):
      ex, why = decode_group(key, group)
      if ex is None:
        tally.note(ordinal, key, why)
      else:
        yield {**ex, "source_index": ordinal}
      ordinal += 1
    tally.total = ordinal

  scalar = tf.TensorSpec([], tf.string)
  return tf.data.Dataset.from_generator(
    generate,
    output_signature={
      "key": scalar,
      "caption": scalar,
      "image": scalar,
      "image_height": tf.TensorSpec([], tf.int64),
      "image_width": tf.TensorSpec([], tf.int64),
      "metadata": scalar,
      "source_index": tf.TensorSpec([], tf.int64),
    },
  )


def make_source(pattern: str):
  """A seqio DataSource of the tar shards matching `pattern` (one split, 'train').

  The shard list is read when the dataset is first built, so registering touches no file. The
  source's `tally` (a Tally) holds the skipped groups.
  """
  import seqio

  class WebDatasetSource(seqio.FunctionDataSource):
    """seqio source over tar shards; `tally` counts the skipped member groups."""

    def __init__(self):
      self.pattern = pattern
      self.tally = Tally()
      super().__init__(self._dataset_fn, splits=["train"], caching_permitted=False)

    def _dataset_fn(self, split: str, shuffle_files: bool, seed: int | None = None):
      del split, seed  # one split; the order is the tar order
      if shuffle_files:
        raise ValueError("the webdataset source reads its shards in order (shuffle=False)")
      return _dataset(list_tars(self.pattern), self.tally)

  return WebDatasetSource()


# ----------------------------------------------------------------------------------------------
# Filters: seqio preprocessors over examples with 'image_height', 'image_width' and 'caption'.
# ----------------------------------------------------------------------------------------------


def filter_min_size(ds, min_size: int):
  """Keeps examples whose shorter image side is at least `min_size` pixels."""
  import tensorflow as tf

  return ds.filter(lambda ex: tf.minimum(ex["image_height"], ex["image_width"]) >= min_size)


def filter_aspect_ratio(ds, max_ratio: float):
  """Keeps examples whose longer / shorter image side is at most `max_ratio`."""
  import tensorflow as tf

  def keep(ex):
    h = tf.cast(ex["image_height"], tf.float64)
    w = tf.cast(ex["image_width"], tf.float64)
    return tf.maximum(h, w) <= max_ratio * tf.minimum(h, w)

  return ds.filter(keep)


def filter_caption_length(ds, min_chars: int = 0, max_chars: int = 0):
  """Keeps examples whose caption has [min_chars, max_chars] characters (max 0: no limit)."""
  import tensorflow as tf

  def keep(ex):
    n = tf.strings.length(ex["caption"], unit="UTF8_CHAR")
    ok = n >= min_chars
    return tf.logical_and(ok, n <= max_chars) if max_chars else ok

  return ds.filter(keep)


def filter_preprocessors(
  min_image_size: int = 0,
  max_aspect_ratio: float = 0.0,
  min_caption_length: int = 0,
  max_caption_length: int = 0,
) -> list:
  """The filters a setting switches on (0 = off), as seqio preprocessors."""
  import functools

  out = []
  if min_image_size:
    out.append(functools.partial(filter_min_size, min_size=min_image_size))
  if max_aspect_ratio:
    out.append(functools.partial(filter_aspect_ratio, max_ratio=max_aspect_ratio))
  if min_caption_length or max_caption_length:
    out.append(
      functools.partial(
        filter_caption_length, min_chars=min_caption_length, max_chars=max_caption_length
      )
    )
  return out


def write_tar(path: str, members: Sequence[tuple[str, bytes]]) -> None:
  """Writes (name, bytes) members into an uncompressed tar, in order (tests, examples)."""
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mtime = 0  # same bytes for the same members
      tar.addfile(info, io.BytesIO(data))

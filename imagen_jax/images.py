"""Image helpers: [−1, 1] floats ↔ uint8, grids, PNG files and indexed PNG directories."""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import numpy as np
from PIL import Image

from imagen_jax import errors

INDEX_FILE = "index.json"


def to_uint8(images) -> np.ndarray:
  """[−1, 1] floats → uint8 [0, 255] (rounded, clipped)."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize of a square HWC image (shows low-res inputs as blocks)."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.NEAREST))


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one image with `pad` white pixels between tiles."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y : y + h, x : x + w] = image
  return grid


@contextlib.contextmanager
def _atomic_local_file(path: str):
  """Yields a temporary path beside `path`, renamed onto `path` (os.replace) once written.

  An interrupted or failed write removes the temporary file, so `path` only ever holds a whole
  file (the old one or the new one).
  """
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def save_png(image: np.ndarray, path: str) -> str:
  """Writes a uint8 HWC image as PNG (local or gs:// via tf.io.gfile).

  Local files appear whole or not at all (temporary name, then os.replace); a gs:// object
  appears only when its upload completes.
  """
  if path.startswith("gs://"):
    import io

    import tensorflow as tf

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buffer.getvalue())
    return path
  with _atomic_local_file(path) as tmp:
    Image.fromarray(np.asarray(image)).save(tmp, format="PNG")
  return path


def load_png(path: str) -> np.ndarray:
  """A PNG as a uint8 HWC RGB array."""
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then os.replace)."""
  with _atomic_local_file(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=1)


def image_file(number: int, suffix: str = "") -> str:
  """File name of image `number` in an indexed directory: 00042.png (00042_sr32.png)."""
  return f"{number:05d}{suffix}.png"


def image_number(entry: dict[str, Any]) -> int | None:
  """The number in an index entry's file name (None if it is not an `image_file` name)."""
  stem = os.path.splitext(os.path.basename(str(entry.get("file", ""))))[0]
  return int(stem) if stem.isdigit() else None


class ImageIndex:
  """A directory of numbered PNGs and the index.json that lists them.

  Every PNG is written whole (`save_png`) before its entry is listed, and index.json is
  rewritten atomically, so at any moment — Ctrl-C included — the directory holds whole PNGs and
  an index of finished ones only.

  Args:
    directory: where the PNGs and index.json go.
    header: index.json's fields besides "images" (callers may update it between writes).
    entries: images already finished, by number (a resumed run's).
  """

  # `write(force=False)` is skipped while rewriting the index would cost more than this share
  # of the time since its last rewrite: a run of millions of images would otherwise spend most
  # of its time rewriting a growing index.
  MAX_WRITE_SHARE = 0.05

  def __init__(
    self,
    directory: str,
    header: dict[str, Any],
    entries: dict[int, dict[str, Any]] | None = None,
  ):
    self.directory = directory
    self.header = header
    self.entries = dict(entries or {})
    self._write_seconds = 0.0
    self._written_at = 0.0

  @property
  def path(self) -> str:
    return os.path.join(self.directory, INDEX_FILE)

  def add(
    self,
    number: int,
    image: np.ndarray,
    entry: dict[str, Any],
    stage_images: dict[str, np.ndarray] | None = None,
  ) -> None:
    """Writes image `number` (and `stage_images`, {stage name: uint8 HWC}) and lists it.

    Its entry is {"file": ..., **entry, "stage_files": {name: file}} (stage_files if given).
    """
    entry = {"file": image_file(number), **entry}
    save_png(image, os.path.join(self.directory, entry["file"]))
    if stage_images:
      entry["stage_files"] = {}
      for name, stage_image in stage_images.items():
        entry["stage_files"][name] = image_file(number, f"_{name}")
        save_png(stage_image, os.path.join(self.directory, entry["stage_files"][name]))
    self.entries[number] = entry

  def write(self, force: bool = True) -> bool:
    """Rewrites index.json (atomically) with the header and every listed image, in order.

    Args:
      force: write even if the index is large and was rewritten moments ago.

    Returns:
      Whether it was written.
    """
    start = time.monotonic()
    if not force and self._write_seconds > self.MAX_WRITE_SHARE * (start - self._written_at):
      return False
    images = [self.entries[k] for k in sorted(self.entries)]
    write_json(self.path, {**self.header, "images": images})
    self._written_at = time.monotonic()
    self._write_seconds = self._written_at - start
    return True


def read_index(directory: str) -> dict[str, Any] | None:
  """A directory's index.json (None if it has none); ValueError if it is not an index."""
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is unreadable ({e})") from e
  if not isinstance(index, dict) or not isinstance(index.get("images", []), list):
    raise ValueError(f"{path} is not an image index (no 'images' list)")
  return index


def indexed_prompts(directory: str, flag: str = "--images") -> list[tuple[str, str]]:
  """(image path, prompt) for each entry of the folder's index.json, checked to exist."""
  if not os.path.isdir(directory):
    raise errors.UserError(f"{flag}={directory!r} is not a directory: pass a folder of images")
  try:
    index = read_index(directory)
  except ValueError as e:
    raise errors.UserError(f"{flag}: {e}") from e
  where = os.path.join(directory, INDEX_FILE)
  if index is None:
    raise errors.UserError(
      f"{where}: missing; the score needs each image's prompt: pass a folder written by "
      '`imagen-jax sample` (or add index.json: {"images": [{"file": ..., "prompt": ...}]})'
    )
  pairs = []
  for i, entry in enumerate(index.get("images", [])):
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
      raise errors.UserError(f"{where}: images[{i}] has no 'file' name")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
      raise errors.UserError(f"{where}: images[{i}] ({entry['file']}) has no 'prompt' string")
    path = os.path.join(directory, entry["file"])
    if not os.path.isfile(path):
      raise errors.UserError(f"{where}: images[{i}] names {entry['file']!r}, which is missing")
    pairs.append((path, prompt))
  if not pairs:
    raise errors.UserError(f"{where}: lists no images")
  return pairs

"""A TFDS builder for a user's own folder of captioned images.

Layout (the folder is TFDS's `manual_dir`):
  FOLDER/[SPLIT/]image.jpg + either FOLDER/[SPLIT/]captions.jsonl with lines
  {"file": "image.jpg", "caption": "..."} (paths relative to that folder) or a `image.txt` holding
  the caption beside each image. If FOLDER has `train/`, `validation/` or `test/` sub-folders each
  is a split; otherwise the whole folder is the `train` split.

Undecodable images and images without a caption are skipped and counted in a warning. TFDS writes
into an `incomplete.*` directory and renames it when every split is done, so a failed build never
leaves a half-written dataset behind.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SPLIT_DIRS = ("train", "validation", "test")
CAPTIONS_FILE = "captions.jsonl"


def list_splits(folder: str) -> dict[str, str]:
  """Split name -> directory holding that split's images.

  Raises:
    FileNotFoundError: `folder` does not exist.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image-text folder {folder!r} does not exist or is not a directory")
  subdirs = {
    s: os.path.join(folder, s) for s in SPLIT_DIRS if os.path.isdir(os.path.join(folder, s))
  }
  return subdirs or {"train": folder}


def list_pairs(split_dir: str) -> tuple[list[tuple[str, str, str]], int]:
  """Finds (key, image path, caption) triples in one split directory, sorted by key.

  Returns:
    (pairs, number of images without a caption).

  Raises:
    ValueError: a malformed captions.jsonl line (naming file and line).
  """
  captions: dict[str, str] = {}
  jsonl = os.path.join(split_dir, CAPTIONS_FILE)
  if os.path.exists(jsonl):
    with open(jsonl, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          name, text = record["file"], record["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(
            f"{jsonl}:{lineno}: each line must be a JSON object with 'file' and 'caption' ({e})"
          ) from e
        if not isinstance(name, str) or not isinstance(text, str):
          raise ValueError(f"{jsonl}:{lineno}: 'file' and 'caption' must be strings")
        captions[os.path.normpath(name)] = text
  pairs, uncaptioned = [], 0
  for root, _, files in os.walk(split_dir):
    for name in sorted(files):
      if not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(root, name)
      rel = os.path.normpath(os.path.relpath(path, split_dir))
      text = captions.get(rel)
      if text is None:
        txt = os.path.splitext(path)[0] + ".txt"
        if os.path.exists(txt):
          with open(txt, encoding="utf-8") as f:
            text = f.read().strip()
      if not text:
        uncaptioned += 1
        continue
      pairs.append((rel.replace(os.sep, "/"), path, text))
  pairs.sort()
  return pairs, uncaptioned


def load_rgb_image_bytes(path: str) -> tuple[bytes, int, int] | None:
  """Encoded RGB PNG/JPEG bytes of an image file, or None if it cannot be decoded.

  JPEG/PNG RGB files keep their bytes; anything else is converted to RGB and re-encoded as PNG.

  Returns:
    (bytes, height, width) or None.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError:
    return None
  return rgb_image_bytes(data)


def rgb_image_bytes(data: bytes) -> tuple[bytes, int, int] | None:
  """`load_rgb_image_bytes` of bytes already read (e.g. a tar member)."""
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # decodes fully: truncated files fail here, not during training
      if im.mode == "RGB" and im.format in ("PNG", "JPEG"):
        return data, im.height, im.width
      rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue(), rgb.height, rgb.width
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None


def generate_examples(split_dir: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) for one split; warns with the number of skipped images."""
  pairs, uncaptioned = list_pairs(split_dir)
  undecodable = []
  for key, path, text in pairs:
    loaded = load_rgb_image_bytes(path)
    if loaded is None:
      undecodable.append(path)
      continue
    data, _, _ = loaded
    yield key, {"image": io.BytesIO(data), "caption": text, "key": key}
  if undecodable or uncaptioned:
    message = (
      f"image_text_folder {split_dir!r}: skipped {len(undecodable)} undecodable image(s)"
      f"{' (e.g. ' + undecodable[0] + ')' if undecodable else ''} and {uncaptioned} image(s) "
      "without a caption"
    )
    logging.warning(message)
    warnings.warn(message, stacklevel=1)


def _make_builder_class():
  import tensorflow_datasets as tfds

  class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
    """The user's folder of images and captions (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder as manual_dir (imagen-jax precompute --source_dir=FOLDER): images plus "
      "captions.jsonl or one .txt per image, optionally in train/ validation/ test/ sub-folders."
    )

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(
          {
            # encoding_format=None keeps the user's JPEG/PNG bytes as they are.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "key": tfds.features.Text(),
          }
        ),
        supervised_keys=None,
      )

    def _split_generators(self, dl_manager):
      splits = list_splits(os.fspath(dl_manager.manual_dir))
      return {name: generate_examples(path) for name, path in splits.items()}

    def _generate_examples(self, **kwargs):  # pragma: no cover - _split_generators yields
      raise NotImplementedError

  return ImageTextFolder


_CLASS: Any = None


def builder_class():
  """The `ImageTextFolder` TFDS builder class (registered as 'image_text_folder')."""
  global _CLASS
  if _CLASS is None:
    _CLASS = _make_builder_class()
  return _CLASS


def build(source_dir: str, data_dir: str):
  """Builds (or reuses) the image_text_folder dataset from `source_dir` into `data_dir`.

  Args:
    source_dir: the folder of images and captions.
    data_dir: TFDS data directory to write `image_text_folder/1.0.0/` into.

  Returns:
    The prepared TFDS builder.

  Raises:
    FileNotFoundError: `source_dir` is missing.
    ValueError: the folder holds no captioned image.
  """
  import tensorflow_datasets as tfds

  splits = list_splits(source_dir)
  if not any(list_pairs(d)[0] for d in splits.values()):
    raise ValueError(
      f"image-text folder {source_dir!r} holds no captioned image ({', '.join(IMAGE_EXTENSIONS)} "
      f"with a {CAPTIONS_FILE} entry or a .txt beside it)"
    )
  builder = builder_class()(data_dir=data_dir)
  builder.download_and_prepare(
    file_format="tfrecord",
    download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.abspath(source_dir), try_download_gcs=False
    ),
  )
  return builder

"""The images of any source the project reads, for FID reference statistics.

`open_images(PATH, split)` recognises, in this order:
  - a folder of precomputed shards (it holds `manifest.json`, from `imagen-jax precompute`):
    the split's records, one image each;
  - a prepared TFDS dataset (a directory with `dataset_info.json` at or below it, e.g. a
    `coco_captions` build): the split's records, one image per record (COCO's five captions
    share one image, which is counted once);
  - a folder of image files (pytorch-fid's extensions), as `eval fid --images` reads.
Each is read by record index without tf.data, with the same readers training uses.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from imagen_jax import errors

# pytorch-fid's extensions.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


def list_images(directory: str, flag: str = "--images") -> list[str]:
  """The image files directly inside `directory`, sorted (pytorch-fid's extensions)."""
  if not os.path.isdir(directory):
    raise errors.UserError(f"{flag}={directory!r} is not a directory: pass a folder of images")
  files = sorted(
    os.path.join(directory, name)
    for name in os.listdir(directory)
    if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
    and os.path.isfile(os.path.join(directory, name))
  )
  if not files:
    raise errors.UserError(
      f"{flag}={directory!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
      "pass a folder of images"
    )
  return files


def read_image(path: str) -> np.ndarray:
  """uint8 RGB [H, W, 3]; grey, palette and alpha images are converted like pytorch-fid."""
  from imagen_jax import images

  try:
    return images.load_png(path)  # any format PIL opens, despite the name
  except OSError as e:
    raise errors.UserError(f"{path}: not a readable image ({e}): remove or replace it") from e


class ImageSource:
  """`len(source)` images, decoded to uint8 RGB [H, W, 3] by `source.image(i)`."""

  def __init__(self, kind: str, description: str, count: int, read: Callable[[int], np.ndarray]):
    self.kind, self.description = kind, description
    self._count, self._read = count, read

  def __len__(self) -> int:
    return self._count

  def image(self, index: int) -> np.ndarray:
    return self._read(index)


def decode_image(data: bytes, where: str) -> np.ndarray:
  """Encoded image bytes (PNG/JPEG/...) as uint8 RGB, converted like pytorch-fid."""
  from PIL import Image

  try:
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))
  except OSError as e:
    raise errors.UserError(f"{where}: not a decodable image ({e}); rebuild that data") from e


def open_images(path: str, split: str = "train", flag: str = "--source") -> ImageSource:
  """The images of `path` (precomputed shards, a TFDS dataset or an image folder; see above)."""
  from imagen_jax.data import records, shards

  if not os.path.isdir(path):
    raise errors.UserError(
      f"{flag}={path!r} is not a directory: pass a folder of images, precomputed shards or a "
      "prepared TFDS dataset"
    )
  if os.path.isfile(os.path.join(path, shards.MANIFEST)):
    return _precomputed(path, split, flag)
  try:
    tfds_dir = records.find_tfds_dir(path)
  except FileNotFoundError:
    tfds_dir = None
  if tfds_dir is not None:
    return _tfds(tfds_dir, split, flag)
  return image_files(list_images(path, flag), path)


def image_files(files: Sequence[str], description: str = "") -> ImageSource:
  """A list of image files as a source, read in that order."""
  return ImageSource("folder", description, len(files), lambda i: read_image(files[i]))


def _precomputed(path: str, split: str, flag: str) -> ImageSource:
  from imagen_jax.data import input_pipeline

  try:
    examples = input_pipeline.PrecomputedExamples(
      path, split, max_length=None, expected_encoder=None, resolution=0, text_encoder=None
    )
  except ValueError as e:  # e.g. no such split: the message lists the splits it has
    raise errors.UserError(f"{flag}={path!r}: {e}; pass --split=NAME") from e

  def read(i: int) -> np.ndarray:
    return decode_image(examples.load(i, None)["image"], examples.file_of(i))

  return ImageSource("precomputed", f"{path} ({split})", len(examples), read)


def _tfds(dataset_dir: str, split: str, flag: str) -> ImageSource:
  from imagen_jax.data import records

  try:
    source = records.TfdsSource(dataset_dir, split)
  except ValueError as e:
    raise errors.UserError(f"{flag}: {e}; pass --split=NAME") from e

  def read(i: int) -> np.ndarray:
    _, _, image = source.pairs(i)[0]  # every caption of a record shares its image
    return decode_image(image, source.file_of(i))

  return ImageSource("tfds", f"{dataset_dir} ({split})", len(source), read)


def batches(
  source: ImageSource, batch_size: int, desc: str, progress: bool = True
) -> Iterator[list[np.ndarray]]:
  """The source's images in order, `batch_size` at a time, the next batch decoding meanwhile
  (a tqdm bar with rate and ETA when `progress`)."""
  bar = None
  if progress:
    from tqdm import tqdm

    bar = tqdm(total=len(source), desc=desc, unit="img", dynamic_ncols=True)
  starts = range(0, len(source), batch_size)

  def decode(start: int) -> list[np.ndarray]:
    return [source.image(i) for i in range(start, min(start + batch_size, len(source)))]

  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = pool.submit(decode, starts[0]) if len(starts) else None
      for k in range(len(starts)):
        chunk = pending.result()
        pending = pool.submit(decode, starts[k + 1]) if k + 1 < len(starts) else None
        yield chunk
        if bar is not None:
          bar.update(len(chunk))
  finally:
    if bar is not None:
      bar.close()

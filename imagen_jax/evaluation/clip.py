"""CLIP score as the text-to-image literature reports it.

  score      100 · max(cos(image embedding, text embedding), 0) per (image, prompt) pair,
             averaged over the images (Hessel et al.'s CLIPScore without their w = 2.5 weight,
             the form Imagen, Parti and SD papers report; Imagen used ViT-L/14 on COCO);
  images     read as uint8 RGB, shortest side resized to the model's image size (224 for
             ViT-L/14) with PIL's bicubic filter, centre-cropped, /255, normalised by CLIP's
             mean and std: HF's CLIPImageProcessor (its PIL path, and OpenAI's preprocess);
  prompts    from the folder's index.json (`imagen-jax sample`'s layout), tokenized with CLIP's
             BPE (`clip_tokenizer`), 77 tokens.
The networks (`clip_model`) read a Hugging Face CLIP folder the user brings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# The (image path, prompt) pairs of a folder written by `imagen-jax sample`.
from imagen_jax.images import indexed_prompts as indexed_prompts

# OpenAI's normalisation constants (HF's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
DEFAULT_BATCH_SIZE = 64


def cosine(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
  """cos of matching rows [N, D] x [N, D] -> [N] (float64)."""
  a = np.asarray(image_embeddings, np.float64)
  b = np.asarray(text_embeddings, np.float64)
  return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def from_cosine(cosines: np.ndarray) -> np.ndarray:
  """CLIP scores 100 · max(cos, 0) of cosines."""
  return 100.0 * np.maximum(np.asarray(cosines, np.float64), 0.0)


def score(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
  """100 · max(cos, 0) of matching rows [N, D] x [N, D] -> [N] (float64)."""
  return from_cosine(cosine(image_embeddings, text_embeddings))


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) with the shorter side `size` and the longer truncated as HF does."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> float32 [size, size, 3], CLIP-normalised.

  PIL's bicubic on the uint8 image (rounded to uint8, antialiased when shrinking) is exactly
  what HF's PIL path and OpenAI's torchvision-on-PIL preprocess run. The crop offset is HF's
  (excess // 2); torchvision's CenterCrop rounds half excesses to even, so on a non-square image
  with an odd excess OpenAI's crop sits one pixel lower/right. Square images (what `sample`
  writes) are only resized.
  """
  from PIL import Image

  h, w = image.shape[:2]
  new_h, new_w = resized_size(h, w, size)
  if (new_h, new_w) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  image = image[top : top + size, left : left + size]
  return ((image.astype(np.float32) / 255.0) - MEAN) / STD


class Scorer:
  """CLIP embeddings of images and prompts in fixed-size jitted batches (one compile each).

  Each batch is split over all local devices (params replicated once); `batch_size` is rounded
  up to a multiple of the device count. Scores depend on the device count only by float
  rounding.
  """

  def __init__(
    self,
    model,
    variables: dict,
    tokenizer,
    batch_size: int = DEFAULT_BATCH_SIZE,
    devices: Sequence | None = None,
  ):
    import jax

    from imagen_jax import parallel

    self.model, self.tokenizer = model, tokenizer
    self.size = model.config.image_size
    self._split = parallel.BatchSplit(devices)
    self.devices = self._split.devices
    self.batch_size = self._split.round_up(batch_size)
    self.variables = self._split.replicate(variables)
    self._image = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))
    self._text = jax.jit(lambda v, ids: model.apply(v, ids, method="encode_text"))

  def _padded(self, fn: Callable, rows: np.ndarray) -> np.ndarray:
    from imagen_jax.evaluation import fid

    batch = self._split.split(fid.pad_batch(rows, self.batch_size))
    return np.asarray(fn(self.variables, batch))[: rows.shape[0]]

  def image_embeddings(self, pixels: np.ndarray) -> np.ndarray:
    """Preprocessed pixels [B, S, S, 3] -> unnormalised embeddings [B, D]."""
    return self._padded(self._image, np.asarray(pixels, np.float32))

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    ids = self.tokenizer(prompts, context_length=self.model.config.max_positions)
    return self._padded(self._text, ids)

  def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
    """Cosines of uint8 images with their prompts, [B] (`score` maps them to CLIP scores)."""
    pixels = np.stack([preprocess(im, self.size) for im in images])
    return cosine(self.image_embeddings(pixels), self.text_embeddings(prompts))


def cosine_pairs(
  pairs: Sequence[tuple[str, str]], scorer: Scorer, progress: bool = True
) -> np.ndarray:
  """Per-image cosines of (path, prompt) pairs, batch by batch (tqdm bar when `progress`)."""
  from imagen_jax.evaluation import fid

  paths = [p for p, _ in pairs]
  out, start = [], 0
  for images in fid.read_batches(paths, scorer.batch_size, "clip score", progress):
    out.append(scorer(images, [t for _, t in pairs[start : start + len(images)]]))
    start += len(images)
  return np.concatenate(out)

"""Fréchet Inception Distance as the field reports it (pytorch-fid / clean-fid conventions).

  features   pool3 of the FID Inception-v3 (`inception.FIDInceptionV3`), images read as uint8
             RGB, divided by 255 and resized to 299x299 inside the network;
  statistics mean and covariance (ddof=1, like np.cov) accumulated in float64 on the host,
             batch by batch (Chan et al.'s pairwise update), so memory stays bounded;
  distance   ||mu1 - mu2||² + Tr(S1 + S2 - 2 sqrt(S1 S2)) with scipy's matrix square root;
             a non-finite root (singular product) is retried with eps·I added to both
             covariances, a small imaginary part is dropped and a large one is an error.
Reference statistics are `.npz` files with `mu` and `sigma` (pytorch-fid's and clean-fid's
layout; clean-fid's KID files with raw `feats` are accepted too).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from imagen_jax import errors
from imagen_jax.evaluation import image_sources

# Folders of image files, read as pytorch-fid reads them.
from imagen_jax.evaluation.image_sources import list_images as list_images
from imagen_jax.evaluation.image_sources import read_image as read_image

# pytorch-fid's list; the suffix is matched case-insensitively.
DEFAULT_BATCH_SIZE = 50
DEFAULT_EPS = 1e-6
# Imaginary parts of the root's diagonal above this mean the covariances are not PSD.
IMAGINARY_ATOL = 1e-3


class FIDWarning(UserWarning):
  """A FID caveat worth reporting (fallback used, too few images for a full-rank covariance)."""


class FeatureStats:
  """Streaming mean and covariance of feature rows, in float64."""

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self._m2 = np.zeros((dim, dim), np.float64)  # sum of centred outer products

  def update(self, features: np.ndarray) -> None:
    """Adds rows [B, dim]."""
    x = np.asarray(features, np.float64).reshape(-1, self.dim)
    n_b = x.shape[0]
    if n_b == 0:
      return
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    m2_b = centred.T @ centred
    n = self.count
    delta = mean_b - self.mean
    total = n + n_b
    # Merging two groups' centred sums avoids the cancellation of sum(x xᵀ) - n mu muᵀ.
    self._m2 += m2_b + np.outer(delta, delta) * (n * n_b / total)
    self.mean += delta * (n_b / total)
    self.count = total

  @property
  def sigma(self) -> np.ndarray:
    """The unbiased covariance (ddof=1)."""
    if self.count < 2:
      raise errors.UserError(
        f"FID statistics need at least 2 images, got {self.count}: add images to the directory"
      )
    return self._m2 / (self.count - 1)


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of feature rows [N, D], as np.mean / np.cov(rowvar=False)."""
  features = np.asarray(features, np.float64)
  stats = FeatureStats(features.shape[1])
  stats.update(features)
  return stats.mean, stats.sigma


def frechet_distance(
  mu1: np.ndarray,
  sigma1: np.ndarray,
  mu2: np.ndarray,
  sigma2: np.ndarray,
  eps: float = DEFAULT_EPS,
  method: str = "sqrtm",
) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    method: how Tr sqrt(sigma1 sigma2) is computed. "sqrtm": scipy's Schur square root with
      pytorch-fid's eps·I fallback (the published numbers; ~45 CPU-s at 2048-d); "eigh": the
      same trace as the square roots of the eigenvalues of sigma1^½ sigma2 sigma1^½ (symmetric
      eigensolvers, several times faster; agrees with "sqrtm" to float64 round-off on
      full-rank statistics, and stays finite on singular ones).

  Warns (FIDWarning) when the product of the covariances needed the eps·I fallback.

  Raises:
    UserError: the statistics differ in size, or the covariances are not positive
      semi-definite (a large imaginary part of the root, or large negative eigenvalues).
  """
  import scipy.linalg

  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise errors.UserError(
      f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / "
      f"{sigma2.shape}: compute both with the same network (2048-d pool3 features)"
    )
  diff = mu1 - mu2
  if method == "eigh":
    return float(
      diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_eigh(sigma1, sigma2)
    )
  if method != "sqrtm":
    raise ValueError(f"method={method!r}: expected 'sqrtm' or 'eigh'")
  with warnings.catch_warnings():
    # scipy warns on singular input; the non-finite check below is what decides.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      warnings.warn(
        f"FID: the covariance product is singular; adding {eps:g} to the diagonals",
        FIDWarning,
        stacklevel=2,
      )
      offset = np.eye(d) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
      raise errors.UserError(
        f"FID: the matrix square root has an imaginary part of {np.max(np.abs(covmean.imag)):g}: "
        "the covariances are not positive semi-definite; recompute the statistics"
      )
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _psd_eigenvalues(matrix: np.ndarray, what: str, vectors: bool = False):
  sym = 0.5 * (matrix + matrix.T)
  w, v = np.linalg.eigh(sym) if vectors else (np.linalg.eigvalsh(sym), None)
  # Round-off leaves tiny negative eigenvalues on PSD matrices; large ones mean bad input.
  if w.size and w.min() < -1e-6 * max(float(np.abs(w).max()), 1e-300):
    raise errors.UserError(
      f"FID: {what} has eigenvalue {w.min():g}: the covariances are not positive "
      "semi-definite; recompute the statistics"
    )
  return np.clip(w, 0.0, None), v


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr sqrt(sigma1 sigma2) = sum sqrt(eig(R sigma2 R)), R = sigma1^½ (similar matrices)."""
  w, v = _psd_eigenvalues(sigma1, "sigma1", vectors=True)
  root = (v * np.sqrt(w)) @ v.T
  lam, _ = _psd_eigenvalues(root @ sigma2 @ root, "sigma1^½ sigma2 sigma1^½")
  return float(np.sqrt(lam).sum())


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, num_images: int | None = None) -> None:
  """Writes pytorch-fid's `.npz` layout (mu, sigma) plus the image count, whole or not at all."""
  from imagen_jax import images

  extra = {} if num_images is None else {"num_images": np.int64(num_images)}
  # Uncompressed: float64 covariances barely compress, and compressing 32 MB takes seconds. A
  # file object, because np.savez appends .npz to a temporary name without it.
  with images._atomic_local_file(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, mu=np.asarray(mu), sigma=np.asarray(sigma), **extra)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray, int | None]:
  """(mu, sigma, image count or None) from a pytorch-fid / clean-fid statistics `.npz`.

  clean-fid writes the same `mu`/`sigma` keys; its KID files hold raw `feats` [N, D], from
  which the statistics are computed.
  """
  if not os.path.isfile(path):
    raise errors.UserError(f"{path}: no such statistics file: pass an existing .npz")
  try:
    with np.load(path, allow_pickle=False) as f:
      keys = set(f.files)
      if {"mu", "sigma"} <= keys:
        n = int(f["num_images"]) if "num_images" in keys else None
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
      elif "feats" in keys:
        feats = np.asarray(f["feats"], np.float64)
        mu, sigma = statistics(feats)
        n = feats.shape[0]
      else:
        raise errors.UserError(
          f"{path}: statistics need keys 'mu' and 'sigma' (or clean-fid's 'feats'), found "
          f"{sorted(keys)}: write them with `imagen-jax eval reference`"
        )
  except (ValueError, OSError) as e:
    if isinstance(e, errors.UserError):
      raise
    raise errors.UserError(f"{path}: not a readable .npz file ({e}): pass a statistics .npz") from e
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise errors.UserError(
      f"{path}: mu {mu.shape} and sigma {sigma.shape} do not form statistics of one feature "
      "size: recompute the file"
    )
  return mu, sigma, n


def read_batches(
  files: Sequence[str], batch_size: int, desc: str, progress: bool = True
) -> Iterator[list[np.ndarray]]:
  """Decoded image files in chunks of `batch_size`, the next chunk decoding while one is
  consumed (a tqdm bar with rate and ETA when `progress`)."""
  return image_sources.batches(image_sources.image_files(files), batch_size, desc, progress)


def pad_batch(rows: np.ndarray, batch_size: int) -> np.ndarray:
  """`rows` [B, ...] (B <= batch_size) zero-padded to [batch_size, ...]: one compiled shape."""
  n = rows.shape[0]
  if n > batch_size:
    raise ValueError(f"batch of {n} exceeds batch_size={batch_size}")
  batch = np.zeros((batch_size, *rows.shape[1:]), rows.dtype)
  batch[:n] = rows
  return batch


class FeatureExtractor:
  """pool3 features of uint8 images, each batch split over all local devices.

  Batches are padded to `batch_size` (rounded up to a multiple of the device count) so one
  shape compiles once per image size.
  """

  def __init__(
    self,
    variables: dict,
    batch_size: int = DEFAULT_BATCH_SIZE,
    devices: Sequence[Any] | None = None,
  ):
    from imagen_jax import parallel
    from imagen_jax.evaluation import inception

    self._split = parallel.BatchSplit(devices)
    self.devices = self._split.devices
    self.batch_size = self._split.round_up(batch_size)
    self.variables = self._split.replicate(variables)
    self._apply = _jitted_apply(inception.FIDInceptionV3())

  @classmethod
  def from_file(cls, path: str, batch_size: int = DEFAULT_BATCH_SIZE) -> FeatureExtractor:
    from imagen_jax.evaluation import inception

    _, variables = inception.load(path)
    return cls(variables, batch_size)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] (B <= batch_size) -> float32 features [B, 2048]."""
    images = np.asarray(images)
    batch = pad_batch(images.astype(np.float32) / 255.0, self.batch_size)  # ToTensor's scaling
    return np.asarray(self._apply(self.variables, self._split.split(batch)))[: images.shape[0]]


_JITTED: dict = {}


def _jitted_apply(model) -> Callable:
  # One jitted function per model config, shared by every extractor in the process, so the
  # network compiles once per input shape.
  import jax

  if model not in _JITTED:
    _JITTED[model] = jax.jit(model.apply)
  return _JITTED[model]


def _same_shape_runs(images: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
  """Consecutive runs of one image size: a batch holds one size, so a size change splits it."""
  start = 0
  for j in range(1, len(images) + 1):
    if j == len(images) or images[j].shape != images[start].shape:
      yield images[start:j]
      start = j


def directory_stats(
  files: Sequence[str],
  extractor: FeatureExtractor,
  progress: bool = True,
  desc: str = "fid features",
) -> FeatureStats:
  """Feature statistics of image files (a tqdm bar with rate and ETA when `progress`)."""
  return source_stats(image_sources.image_files(files), extractor, progress, desc)


def source_stats(
  source: image_sources.ImageSource,
  extractor: FeatureExtractor,
  progress: bool = True,
  desc: str = "fid features",
) -> FeatureStats:
  """Feature statistics of every image of a source (folder, precomputed shards, TFDS)."""
  from imagen_jax.evaluation import inception

  stats = FeatureStats(inception.FEATURE_DIM)
  for chunk in image_sources.batches(source, extractor.batch_size, desc, progress):
    for images in _same_shape_runs(chunk):
      stats.update(extractor(np.stack(images)))
  return stats


def few_images_warning(count: int, dim: int) -> str | None:
  """A caveat when the covariance cannot be full rank (FID is biased and not comparable)."""
  if count <= dim:
    return (
      f"{count} images give a rank-deficient {dim}x{dim} covariance: FID is biased upwards "
      "and not comparable to published numbers (those use 10k-50k images)"
    )
  return None

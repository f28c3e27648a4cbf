"""Noise-conditioning augmentation for super-resolution stages (Imagen §2.5, Appendix B).

The low-res conditioning image is corrupted with the forward process at an augmentation level
a ∈ [0, 1] (a time on its own schedule); the network receives λ(a) so it knows how noisy its
input is. Training draws a ~ U(0, 1) per example; sampling uses a fixed level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.process import q_sample
from imagen_jax.diffusion.schedules import get_schedule
from imagen_jax.utils.validation import check_range

DEFAULT_SAMPLING_AUG_LEVEL = 0.2  # the paper finds 0 best for FID and 0.1–0.3 best-looking


def augment_lowres(
  lowres: jax.Array,
  rng: jax.Array,
  level: float | jax.Array | None = None,
  schedule: str = "cosine",
  max_level: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Noises the low-res image at level a and returns (noised image, λ(a) per example).

  Args:
    lowres: [B, h, w, C] conditioning images in [−1, 1].
    rng: PRNG key.
    level: None draws a ~ U(0, max_level) per example (training); a float (or [B] array) in
      [0, 1] is a fixed level (sampling).
    schedule: the augmentation's noise schedule name.
    max_level: upper end of the training distribution, in [0, 1].
  """
  log_snr_fn = get_schedule(schedule)
  batch = lowres.shape[0]
  level_rng, noise_rng = jax.random.split(rng)
  if level is None:
    check_range("max_level", max_level, 0.0, 1.0)
    levels = jax.random.uniform(level_rng, (batch,), maxval=max_level)
  else:
    if isinstance(level, int | float):
      check_range("aug_level", float(level), 0.0, 1.0)
    levels = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (batch,))
  aug_log_snr = log_snr_fn(levels)
  noise = jax.random.normal(noise_rng, lowres.shape, lowres.dtype)
  return q_sample(lowres, aug_log_snr, noise), aug_log_snr

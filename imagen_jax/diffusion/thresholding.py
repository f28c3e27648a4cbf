"""Thresholding of x̂₀ during sampling (Imagen §2.3): none, static, dynamic."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.process import broadcast_to_rank
from imagen_jax.utils.validation import check_choice, check_range

THRESHOLDING_MODES = ("none", "static", "dynamic")
DEFAULT_PERCENTILE = 99.5  # the paper's p


def dynamic_threshold_scale(x0: jax.Array, percentile: float = DEFAULT_PERCENTILE) -> jax.Array:
  """s = max(1, p-th percentile of |x̂₀|), one value per sample ([B])."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  return jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)


def threshold(
  x0: jax.Array, mode: str = "dynamic", percentile: float = DEFAULT_PERCENTILE
) -> jax.Array:
  """Applies thresholding to a batch of x̂₀ predictions.

  Args:
    x0: [B, ...] predicted clean images.
    mode: 'none', 'static' (clip to [−1, 1]) or 'dynamic' (clip to [−s, s], divide by s).
    percentile: p for dynamic thresholding, in (0, 100].
  """
  check_choice("thresholding", mode, THRESHOLDING_MODES)
  check_range("percentile", percentile, 0.0, 100.0, low_open=True)
  if mode == "none":
    return x0
  if mode == "static":
    return jnp.clip(x0, -1.0, 1.0)
  s = broadcast_to_rank(dynamic_threshold_scale(x0, percentile), x0)
  return jnp.clip(x0, -s, s) / s

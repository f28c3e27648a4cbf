"""Thresholding of x̂₀ during sampling (Imagen §2.3): none, static, dynamic."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.process import broadcast_to_rank
from imagen_jax.utils.validation import check_choice, check_range

THRESHOLDING_MODES = ("none", "static", "dynamic")
DEFAULT_PERCENTILE = 99.5  # the paper's p


def check_max_scale(max_scale: float | None) -> None:
  """ValueError unless `max_scale` is None or >= 1 (s is never below 1)."""
  if max_scale is not None and not max_scale >= 1.0:
    raise ValueError(f"max_threshold={max_scale}; must be >= 1 (IF: 1.5; none = no cap)")


def dynamic_threshold_scale(
  x0: jax.Array, percentile: float = DEFAULT_PERCENTILE, max_scale: float | None = None
) -> jax.Array:
  """s = max(1, p-th percentile of |x̂₀|), capped at `max_scale` if given, per sample ([B]).

  The cap is DeepFloyd IF's `sample_max_value` (1.5); the paper has none.
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
  return s if max_scale is None else jnp.minimum(s, max_scale)


def threshold(
  x0: jax.Array,
  mode: str = "dynamic",
  percentile: float = DEFAULT_PERCENTILE,
  max_scale: float | None = None,
) -> jax.Array:
  """Applies thresholding to a batch of x̂₀ predictions.

  Args:
    x0: [B, ...] predicted clean images.
    mode: 'none', 'static' (clip to [−1, 1]) or 'dynamic' (clip to [−s, s], divide by s).
    percentile: p for dynamic thresholding, in (0, 100].
    max_scale: dynamic thresholding's cap on s (>= 1; None: no cap).
  """
  check_choice("thresholding", mode, THRESHOLDING_MODES)
  check_range("percentile", percentile, 0.0, 100.0, low_open=True)
  check_max_scale(max_scale)
  if mode == "none":
    return x0
  if mode == "static":
    return jnp.clip(x0, -1.0, 1.0)
  s = broadcast_to_rank(dynamic_threshold_scale(x0, percentile, max_scale), x0)
  return jnp.clip(x0, -s, s) / s

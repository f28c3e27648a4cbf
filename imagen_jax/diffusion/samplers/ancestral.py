"""Ancestral sampling from the DDPM posterior (Kingma et al. 2021, VDM form):
z_s ~ q(z_s | z_t, x̂₀) = N(α_s[(1−c) z_t/α_t + c x̂₀], c σ_s²), c = −expm1(λ_t − λ_s)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process, schedules
from imagen_jax.diffusion.samplers.base import History


def step(
  z: jax.Array,
  x0: jax.Array,
  log_snr_t: jax.Array,
  log_snr_s: jax.Array,
  history: History,
  noise: jax.Array,
  eta: float,
) -> jax.Array:
  """One ancestral step from λ_t to λ_s."""
  del history, eta
  alpha_t, _ = schedules.alpha_sigma(log_snr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(log_snr_s)
  c = -jnp.expm1(log_snr_t - log_snr_s)
  b = functools.partial(process.broadcast_to_rank, like=z)
  mean = b(alpha_s) * (b((1.0 - c) / alpha_t) * z + b(c) * x0)
  return mean + b(jnp.sqrt(c) * sigma_s) * noise

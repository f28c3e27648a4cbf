"""DDIM(η) (Song et al. 2021) on log-SNR: z_s = α_s x̂₀ + sqrt(σ_s² − σ̃²) ε̂ + σ̃ ξ with
σ̃ = η sqrt(c) σ_s and c = 1 − SNR(t)/SNR(s) = −expm1(λ_t − λ_s); ε̂ is recomputed from the
thresholded x̂₀. η = 0 is deterministic (the probability-flow ODE's first-order solver); η = 1
equals the ancestral sampler."""

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
  """One DDIM step from λ_t to λ_s."""
  del history
  eps = process.eps_from_x0(z, x0, log_snr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(log_snr_s)
  c = -jnp.expm1(log_snr_t - log_snr_s)
  noise_std = eta * jnp.sqrt(c) * sigma_s
  eps_coef = jnp.sqrt(jnp.maximum(sigma_s**2 - noise_std**2, 0.0))
  b = functools.partial(process.broadcast_to_rank, like=z)
  return b(alpha_s) * x0 + b(eps_coef) * eps + b(noise_std) * noise

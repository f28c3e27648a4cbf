"""DPM-Solver++(2M): the multistep second-order solver of the probability-flow ODE in data
prediction form (Lu et al. 2022, "DPM-Solver++", Algorithm 2), on our log-SNR parametrisation.

DPM-Solver writes λ = log(α/σ), half our log-SNR. With h = λ_s − λ_t, one step from t to s is

    z_s = (σ_s/σ_t) z_t − α_s (e^(−h) − 1) D,

exact for a constant D. D = x̂₀(t) is the first-order choice (it equals DDIM η = 0); with the
previous step's x̂₀ and r = h_prev / h,

    D = (1 + 1/(2r)) x̂₀(t) − 1/(2r) x̂₀(t_prev)

is the second-order multistep one. The solver works on x̂₀, so Imagen's thresholding applies to
each x̂₀ before it enters D (the setting DPM-Solver++ was designed for). The first step has no
history and is first order. Deterministic: `noise` and `eta` are unused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import process, schedules
from imagen_jax.diffusion.samplers.base import History


def multistep_x0(
  x0: jax.Array, log_snr_t: jax.Array, log_snr_s: jax.Array, history: History
) -> jax.Array:
  """The second-order combination D of this and the previous x̂₀ (x̂₀ itself on the first
  step)."""
  h = 0.5 * (log_snr_s - log_snr_t)
  h_prev = 0.5 * (log_snr_t - history.log_snr)
  # On the first step the history is a placeholder: guard the division, the value is unused.
  half_inv_r = jnp.where(history.first, 0.0, 0.5 * h / jnp.where(history.first, 1.0, h_prev))
  b = functools.partial(process.broadcast_to_rank, like=x0)
  return b(1.0 + half_inv_r) * x0 - b(half_inv_r) * history.x0


def step(
  z: jax.Array,
  x0: jax.Array,
  log_snr_t: jax.Array,
  log_snr_s: jax.Array,
  history: History,
  noise: jax.Array,
  eta: float,
) -> jax.Array:
  """One DPM-Solver++(2M) step from λ_t to λ_s."""
  del noise, eta
  d = multistep_x0(x0, log_snr_t, log_snr_s, history)
  _, sigma_t = schedules.alpha_sigma(log_snr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(log_snr_s)
  h = 0.5 * (log_snr_s - log_snr_t)
  b = functools.partial(process.broadcast_to_rank, like=z)
  return b(sigma_s / sigma_t) * z - b(alpha_s * jnp.expm1(-h)) * d

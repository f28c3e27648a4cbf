"""The forward process q(z_t | x) and conversions between ε, v and x̂₀ predictions.

All functions take the log-SNR per example ([B]) and broadcast it over the image dims.
v-prediction follows Salimans & Ho (2022): v = α ε − σ x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.schedules import alpha_sigma
from imagen_jax.utils.validation import check_choice

OBJECTIVES = ("eps", "v")


def broadcast_to_rank(per_example: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a [B] array to [B, 1, ..., 1] with the rank of `like`."""
  per_example = jnp.asarray(per_example)
  return per_example.reshape(per_example.shape + (1,) * (like.ndim - per_example.ndim))


def _alpha_sigma_like(log_snr: jax.Array, like: jax.Array) -> tuple[jax.Array, jax.Array]:
  alpha, sigma = alpha_sigma(log_snr)
  return broadcast_to_rank(alpha, like), broadcast_to_rank(sigma, like)


def q_sample(x: jax.Array, log_snr: jax.Array, noise: jax.Array) -> jax.Array:
  """Samples z_t = α x + σ ε from q(z_t | x)."""
  alpha, sigma = _alpha_sigma_like(log_snr, x)
  return alpha * x + sigma * noise


def x0_from_eps(z: jax.Array, eps: jax.Array, log_snr: jax.Array) -> jax.Array:
  """x̂₀ = (z − σ ε̂) / α."""
  alpha, sigma = _alpha_sigma_like(log_snr, z)
  return (z - sigma * eps) / alpha


def eps_from_x0(z: jax.Array, x0: jax.Array, log_snr: jax.Array) -> jax.Array:
  """ε̂ = (z − α x̂₀) / σ."""
  alpha, sigma = _alpha_sigma_like(log_snr, z)
  return (z - alpha * x0) / sigma


def v_from_eps_x0(eps: jax.Array, x0: jax.Array, log_snr: jax.Array) -> jax.Array:
  """v = α ε − σ x."""
  alpha, sigma = _alpha_sigma_like(log_snr, eps)
  return alpha * eps - sigma * x0


def x0_from_v(z: jax.Array, v: jax.Array, log_snr: jax.Array) -> jax.Array:
  """x̂₀ = α z − σ v̂."""
  alpha, sigma = _alpha_sigma_like(log_snr, z)
  return alpha * z - sigma * v


def eps_from_v(z: jax.Array, v: jax.Array, log_snr: jax.Array) -> jax.Array:
  """ε̂ = σ z + α v̂."""
  alpha, sigma = _alpha_sigma_like(log_snr, z)
  return sigma * z + alpha * v


def x0_from_model_output(
  z: jax.Array, model_output: jax.Array, log_snr: jax.Array, objective: str
) -> jax.Array:
  """x̂₀ from the network's output under the given objective ('eps' or 'v')."""
  check_choice("objective", objective, OBJECTIVES)
  if objective == "eps":
    return x0_from_eps(z, model_output, log_snr)
  return x0_from_v(z, model_output, log_snr)


def training_target(x0: jax.Array, noise: jax.Array, log_snr: jax.Array, objective: str):
  """What the network regresses: ε (the paper) or v."""
  check_choice("objective", objective, OBJECTIVES)
  if objective == "eps":
    return noise
  return v_from_eps_x0(noise, x0, log_snr)

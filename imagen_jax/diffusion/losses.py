"""The denoising loss: squared error in ε space (Imagen) or v space, optional min-SNR-γ weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.process import OBJECTIVES, training_target
from imagen_jax.utils.validation import check_choice


def min_snr_weight(log_snr: jax.Array, gamma: float, objective: str) -> jax.Array:
  """Min-SNR-γ loss weight (Hang et al. 2023), expressed for the chosen objective.

  The x₀-space weight min(SNR, γ) becomes min(SNR, γ)/SNR in ε space and
  min(SNR, γ)/(SNR + 1) in v space, since ‖ε̂−ε‖² = SNR ‖x̂−x‖² and ‖v̂−v‖² = (SNR+1) ‖x̂−x‖².
  """
  check_choice("objective", objective, OBJECTIVES)
  snr = jnp.exp(log_snr)
  clipped = jnp.minimum(snr, gamma)
  return clipped / snr if objective == "eps" else clipped / (snr + 1.0)


def diffusion_loss(
  model_output: jax.Array,
  x0: jax.Array,
  noise: jax.Array,
  log_snr: jax.Array,
  objective: str = "eps",
  min_snr_gamma: float | None = None,
) -> jax.Array:
  """Per-example mean squared error against the objective's target.

  Args:
    model_output: network prediction [B, ...].
    x0: clean data [B, ...]; noise: the ε used to make z_t; log_snr: λ per example [B].
    objective: 'eps' (paper) or 'v'.
    min_snr_gamma: if set, weight each example by the min-SNR-γ rule.

  Returns:
    [B] float32 losses.
  """
  target = training_target(x0, noise, log_snr, objective)
  err = jnp.square(model_output.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
  if min_snr_gamma is not None:
    if min_snr_gamma <= 0:
      raise ValueError(f"min_snr_gamma={min_snr_gamma!r} must be > 0 (or None to disable)")
    per_example = per_example * min_snr_weight(log_snr, min_snr_gamma, objective)
  return per_example

"""DeepFloyd IF's discrete schedule (1000 steps, `squaredcos_cap_v2`) in continuous time.

IF trained on timesteps n = 0..999 with ᾱ_n = Π_{i≤n} (1 − β_i), β_i = min(1 − ᾱ((i+1)/T) /
ᾱ(i/T), 0.999) and ᾱ(s) = cos²(π/2 · (s + 0.008)/1.008) (diffusers' `betas_for_alpha_bar`).
Continuous time t ∈ [0, 1] maps to n = 1000 t − 1, so the uniform-t grid of N steps (1000 % N = 0)
visits exactly diffusers' 'trailing' timesteps 999, 999 − 1000/N, …, and t = 0 (n = −1) is clean
data. λ is linear between the integer steps; `timestep_from_log_snr` inverts it for the network.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_STEPS = 1000
MAX_BETA = 0.999
# IF's dynamic thresholding: its schedulers' dynamic_thresholding_ratio 0.95 (the Imagen
# paper's percentile is 99.5) and sample_max_value 1.5 (a cap on s the paper does not have).
IF_THRESHOLD_PERCENTILE = 95.0
IF_MAX_THRESHOLD = 1.5


def alphas_cumprod() -> np.ndarray:
  """IF's ᾱ_n, n = 0..999, computed as diffusers does (float64 betas, float32 products)."""
  bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = [
    min(1 - bar((i + 1) / NUM_STEPS) / bar(i / NUM_STEPS), MAX_BETA) for i in range(NUM_STEPS)
  ]
  return np.cumprod(1.0 - np.asarray(betas, np.float32), dtype=np.float32)


def _log_snr_table() -> np.ndarray:
  acp = alphas_cumprod().astype(np.float64)
  return (np.log(acp) - np.log1p(-acp)).astype(np.float32)


LOG_SNR_TABLE = _log_snr_table()  # λ_n, decreasing in n


def log_snr(t: jax.Array, clean_log_snr: float) -> jax.Array:
  """λ(t): IF's λ_n at n = 1000 t − 1, linear between steps; `clean_log_snr` at t = 0 (n = −1)."""
  n = NUM_STEPS * jnp.asarray(t, jnp.float32) - 1.0
  table = jnp.concatenate([jnp.array([clean_log_snr], jnp.float32), jnp.asarray(LOG_SNR_TABLE)])
  return jnp.interp(n, jnp.arange(-1, NUM_STEPS, dtype=jnp.float32), table)


def timestep_from_log_snr(lam: jax.Array) -> jax.Array:
  """The (fractional) IF timestep n ∈ [0, 999] whose λ_n is `lam` (clipped to IF's range)."""
  table = jnp.asarray(LOG_SNR_TABLE[::-1])
  steps = jnp.arange(NUM_STEPS - 1, -1, -1, dtype=jnp.float32)
  return jnp.interp(jnp.asarray(lam, jnp.float32), table, steps)

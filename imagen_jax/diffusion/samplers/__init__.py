"""Ancestral (DDPM posterior) and DDIM samplers over continuous time, each one jitted loop.

Time runs on the uniform grid t_i = 1 − i/N, i = 0..N. Step i maps z at t = t_i to z at
s = t_{i+1} using x̂₀ from the (guided, thresholded) network output:

* ancestral: z_s ~ q(z_s | z_t, x̂₀) = N(α_s[(1−c) z_t/α_t + c x̂₀], c σ_s²),
  with c = 1 − SNR(t)/SNR(s) = −expm1(λ_t − λ_s) (Kingma et al. 2021, VDM form);
* DDIM(η): z_s = α_s x̂₀ + sqrt(σ_s² − σ̃²) ε̂ + σ̃ ξ with σ̃ = η sqrt(c) σ_s, ε̂ recomputed
  from the thresholded x̂₀. η = 0 is deterministic; η = 1 equals the ancestral sampler.

The last step returns x̂₀ itself. The loop is `lax.scan` with the step index folded into the RNG,
so N steps cost one compile and no Python per step; `sample` is meant to be called through
`sample_jit`, which keys its cache on the (hashable) model function and config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance, process, schedules
from imagen_jax.diffusion import thresholding as thresholding_lib
from imagen_jax.diffusion.validation import check_choice, check_positive_int, check_range

SAMPLERS = ("ancestral", "ddim")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Every sampling knob of one stage (hashable: it is a static jit argument)."""

  sampler: str = "ddim"
  num_steps: int = 256
  eta: float = 0.0  # DDIM only
  schedule: str = "cosine"
  objective: str = "eps"
  guidance_weight: float = 1.0
  thresholding: str = "dynamic"
  percentile: float = thresholding_lib.DEFAULT_PERCENTILE

  def __post_init__(self):
    check_choice("sampler", self.sampler, SAMPLERS)
    check_positive_int("num_steps", self.num_steps)
    check_range("eta", self.eta, 0.0, 1.0)
    check_choice("schedule", self.schedule, schedules.SCHEDULES)
    check_choice("objective", self.objective, process.OBJECTIVES)
    check_choice("thresholding", self.thresholding, thresholding_lib.THRESHOLDING_MODES)
    check_range("percentile", self.percentile, 0.0, 100.0, low_open=True)


def time_grid(num_steps: int) -> jax.Array:
  """t_i = 1 − i/N for i = 0..N (N + 1 points from noise to data)."""
  return 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


def _ddim_step(z, x0, eps, log_snr_t, log_snr_s, noise, eta):
  alpha_s, sigma_s = schedules.alpha_sigma(log_snr_s)
  c = -jnp.expm1(log_snr_t - log_snr_s)
  noise_std = eta * jnp.sqrt(c) * sigma_s
  eps_coef = jnp.sqrt(jnp.maximum(sigma_s**2 - noise_std**2, 0.0))
  b = functools.partial(process.broadcast_to_rank, like=z)
  return b(alpha_s) * x0 + b(eps_coef) * eps + b(noise_std) * noise


def _ancestral_step(z, x0, log_snr_t, log_snr_s, noise):
  alpha_t, _ = schedules.alpha_sigma(log_snr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(log_snr_s)
  c = -jnp.expm1(log_snr_t - log_snr_s)
  b = functools.partial(process.broadcast_to_rank, like=z)
  mean = b(alpha_s) * (b((1.0 - c) / alpha_t) * z + b(c) * x0)
  return mean + b(jnp.sqrt(c) * sigma_s) * noise


def sample(
  model_fn: guidance.ModelFn,
  params: Any,
  cond: Any,
  uncond: Any,
  rng: jax.Array,
  shape: tuple[int, ...],
  config: SamplerConfig,
  init_noise: jax.Array | None = None,
  return_intermediates: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Draws samples by running the reverse process from t = 1 to t = 0.

  Args:
    model_fn: `model_fn(params, z, log_snr, cond) -> ε̂ or v̂` (per `config.objective`).
    params: network parameters (traced).
    cond / uncond: conditioning pytrees; uncond may be None when guidance_weight == 1.
    rng: PRNG key; step i uses fold_in(rng, i).
    shape: output shape [B, H, W, C].
    config: sampler settings.
    init_noise: z at t = 1; drawn from rng when None.
    return_intermediates: also return z after every step, [N, B, H, W, C].

  Returns:
    Samples x̂₀ [B, ...] (and intermediates if asked).
  """
  log_snr_fn = schedules.get_schedule(config.schedule)
  times = time_grid(config.num_steps)
  init_rng, loop_rng = jax.random.split(rng)
  z = jax.random.normal(init_rng, shape, jnp.float32) if init_noise is None else init_noise
  batch = shape[0]

  def step(z, i):
    log_snr_t = jnp.full((batch,), log_snr_fn(times[i]))
    log_snr_s = jnp.full((batch,), log_snr_fn(times[i + 1]))
    out = guidance.guided_prediction(
      model_fn, params, z, log_snr_t, cond, uncond, config.guidance_weight
    ).astype(jnp.float32)
    x0 = process.x0_from_model_output(z, out, log_snr_t, config.objective)
    x0 = thresholding_lib.threshold(x0, config.thresholding, config.percentile)
    noise = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
    if config.sampler == "ddim":
      eps = process.eps_from_x0(z, x0, log_snr_t)
      z_next = _ddim_step(z, x0, eps, log_snr_t, log_snr_s, noise, config.eta)
    else:
      z_next = _ancestral_step(z, x0, log_snr_t, log_snr_s, noise)
    z_next = jnp.where(i == config.num_steps - 1, x0, z_next)
    return z_next, (z_next if return_intermediates else None)

  z, intermediates = jax.lax.scan(step, z, jnp.arange(config.num_steps))
  return (z, intermediates) if return_intermediates else z


sample_jit = jax.jit(
  sample, static_argnames=("model_fn", "shape", "config", "return_intermediates")
)

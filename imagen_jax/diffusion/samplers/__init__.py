"""Samplers over continuous time: a registry of step functions and the one jitted loop.

The loop visits N + 1 log-SNRs λ_0 < … < λ_N from noise to data (`log_snr_grid`: uniform in t,
the default, or uniform in λ, which DPM-Solver recommends for few steps). Step i maps z at λ_i
to z at λ_{i+1} using x̂₀ from the (guided, thresholded) network output, by the chosen sampler:

* `ancestral`: the DDPM posterior q(z_s | z_t, x̂₀) (samplers/ancestral.py);
* `ddim`: DDIM(η), η = 0 deterministic, η = 1 the ancestral sampler (samplers/ddim.py);
* `dpmpp_2m`: DPM-Solver++(2M), second-order multistep on x̂₀ (samplers/dpmpp_2m.py).

The last step returns x̂₀ itself. The loop is `lax.scan` with the step index folded into the RNG,
so N steps cost one compile and no Python per step; `sample` is meant to be called through
`sample_jit`, which keys its cache on the (hashable) model function and config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import guidance, process, schedules
from imagen_jax.diffusion import thresholding as thresholding_lib
from imagen_jax.diffusion.samplers import ancestral, ddim, dpmpp_2m
from imagen_jax.diffusion.samplers.base import History, Step
from imagen_jax.utils.validation import check_choice, check_positive_int, check_range

# name -> step function. Add a sampler with a module holding its `step` and a line here.
STEPS: dict[str, Step] = {
  "ancestral": ancestral.step,
  "ddim": ddim.step,
  "dpmpp_2m": dpmpp_2m.step,
}
SAMPLERS = tuple(STEPS)
TIME_SPACINGS = ("uniform_t", "uniform_log_snr")


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
  max_threshold: float | None = None  # cap on dynamic thresholding's s (IF: 1.5)
  time_spacing: str = "uniform_t"

  def __post_init__(self):
    check_choice("sampler", self.sampler, SAMPLERS)
    check_choice("time_spacing", self.time_spacing, TIME_SPACINGS)
    check_positive_int("num_steps", self.num_steps)
    check_range("eta", self.eta, 0.0, 1.0)
    schedules.check_schedule("schedule", self.schedule)
    check_choice("objective", self.objective, process.OBJECTIVES)
    check_choice("thresholding", self.thresholding, thresholding_lib.THRESHOLDING_MODES)
    check_range("percentile", self.percentile, 0.0, 100.0, low_open=True)
    thresholding_lib.check_max_scale(self.max_threshold)


def time_grid(num_steps: int) -> jax.Array:
  """t_i = 1 − i/N for i = 0..N (N + 1 points from noise to data)."""
  return 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


def log_snr_grid(log_snr_fn: schedules.LogSnrFn, num_steps: int, spacing: str) -> jax.Array:
  """The N + 1 log-SNRs the loop visits, from t = 1 (noise) to t = 0 (data).

  'uniform_t' evaluates the schedule on t_i = 1 − i/N; 'uniform_log_snr' spaces λ evenly
  between the schedule's endpoints λ(1) and λ(0).
  """
  check_choice("time_spacing", spacing, TIME_SPACINGS)
  if spacing == "uniform_t":
    return log_snr_fn(time_grid(num_steps))
  ends = log_snr_fn(jnp.array([1.0, 0.0], jnp.float32))
  return jnp.linspace(ends[0], ends[1], num_steps + 1, dtype=jnp.float32)


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
  grid = log_snr_grid(
    schedules.get_schedule(config.schedule), config.num_steps, config.time_spacing
  )
  sampler_step = STEPS[config.sampler]
  init_rng, loop_rng = jax.random.split(rng)
  z = jax.random.normal(init_rng, shape, jnp.float32) if init_noise is None else init_noise
  batch = shape[0]
  history = History(
    jnp.zeros(shape, jnp.float32), jnp.zeros((batch,), jnp.float32), jnp.asarray(True)
  )

  def step(carry, i):
    z, history = carry
    log_snr_t = jnp.full((batch,), grid[i])
    log_snr_s = jnp.full((batch,), grid[i + 1])
    out = guidance.guided_prediction(
      model_fn, params, z, log_snr_t, cond, uncond, config.guidance_weight
    ).astype(jnp.float32)
    x0 = process.x0_from_model_output(z, out, log_snr_t, config.objective)
    x0 = thresholding_lib.threshold(
      x0, config.thresholding, config.percentile, config.max_threshold
    )
    noise = jax.random.normal(jax.random.fold_in(loop_rng, i), shape, jnp.float32)
    z_next = sampler_step(z, x0, log_snr_t, log_snr_s, history, noise, config.eta)
    z_next = jnp.where(i == config.num_steps - 1, x0, z_next)
    carry = (z_next, History(x0, log_snr_t, jnp.asarray(False)))
    return carry, (z_next if return_intermediates else None)

  (z, _), intermediates = jax.lax.scan(step, (z, history), jnp.arange(config.num_steps))
  return (z, intermediates) if return_intermediates else z


sample_jit = jax.jit(
  sample, static_argnames=("model_fn", "shape", "config", "return_intermediates")
)

"""DPM-Solver++(2M) against the exact probability-flow ODE of Gaussian data.

For x ~ N(μ, diag s²) the optimal denoiser is linear, x̂₀(z, λ) = μ + α s²/(α²s² + σ²)(z − αμ),
and the ODE keeps ζ = (z − αμ)/sqrt(α²s² + σ²) constant: the exact z at every λ is known, so
each solver's global error can be measured, and its order read from how the error falls as the
step count doubles (first order: ×2, second order: ×4).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import samplers, schedules
from imagen_jax.diffusion.samplers import ddim, dpmpp_2m
from imagen_jax.diffusion.samplers.base import History
from tests.test_samplers import MU, STD, gaussian_eps

BATCH = 512


def exact_x0(z, log_snr):
  alpha, sigma = schedules.alpha_sigma(log_snr)
  return MU + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (z - alpha * MU)


def exact_z(z_start, log_snr_start, log_snr):
  """The ODE's z at `log_snr`, from z at `log_snr_start`."""
  a0, s0 = schedules.alpha_sigma(log_snr_start)
  a, s = schedules.alpha_sigma(log_snr)
  zeta = (z_start - a0 * MU) / jnp.sqrt(a0**2 * STD**2 + s0**2)
  return a * MU + jnp.sqrt(a**2 * STD**2 + s**2) * zeta


def _solve(step_fn, grid, z):
  """Integrates from grid[0] to grid[-1] with the exact denoiser, one step per interval."""
  history = History(jnp.zeros_like(z), jnp.zeros((z.shape[0],)), jnp.asarray(True))
  for lt, ls in zip(grid[:-1], grid[1:], strict=True):
    lt_b, ls_b = jnp.full((z.shape[0],), lt), jnp.full((z.shape[0],), ls)
    x0 = exact_x0(z, lt)
    z = step_fn(z, x0, lt_b, ls_b, history, jnp.zeros_like(z), 0.0)
    history = History(x0, lt_b, jnp.asarray(False))
  return z


@pytest.mark.parametrize("step_fn,order", [(ddim.step, 1), (dpmpp_2m.step, 2)])
def test_convergence_order_on_the_exact_ode(step_fn, order):
  z0 = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 8))
  start, end = -6.0, 6.0
  target = exact_z(z0, start, end)
  errors = []
  for n in (8, 16, 32, 64):
    grid = jnp.linspace(start, end, n + 1)
    errors.append(float(jnp.sqrt(jnp.mean((_solve(step_fn, grid, z0) - target) ** 2))))
  ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
  print(f"order {order}: errors {errors}, ratios {ratios}")
  # Error × 2^order per halving of h, asymptotically.
  assert 2**order * 0.8 < ratios[-1] < 2**order * 1.25, ratios


def test_first_step_is_ddim():
  z = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  x0 = exact_x0(z, -1.0)
  lt, ls = jnp.full((4,), -1.0), jnp.full((4,), 0.5)
  first = History(jnp.full_like(z, 123.0), jnp.full((4,), 7.0), jnp.asarray(True))
  np.testing.assert_allclose(
    dpmpp_2m.step(z, x0, lt, ls, first, jnp.zeros_like(z), 0.0),
    ddim.step(z, x0, lt, ls, first, jnp.zeros_like(z), 0.0),
    rtol=1e-5,
    atol=1e-6,
  )


def _sampler_error(sampler: str, num_steps: int) -> float:
  """RMS distance of the full sampler's output to the exact ODE solution from the same noise."""
  noise = jax.random.normal(jax.random.PRNGKey(2), (BATCH, 8))
  config = samplers.SamplerConfig(sampler=sampler, num_steps=num_steps, thresholding="none")
  x = samplers.sample_jit(
    gaussian_eps, (MU, STD), None, None, jax.random.PRNGKey(3), (BATCH, 8), config, noise
  )
  grid = samplers.log_snr_grid(schedules.get_schedule("cosine"), num_steps, "uniform_t")
  # The loop returns x̂₀ at its last visited point, grid[N − 1].
  reference = exact_x0(exact_z(noise, grid[0], grid[-2]), grid[-2])
  return float(jnp.sqrt(jnp.mean((x - reference) ** 2)))


def test_dpmpp_2m_in_16_steps_beats_ddim_in_64():
  fast, slow = _sampler_error("dpmpp_2m", 16), _sampler_error("ddim", 64)
  print(f"dpmpp_2m 16 steps: {fast:.2e}; ddim 64 steps: {slow:.2e}")
  assert fast < slow


def test_uniform_log_snr_grid():
  schedule = schedules.get_schedule("cosine")
  grid = samplers.log_snr_grid(schedule, 10, "uniform_log_snr")
  ends = schedule(jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(grid[jnp.array([0, -1])], ends, rtol=1e-6)
  np.testing.assert_allclose(jnp.diff(grid), (ends[1] - ends[0]) / 10, rtol=1e-4)
  np.testing.assert_array_equal(
    samplers.log_snr_grid(schedule, 10, "uniform_t"), schedule(samplers.time_grid(10))
  )
  with pytest.raises(ValueError, match="time_spacing"):
    samplers.SamplerConfig(time_spacing="karras")


def test_point_mass_mixture_at_10_steps_beats_ddim():
  """Two near-point masses (std 0.01): no closed-form ODE solution, so the reference is the
  same noise through DPM-Solver++(2M) at 1000 steps, within 5e-3 of itself at 500 (the loop's
  last x̂₀ is taken at t = 1/N, so the reference itself moves slightly with N)."""
  from tests.test_samplers import MIX_MEANS, MIX_WEIGHTS

  def point_mass_eps(params, z, log_snr, cond):
    del params, cond
    alpha, sigma = schedules.alpha_sigma(log_snr[:, None])
    var = alpha**2 * 0.01**2 + sigma**2
    diff = z[:, None, :] - alpha[:, None] * MIX_MEANS[None]
    resp = jax.nn.softmax(jnp.log(MIX_WEIGHTS)[None] - 0.5 * jnp.sum(diff**2, -1) / var, -1)
    return sigma * jnp.einsum("bk,bkd->bd", resp, diff) / var

  noise = jax.random.normal(jax.random.PRNGKey(4), (BATCH, 4))

  def run(sampler, n):
    config = samplers.SamplerConfig(sampler=sampler, num_steps=n, thresholding="none")
    return samplers.sample_jit(
      point_mass_eps, None, None, None, jax.random.PRNGKey(5), (BATCH, 4), config, noise
    )

  reference = run("dpmpp_2m", 1000)
  assert float(jnp.abs(run("dpmpp_2m", 500) - reference).max()) < 5e-3
  err = {s: float(jnp.sqrt(jnp.mean((run(s, 10) - reference) ** 2))) for s in ("ddim", "dpmpp_2m")}
  print(f"point-mass mixture, RMS error at 10 steps: {err}")
  assert err["dpmpp_2m"] < 0.5 * err["ddim"], err

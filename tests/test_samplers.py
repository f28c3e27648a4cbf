"""Samplers against an exact denoiser: Gaussian and two-mode mixture data in closed form.

For x ~ N(μ, diag s²) and z = α x + σ ε, z ~ N(αμ, α²s² + σ²) and
E[ε | z] = σ (z − αμ) / (α²s² + σ²): the optimal ε-predictor. For a mixture, the same per
component weighted by its posterior responsibility. A correct sampler driven by it reproduces
the data distribution up to discretisation error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import samplers, schedules

MU = jnp.array([0.5, -0.3, 0.0, 0.8, -0.6, 0.2, 0.1, -0.9])
STD = jnp.array([0.3, 0.5, 0.2, 0.1, 0.4, 0.25, 0.6, 0.15])
NUM_SAMPLES = 4096


def gaussian_eps(params, z, log_snr, cond):
  mu, std = params
  alpha, sigma = schedules.alpha_sigma(log_snr[:, None])
  return sigma * (z - alpha * mu) / (alpha**2 * std**2 + sigma**2)


MIX_MEANS = jnp.array([[-0.5, -0.5, -0.5, -0.5], [0.5, 0.5, 0.5, 0.5]])
MIX_WEIGHTS = jnp.array([0.3, 0.7])
MIX_STD = 0.1


def mixture_eps(params, z, log_snr, cond):
  alpha, sigma = schedules.alpha_sigma(log_snr[:, None])
  var = alpha**2 * MIX_STD**2 + sigma**2  # [B, 1]
  diff = z[:, None, :] - alpha[:, None] * MIX_MEANS[None]  # [B, K, D]
  log_resp = jnp.log(MIX_WEIGHTS)[None] - 0.5 * jnp.sum(diff**2, -1) / var
  resp = jax.nn.softmax(log_resp, axis=-1)
  return sigma * jnp.einsum("bk,bkd->bd", resp, diff) / var


def _config(sampler, **kw):
  return samplers.SamplerConfig(
    sampler=sampler, num_steps=256, thresholding="none", guidance_weight=1.0, **kw
  )


@pytest.mark.parametrize(
  "sampler,eta",
  [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)],
)
def test_sampler_reproduces_gaussian_moments(sampler, eta):
  x = samplers.sample_jit(
    gaussian_eps,
    (MU, STD),
    None,
    None,
    jax.random.PRNGKey(0),
    (NUM_SAMPLES, 8),
    _config(sampler, eta=eta),
  )
  mean, var = np.asarray(x.mean(0)), np.asarray(x.var(0))
  # The last step returns x̂₀ = E[x | z] at t = 1/N, whose variance is s²·r with
  # r = α²s² / (α²s² + σ²): for the narrowest dims (s = 0.1) r ≈ 0.97 at N = 256.
  alpha, sigma = schedules.alpha_sigma(schedules.cosine_log_snr(1.0 / 256))
  expected_var = STD**2 * (alpha**2 * STD**2) / (alpha**2 * STD**2 + sigma**2)
  # Standard errors with 4096 samples: mean s/64, variance s²·sqrt(2/4095) ≈ 2.2% of s².
  # Allow 4 standard errors plus 3% of s² for the 256-step discretisation.
  np.testing.assert_array_less(np.abs(mean - MU), 4 * STD / 64 + 0.01)
  np.testing.assert_array_less(np.abs(var / expected_var - 1.0), 4 * 0.022 + 0.03)


def test_sampler_reproduces_mixture_mode_weights():
  for sampler in ("ancestral", "ddim", "dpmpp_2m"):
    x = samplers.sample_jit(
      mixture_eps, None, None, None, jax.random.PRNGKey(1), (NUM_SAMPLES, 4), _config(sampler)
    )
    first_mode = np.mean(np.asarray(x).mean(1) < 0)
    assert abs(first_mode - 0.3) < 0.05, (sampler, first_mode)
    # Within a mode the spread is the component's: std 0.1 per dim.
    spread = np.asarray(x[np.asarray(x).mean(1) > 0] - MIX_MEANS[1]).std()
    assert abs(spread - MIX_STD) < 0.02, (sampler, spread)


def test_ddim_eta0_is_deterministic_given_initial_noise():
  noise = jax.random.normal(jax.random.PRNGKey(5), (64, 8))
  config = _config("ddim", eta=0.0)
  a = samplers.sample_jit(
    gaussian_eps, (MU, STD), None, None, jax.random.PRNGKey(0), (64, 8), config, noise
  )
  b = samplers.sample_jit(
    gaussian_eps, (MU, STD), None, None, jax.random.PRNGKey(99), (64, 8), config, noise
  )
  np.testing.assert_array_equal(a, b)
  c = samplers.sample_jit(
    gaussian_eps,
    (MU, STD),
    None,
    None,
    jax.random.PRNGKey(99),
    (64, 8),
    _config("ancestral"),
    noise,
  )
  assert not np.allclose(a, c), "ancestral sampling must depend on the step noise"


def test_v_objective_matches_eps_objective():
  def gaussian_v(params, z, log_snr, cond):
    mu, std = params
    eps = gaussian_eps(params, z, log_snr, cond)
    alpha, sigma = schedules.alpha_sigma(log_snr[:, None])
    x0 = (z - sigma * eps) / alpha
    return alpha * eps - sigma * x0

  noise = jax.random.normal(jax.random.PRNGKey(3), (32, 8))
  kw = dict(num_steps=32, thresholding="none")
  a = samplers.sample_jit(
    gaussian_eps,
    (MU, STD),
    None,
    None,
    jax.random.PRNGKey(0),
    (32, 8),
    samplers.SamplerConfig(**kw),
    noise,
  )
  b = samplers.sample_jit(
    gaussian_v,
    (MU, STD),
    None,
    None,
    jax.random.PRNGKey(0),
    (32, 8),
    samplers.SamplerConfig(objective="v", **kw),
    noise,
  )
  np.testing.assert_allclose(a, b, atol=2e-4)


def test_repeated_sampling_compiles_once():
  traces = []

  def traced_model(params, z, log_snr, cond):
    traces.append(1)
    return gaussian_eps(params, z, log_snr, cond) * cond["scale"][:, None]

  config = samplers.SamplerConfig(num_steps=16, thresholding="dynamic", guidance_weight=2.0)
  cond = {"scale": jnp.ones((4,))}
  uncond = {"scale": jnp.zeros((4,))}
  outs = []
  for seed in range(3):
    outs.append(
      samplers.sample_jit(
        traced_model, (MU, STD), cond, uncond, jax.random.PRNGKey(seed), (4, 8), config
      )
    )
  assert len(traces) == 1, f"sampler traced {len(traces)} times for 3 calls"
  assert not np.allclose(outs[0], outs[1])
  final, inter = samplers.sample_jit(
    traced_model,
    (MU, STD),
    cond,
    uncond,
    jax.random.PRNGKey(0),
    (4, 8),
    config,
    return_intermediates=True,
  )
  assert inter.shape == (16, 4, 8)
  np.testing.assert_array_equal(inter[-1], final)


@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    ({"sampler": "euler"}, r"sampler='euler'.*ancestral, ddim"),
    ({"num_steps": 0}, r"num_steps=0.*integer >= 1"),
    ({"schedule": "sqrt"}, r"schedule='sqrt'.*cosine, linear"),
    ({"percentile": 0.0}, r"percentile=0.0"),
    ({"eta": 2.0}, r"eta=2.0"),
    ({"objective": "x0"}, r"objective='x0'.*eps, v"),
  ],
)
def test_bad_sampler_config(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    samplers.SamplerConfig(**kwargs)

"""Closed-form tests of the diffusion core: schedules, conversions, loss, thresholding, guidance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import guidance, losses, noise_aug, process, schedules, thresholding


@pytest.mark.parametrize("name", ["cosine", "linear", "cosine+2.77", "linear-1.5"])
def test_schedule_is_decreasing_and_variance_preserving(name):
  log_snr = schedules.get_schedule(name)(jnp.linspace(0.0, 1.0, 1001))
  assert np.all(np.diff(np.asarray(log_snr)) < 0), "λ must strictly decrease in t"
  alpha, sigma = schedules.alpha_sigma(log_snr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2), log_snr, rtol=1e-4, atol=1e-3)


def test_cosine_matches_closed_form_and_endpoints():
  t = np.linspace(0.0, 0.99, 100)
  s = schedules.COSINE_OFFSET
  expected_alpha2 = np.cos(0.5 * np.pi * (t + s) / (1 + s)) ** 2
  alpha, _ = schedules.alpha_sigma(schedules.cosine_log_snr(jnp.asarray(t)))
  np.testing.assert_allclose(alpha**2, expected_alpha2, rtol=1e-5, atol=1e-7)
  # t = 0: λ = −2 log tan(π s / (2 (1 + s))) ≈ 8.77; t = 1: clipped at the floor.
  lam0 = -2 * math.log(math.tan(0.5 * math.pi * s / (1 + s)))
  np.testing.assert_allclose(schedules.cosine_log_snr(0.0), lam0, rtol=1e-5)
  assert float(schedules.cosine_log_snr(1.0)) == schedules.LOG_SNR_MIN


def test_linear_matches_discrete_1000_step_product():
  betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
  alpha_bar = np.cumprod(1.0 - betas)
  for n in (1, 10, 250, 500, 1000):
    discrete = np.log(alpha_bar[n - 1])
    continuous = float(schedules.linear_log_alpha_squared(n / 1000))
    # Integral vs sum differ by the midpoint-rule error, ≤ 1e-4·n/2 + O(β²): well under 1%.
    np.testing.assert_allclose(continuous, discrete, rtol=0.01, atol=1e-4)
  # t = 1 is nearly pure noise (ᾱ ≈ 4e-5, λ ≈ −10.1), as in the DDPM schedule.
  np.testing.assert_allclose(
    schedules.linear_log_snr(1.0), np.log(alpha_bar[-1] / (1 - alpha_bar[-1])), atol=0.02
  )
  assert float(schedules.linear_log_snr(0.0)) == schedules.LOG_SNR_MAX


def test_unknown_schedule_names_the_argument():
  with pytest.raises(ValueError, match=r"schedule='quadratic'.*cosine, linear"):
    schedules.get_schedule("quadratic")
  with pytest.raises(ValueError, match=r"aug_schedule='cosine\+'.*shift such as 'cosine\+2.77'"):
    schedules.check_schedule("aug_schedule", "cosine+")
  with pytest.raises(ValueError, match=r"schedule='cosine-12'.*within \+-10"):
    schedules.get_schedule("cosine-12")


def test_shifted_schedule_adds_the_shift_to_log_snr_and_keeps_the_clip():
  t = jnp.linspace(0.0, 1.0, 101)
  base = np.asarray(schedules.cosine_log_snr(t))
  shifted = np.asarray(schedules.get_schedule("cosine+2.77")(t))
  np.testing.assert_allclose(shifted, np.clip(base + 2.77, -20.0, 20.0), rtol=1e-6)
  # SNR is multiplied by e^2.77 = 16 = (64/16)^2 at every t where neither end clips: the
  # "shifted cosine" of a 16 px stage relative to 64 px (Hoogeboom et al. 2023).
  inside = (base > -20.0) & (base + 2.77 < 20.0)
  np.testing.assert_allclose(np.exp(shifted - base)[inside], math.exp(2.77), rtol=1e-4)
  assert shifted[-1] == pytest.approx(-20.0 + 2.77)  # pure noise still: α² ≈ 4e-8
  np.testing.assert_array_equal(schedules.get_schedule("cosine+0")(t), base)
  assert schedules.parse_schedule("linear-1.5") == ("linear", -1.5)


def test_stage_and_sampler_configs_reject_a_bad_shifted_schedule():
  from imagen_jax.diffusion.samplers import SamplerConfig
  from imagen_jax.stage import StageConfig

  assert StageConfig(schedule="cosine+2.77").schedule == "cosine+2.77"
  with pytest.raises(ValueError, match=r"^schedule='cosine\+2,77' is not supported"):
    StageConfig(schedule="cosine+2,77")
  with pytest.raises(ValueError, match=r"^schedule='cosine\+20'.*within"):
    SamplerConfig(schedule="cosine+20")


def test_eps_v_x0_conversions_round_trip():
  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  x0 = jax.random.uniform(k1, (6, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  log_snr = jax.random.uniform(k3, (6,), minval=-8, maxval=8)
  z = process.q_sample(x0, log_snr, eps)
  v = process.v_from_eps_x0(eps, x0, log_snr)
  np.testing.assert_allclose(process.x0_from_eps(z, eps, log_snr), x0, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(process.eps_from_x0(z, x0, log_snr), eps, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(process.x0_from_v(z, v, log_snr), x0, atol=1e-5)
  np.testing.assert_allclose(process.eps_from_v(z, v, log_snr), eps, atol=1e-5)


def test_loss_is_zero_for_the_true_target_and_min_snr_weights():
  x0 = jnp.ones((3, 2, 2, 1)) * 0.5
  noise = jnp.arange(12.0).reshape(3, 2, 2, 1) / 10
  log_snr = jnp.array([-2.0, 0.0, 3.0])
  for objective in ("eps", "v"):
    target = process.training_target(x0, noise, log_snr, objective)
    np.testing.assert_allclose(losses.diffusion_loss(target, x0, noise, log_snr, objective), 0.0)
  loss = losses.diffusion_loss(noise + 1.0, x0, noise, log_snr, "eps")
  np.testing.assert_allclose(loss, 1.0)
  weighted = losses.diffusion_loss(noise + 1.0, x0, noise, log_snr, "eps", min_snr_gamma=5.0)
  snr = np.exp(np.asarray(log_snr))
  np.testing.assert_allclose(weighted, np.minimum(snr, 5.0) / snr, rtol=1e-6)


def test_dynamic_threshold_leaves_small_values_alone():
  x0 = jnp.linspace(-0.9, 0.9, 2 * 64).reshape(2, 8, 8, 1)
  np.testing.assert_array_equal(thresholding.threshold(x0, "dynamic"), x0)


def test_dynamic_threshold_clips_and_rescales_per_sample():
  # Sample 0: |x| values 0..199 / 100 → s = 99.5th percentile; sample 1 stays inside [−1, 1].
  values = np.arange(200, dtype=np.float32) / 100.0
  x0 = np.stack([values * np.where(np.arange(200) % 2, 1, -1), values / 4]).reshape(2, 10, 20, 1)
  s0 = np.percentile(values, 99.5)
  out = np.asarray(thresholding.threshold(jnp.asarray(x0), "dynamic", 99.5))
  np.testing.assert_allclose(out[0], np.clip(x0[0], -s0, s0) / s0, rtol=1e-6)
  np.testing.assert_allclose(out[1], x0[1], rtol=1e-6)
  assert np.abs(out[0]).max() == pytest.approx(1.0)
  np.testing.assert_allclose(
    thresholding.dynamic_threshold_scale(jnp.asarray(x0), 99.5), [s0, 1.0], rtol=1e-6
  )


def test_static_threshold_and_bad_percentile():
  x0 = jnp.array([[-3.0, -0.5, 0.2, 2.0]])
  np.testing.assert_allclose(
    thresholding.threshold(x0, "static"), [[-1.0, -0.5, 0.2, 1.0]], rtol=1e-7
  )
  np.testing.assert_array_equal(thresholding.threshold(x0, "none"), x0)
  for bad in (0.0, 100.5, -1.0):
    with pytest.raises(ValueError, match=r"percentile=.*\(0.0, 100.0\]"):
      thresholding.threshold(x0, "dynamic", bad)
  with pytest.raises(ValueError, match="thresholding='soft'.*none, static, dynamic"):
    thresholding.threshold(x0, "soft")


def _toy_model(params, z, log_snr, cond):
  # Conditional output depends on cond["emb"], so cond and uncond outputs differ.
  return z * params + cond["emb"][:, None, None, :]


def test_guidance_weights_one_and_zero_and_single_call():
  z = jnp.ones((2, 3, 3, 2))
  log_snr = jnp.zeros((2,))
  cond = {"emb": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
  uncond = {"emb": jnp.zeros((2, 2))}
  calls = []

  def counting_model(params, z, log_snr, cond):
    calls.append(z.shape[0])
    return _toy_model(params, z, log_snr, cond)

  cond_out = _toy_model(2.0, z, log_snr, cond)
  uncond_out = _toy_model(2.0, z, log_snr, uncond)
  out1 = guidance.guided_prediction(counting_model, 2.0, z, log_snr, cond, None, 1.0)
  np.testing.assert_allclose(out1, cond_out)
  assert calls == [2], "w = 1 must skip the unconditional half"
  calls.clear()
  out0 = guidance.guided_prediction(counting_model, 2.0, z, log_snr, cond, uncond, 0.0)
  np.testing.assert_allclose(out0, uncond_out)
  assert calls == [4], "guidance must be one call on the concatenated [cond; uncond] batch"
  out_w = guidance.guided_prediction(counting_model, 2.0, z, log_snr, cond, uncond, 3.0)
  np.testing.assert_allclose(out_w, 3.0 * cond_out - 2.0 * uncond_out, rtol=1e-6)
  with pytest.raises(ValueError, match="needs unconditional inputs"):
    guidance.guided_prediction(counting_model, 2.0, z, log_snr, cond, None, 2.0)


def test_noise_aug_levels_and_errors():
  lowres = jnp.full((4, 4, 4, 3), 0.5)
  rng = jax.random.PRNGKey(1)
  noised, aug_log_snr = noise_aug.augment_lowres(lowres, rng, level=0.2)
  np.testing.assert_allclose(aug_log_snr, schedules.cosine_log_snr(jnp.full((4,), 0.2)))
  alpha, sigma = schedules.alpha_sigma(aug_log_snr[0])
  noise = (noised - alpha * lowres) / sigma
  assert abs(float(noise.std()) - 1.0) < 0.35, "residual must be unit-variance noise"
  _, train_levels = noise_aug.augment_lowres(jnp.zeros((512, 1, 1, 1)), rng)
  # λ of U(0,1) levels spans the schedule's range: both high (~clean) and very low SNRs occur.
  assert float(train_levels.max()) > 5.0 and float(train_levels.min()) < -5.0
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"aug_level=.*\[0.0, 1.0\]"):
      noise_aug.augment_lowres(lowres, rng, level=bad)

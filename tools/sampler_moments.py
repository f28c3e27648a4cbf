"""Prints sampler moments against the truth for Gaussian data driven by the exact denoiser.

Usage: .venv/bin/python tools/sampler_moments.py   (the numbers quoted for the diffusion core)
"""

import jax
import numpy as np

from imagen_jax.diffusion import samplers, schedules
from tests.test_samplers import MU, STD, gaussian_eps


def main() -> None:
  # The last step returns E[x | z] at t = 1/N: its variance is s²·α²s²/(α²s² + σ²).
  alpha, sigma = schedules.alpha_sigma(schedules.cosine_log_snr(1.0 / 256))
  std = np.asarray(STD)
  target = std**2 * (alpha**2 * std**2) / (alpha**2 * std**2 + sigma**2)
  print("| sampler | max abs(mean − μ) | max rel(var − target) | mean rel(var − target) |")
  print("|---|---|---|---|")
  for sampler, eta in (("ancestral", 0.0), ("ddim", 0.0), ("ddim", 1.0)):
    config = samplers.SamplerConfig(sampler=sampler, eta=eta, num_steps=256, thresholding="none")
    x = samplers.sample_jit(
      gaussian_eps, (MU, STD), None, None, jax.random.PRNGKey(0), (4096, 8), config
    )
    mean_err = np.abs(np.asarray(x.mean(0)) - np.asarray(MU))
    var_err = np.abs(np.asarray(x.var(0)) / target - 1)
    name = sampler if sampler == "ancestral" else f"ddim η={eta}"
    print(f"| {name} | {mean_err.max():.4f} | {var_err.max():.3f} | {var_err.mean():.3f} |")


if __name__ == "__main__":
  main()

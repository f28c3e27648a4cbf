"""The sampling knobs of one stage (`StageSampling`) and the checks every sampler entry point
shares (guidance weight, seeds). Unset knobs (None) take the stage's own values."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_jax.diffusion import samplers, thresholding
from imagen_jax.stage import StageConfig

# ================================================================================================
# Per-stage sampling knobs
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class StageSampling:
  """Sampling knobs of one stage (the schedule and objective are the stage's own).

  Attributes:
    sampler: 'ddim', 'ancestral' or 'dpmpp_2m' (DPM-Solver++(2M): DDIM-256 quality in far
      fewer steps).
    num_steps: denoising steps.
    eta: DDIM stochasticity (0 = deterministic; 1 = ancestral).
    guidance_weight: classifier-free guidance w (1 = none; paper COCO: 1.35 base, 8 SR).
    thresholding: 'dynamic' (paper), 'static' or 'none'.
    percentile: dynamic-thresholding percentile p (None = the stage's `sample_percentile`:
      99.5 as in the paper, 95 for DeepFloyd IF).
    max_threshold: cap on dynamic thresholding's s (None = the stage's
      `sample_max_threshold`: no cap, 1.5 for IF; inf = no cap).
    aug_level: SR stages' noise-conditioning level (None = the stage's `aug_sample_level`).
    time_spacing: 'uniform_t' (steps uniform in time) or 'uniform_log_snr'.
  """

  sampler: str = "ddim"
  num_steps: int = 64
  eta: float = 0.0
  guidance_weight: float = 1.0
  thresholding: str = "dynamic"
  percentile: float | None = None
  max_threshold: float | None = None
  aug_level: float | None = None
  time_spacing: str = "uniform_t"

  def __post_init__(self):
    # The one place sampling knobs are range-checked: the library, `imagen-jax sample` and the
    # demo all build a StageSampling before any model loads.
    check_guidance_weight(self.guidance_weight)
    self.sampler_config()  # validates every other field with a clear message
    if self.aug_level is not None and not 0.0 <= self.aug_level <= 1.0:
      raise ValueError(f"aug_level={self.aug_level}; must be in [0, 1] (paper: 0 to 0.3)")

  def sampler_config(self, stage: StageConfig | None = None) -> samplers.SamplerConfig:
    """The sampler's config, unset knobs taken from `stage` (else the paper's)."""
    percentile, cap = self.percentile, self.max_threshold
    if percentile is None:
      percentile = stage.sample_percentile if stage else thresholding.DEFAULT_PERCENTILE
    if cap is None and stage:
      cap = stage.sample_max_threshold
    return samplers.SamplerConfig(
      sampler=self.sampler,
      num_steps=self.num_steps,
      eta=self.eta,
      guidance_weight=float(self.guidance_weight),
      thresholding=self.thresholding,
      percentile=percentile,
      max_threshold=None if cap == math.inf else cap,
      time_spacing=self.time_spacing,
    )

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_guidance_weight(weight: Any) -> float:
  """`weight` as a float if it is a usable classifier-free guidance weight w, else ValueError.

  Guidance is ε̃ = w · ε(z, c) + (1 − w) · ε(z): w = 1 is plain conditional sampling, w > 1
  follows the prompt more strongly, 0 <= w < 1 blends towards unconditional; w < 0 pushes away
  from the prompt, which no sampler setting wants.
  """
  try:
    w = float(weight)
  except (TypeError, ValueError):
    w = float("nan")
  if not (math.isfinite(w) and w >= 0.0):
    raise ValueError(
      f"guidance_weight={weight!r} is invalid; it must be a number >= 0: 1 = no guidance (plain "
      "conditional sampling), larger values follow the prompt more strongly (paper: 1.35 base, "
      "8 super-resolution), values below 1 blend towards unconditional samples"
    )
  return w


# PRNGKey keeps a seed's low 32 bits (without jax_enable_x64): seed 2**32 would repeat seed 0's
# image and seed -1 seed 2**32 - 1's.
MAX_SEED = 2**32 - 1


def check_seeds(seeds: Sequence[int]) -> list[int]:
  """Seeds as ints, each in [0, MAX_SEED] (every seed its own images), else ValueError."""
  out = []
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, int | np.integer):
      raise ValueError(f"seed {s!r} is not an integer; seeds are integers in [0, {MAX_SEED}]")
    if not 0 <= int(s) <= MAX_SEED:
      raise ValueError(
        f"seed {int(s)} is outside [0, {MAX_SEED}]: PRNG seeds are 32-bit, so it would repeat "
        "another seed's image; use seeds in that range"
      )
    out.append(int(s))
  return out

"""Continuous-time noise schedules, parametrised by log-SNR λ(t) for t in [0, 1].

The forward process is variance preserving: z_t = α_t x + σ_t ε with α² = sigmoid(λ),
σ² = sigmoid(−λ), so α² + σ² = 1 and α²/σ² = exp(λ). λ decreases from data (t=0) to noise
(t=1). Schedules are chosen by name (`get_schedule`), which is what gin binds. A name may end
in a log-SNR shift, 'cosine+2.77': λ(t) + 2.77 at every t, less noise at every time (Hoogeboom
et al.'s "shifted cosine" for a resolution d is 'cosine' shifted by 2 log(64 / d)).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion import discrete

# λ is clipped to this range so both endpoints stay finite in float32: sigmoid(±20) is within
# 2e-9 of 0/1, i.e. pure noise at t=1 and (almost) clean data at t=0.
LOG_SNR_MIN = -20.0
LOG_SNR_MAX = 20.0

# Nichol & Dhariwal's offset keeps the cosine schedule's noise non-zero at t=0.
COSINE_OFFSET = 0.008

# Imagen's SR-1024 schedule: the DDPM linear β schedule of 1000 steps, β from 1e-4 to 0.02.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_NUM_STEPS = 1000

LogSnrFn = Callable[[jax.Array], jax.Array]


def cosine_log_snr(t: jax.Array, offset: float = COSINE_OFFSET) -> jax.Array:
  """Cosine schedule: α² = cos²(π/2 · (t+s)/(1+s)), i.e. λ = −2 log tan(π/2 · (t+s)/(1+s))."""
  angle = 0.5 * math.pi * (jnp.asarray(t, jnp.float32) + offset) / (1.0 + offset)
  # tan → ∞ at t = 1; clip the angle just below π/2 before the log, then clip λ itself.
  angle = jnp.clip(angle, 1e-7, 0.5 * math.pi - 1e-7)
  return jnp.clip(-2.0 * jnp.log(jnp.tan(angle)), LOG_SNR_MIN, LOG_SNR_MAX)


def linear_log_alpha_squared(t: jax.Array, num_terms: int = 5) -> jax.Array:
  """log ᾱ(t) of the 1000-step linear-β schedule, in continuous time.

  The discrete ᾱ_n = Π_{i≤n} (1 − β_i) becomes log ᾱ(t) = T ∫₀ᵗ log(1 − β(u)) du with
  β(u) = β₀ + (β₁ − β₀) u and T = 1000 steps. Expanding log(1 − β) = −Σ_k β^k / k and
  integrating term by term gives, with b = β₁ − β₀,
    log ᾱ(t) = −T t Σ_k 1/(k(k+1)) Σ_{j=0..k} β(t)^j β₀^(k−j),
  a sum of positive terms (the closed form w log w − w cancels catastrophically in float32).
  β ≤ 0.02, so 5 terms leave a truncation error below 1e-7.
  """
  t = jnp.asarray(t, jnp.float32)
  beta_t = LINEAR_BETA_START + (LINEAR_BETA_END - LINEAR_BETA_START) * t
  total = jnp.zeros_like(t)
  for k in range(1, num_terms + 1):
    inner = sum(beta_t**j * LINEAR_BETA_START ** (k - j) for j in range(k + 1))
    total = total + inner / (k * (k + 1))
  return -LINEAR_NUM_STEPS * t * total


def linear_log_snr(t: jax.Array) -> jax.Array:
  """λ(t) = log(ᾱ / (1 − ᾱ)) for the continuous linear-β schedule (Imagen's SR-1024)."""
  log_alpha2 = linear_log_alpha_squared(t)
  # log(1 − ᾱ) computed as log(−expm1(log ᾱ)) to stay accurate as ᾱ → 1 near t = 0.
  log_sigma2 = jnp.log(-jnp.expm1(jnp.minimum(log_alpha2, -1e-12)))
  return jnp.clip(log_alpha2 - log_sigma2, LOG_SNR_MIN, LOG_SNR_MAX)


SCHEDULES: dict[str, LogSnrFn] = {
  "cosine": cosine_log_snr,
  "linear": linear_log_snr,
  # DeepFloyd IF's discrete 1000-step cosine schedule (diffusion/discrete.py).
  "deepfloyd": lambda t: jnp.clip(discrete.log_snr(t, LOG_SNR_MAX), LOG_SNR_MIN, LOG_SNR_MAX),
}


# A schedule name, optionally followed by a signed log-SNR shift: 'cosine', 'cosine+2.77'.
_SHIFTED_NAME = re.compile(r"(?P<base>[a-z_]+)(?P<shift>[+-]\d+(\.\d+)?)?")
MAX_SHIFT = 10.0


def parse_schedule(name: str, argument: str = "schedule") -> tuple[str, float]:
  """('cosine', 2.77) for 'cosine+2.77', ('cosine', 0.0) for 'cosine'; a ValueError naming
  `argument` otherwise."""
  match = _SHIFTED_NAME.fullmatch(name) if isinstance(name, str) else None
  if match is None or match["base"] not in SCHEDULES:
    raise ValueError(
      f"{argument}={name!r} is not supported; allowed values: {', '.join(SCHEDULES)}, each "
      "optionally followed by a log-SNR shift such as 'cosine+2.77'"
    )
  shift = float(match["shift"] or 0.0)
  if abs(shift) > MAX_SHIFT:
    raise ValueError(
      f"{argument}={name!r}: a log-SNR shift of {shift:+g} leaves almost no training time at "
      f"either end; use a shift within +-{MAX_SHIFT:g}"
    )
  return match["base"], shift


def check_schedule(argument: str, name: str) -> str:
  """Returns `name` if it names a schedule (optionally shifted), else raises naming `argument`."""
  parse_schedule(name, argument)
  return name


def get_schedule(name: str) -> LogSnrFn:
  """The log-SNR function λ(t) of the named schedule ('cosine', 'linear', 'deepfloyd', each
  optionally shifted: 'cosine+2.77' is λ_cosine(t) + 2.77, clipped to the same range)."""
  base, shift = parse_schedule(name)
  log_snr = SCHEDULES[base]
  if shift == 0.0:
    return log_snr
  return lambda t: jnp.clip(log_snr(t) + shift, LOG_SNR_MIN, LOG_SNR_MAX)


def alpha_sigma(log_snr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(α, σ) for a log-SNR: α = sqrt(sigmoid(λ)), σ = sqrt(sigmoid(−λ))."""
  log_snr = jnp.asarray(log_snr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))

"""What every sampler step sees: one interface, so the loop is written once.

A step maps z at log-SNR λ_t to z at λ_s (s after t, less noisy) given the guided,
thresholded x̂₀ at t. Multistep solvers also read the previous step's x̂₀ and λ (`History`);
single-step ones ignore it. Adding a sampler is one module with one `step` function and one line
in the registry (`samplers/__init__.py`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax


class History(NamedTuple):
  """The previous step's x̂₀ and log-SNR; `first` is True on the first step (nothing before)."""

  x0: jax.Array
  log_snr: jax.Array
  first: jax.Array


class Step(Protocol):
  """`step(z, x0, log_snr_t, log_snr_s, history, noise, eta) -> z_s` (log-SNRs are [B])."""

  def __call__(
    self,
    z: jax.Array,
    x0: jax.Array,
    log_snr_t: jax.Array,
    log_snr_s: jax.Array,
    history: History,
    noise: jax.Array,
    eta: float,
  ) -> jax.Array: ...

"""Optimisers of the paper: Adafactor (base stage) and Adam (SR stages), warm-up + cosine decay."""

from __future__ import annotations

import optax

from imagen_jax.utils.validation import check_choice

OPTIMIZERS = ("adam", "adafactor")


def learning_rate_schedule(
  learning_rate: float = 1e-4,
  warmup_steps: int = 10_000,
  decay_steps: int = 2_500_000,
  end_learning_rate: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up from 0 to `learning_rate`, then cosine decay to `end_learning_rate`."""
  if warmup_steps < 0 or decay_steps <= warmup_steps:
    raise ValueError(
      f"need 0 <= warmup_steps < decay_steps; got warmup_steps={warmup_steps}, "
      f"decay_steps={decay_steps}"
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=learning_rate,
    warmup_steps=warmup_steps,
    decay_steps=decay_steps,
    end_value=end_learning_rate,
  )


def make_optimizer(
  name: str = "adam",
  learning_rate: float = 1e-4,
  warmup_steps: int = 10_000,
  decay_steps: int = 2_500_000,
  end_learning_rate: float = 0.0,
  grad_clip_norm: float | None = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The stage optimiser and its learning-rate schedule.

  Args:
    name: 'adam' (SR stages: β 0.9/0.999, ε 1e-8) or 'adafactor' (base stage).
    learning_rate / warmup_steps / decay_steps / end_learning_rate: the schedule.
    grad_clip_norm: clip gradients by global norm first (None disables).
    b1, b2, eps: Adam's moments.

  Returns:
    (optax transformation, learning-rate schedule for logging).
  """
  check_choice("optimizer", name, OPTIMIZERS)
  schedule = learning_rate_schedule(learning_rate, warmup_steps, decay_steps, end_learning_rate)
  if name == "adam":
    core = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  else:
    # Absolute step sizes (no parameter-scale multiplication) so the paper's lr 1e-4 means
    # the same for both optimisers; factored second moments keep the memory saving.
    core = optax.adafactor(schedule, multiply_by_parameter_scale=False, clipping_threshold=None)
  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
  return optax.chain(*chain, core), schedule

"""Argument checks shared by every layer: errors name the argument and what it may be."""

from __future__ import annotations

from collections.abc import Iterable


def check_choice(argument: str, value: str, allowed: Iterable[str]) -> str:
  """Returns `value` if it is one of `allowed`, else raises a ValueError naming both."""
  allowed = tuple(allowed)
  if value not in allowed:
    raise ValueError(f"{argument}={value!r} is not supported; allowed values: {', '.join(allowed)}")
  return value


def check_range(
  argument: str, value: float, low: float, high: float, low_open: bool = False
) -> float:
  """Raises a ValueError unless low <= value <= high (low < value when `low_open`)."""
  ok = (value > low if low_open else value >= low) and value <= high
  if not ok:
    bracket = "(" if low_open else "["
    raise ValueError(
      f"{argument}={value!r} is out of range; it must lie in {bracket}{low}, {high}]"
    )
  return value


def check_positive_int(argument: str, value: int) -> int:
  """Raises a ValueError unless `value` is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{argument}={value!r} is invalid; it must be an integer >= 1")
  return value

"""A `precompute --after_shard` hook for the kill tests: it pauses after every finished shard,
so a test can kill the job between shards. The subprocess reads the pause from its environment.
"""

from __future__ import annotations

import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--after_shard=tests.shard_hooks:pause"


def pause(path: str) -> None:
  """Sleeps SHARD_PAUSE_S seconds after the shard at `path` is complete."""
  del path
  time.sleep(float(os.environ.get("SHARD_PAUSE_S", "0")))


def env(seconds: float, base: dict[str, str] | None = None) -> dict[str, str]:
  """`base` (default os.environ) with the pause set and this repository importable."""
  out = dict(os.environ if base is None else base)
  out["SHARD_PAUSE_S"] = str(seconds)
  out["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, out.get("PYTHONPATH")) if p)
  return out

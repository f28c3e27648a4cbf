"""Ctrl-C that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives.
JAX's compile path has bare `except:` blocks (e.g. around reading an executable's output
memory kinds), so a Ctrl-C landing there during a compile is swallowed and the job runs on.
`install()` keeps the usual KeyboardInterrupt but also records the signal; long jobs call
`check()` at safe points (after compiling, every training step) to honour one that was lost.
"""

from __future__ import annotations

import signal
import threading

_received = threading.Event()


def _handler(signum, frame) -> None:
  _received.set()
  signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt here, as usual


def install() -> None:
  """Records every SIGINT (main thread only; elsewhere Python's default stays)."""
  _received.clear()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _handler)


def check() -> None:
  """Raises KeyboardInterrupt if a SIGINT arrived since `install()`, even one swallowed."""
  if _received.is_set():
    raise KeyboardInterrupt

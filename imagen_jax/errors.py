"""User errors: problems a user can fix, shown by the CLI as one line with the fix.

Library code raises `UserError` (a `ValueError`, so callers catching `ValueError` keep working)
for bad flags, files, configs and data. The CLI also treats as user errors the `ValueError`s and
file errors our own code raises (the innermost frame is in this package) and every `OSError`
that names a file (missing, not writable, not a directory). Anything else is a bug and keeps its
traceback. No JAX or TF import here: the CLI imports this before any subcommand runs.
"""

from __future__ import annotations

import os
import tempfile
import traceback

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
VERBOSE_ENV = "IMAGEN_JAX_VERBOSE"

# Types whose instances, when raised from our own frames, are validation messages.
_OWN_VALIDATION_TYPES = (ValueError, OSError, KeyError, IndexError)


class UserError(ValueError):
  """A problem with the user's input; its message names the problem and the fix."""


def is_user_error(exc: BaseException) -> bool:
  """Whether `exc` is a user's problem (one line) rather than a bug (traceback)."""
  if isinstance(exc, UserError):
    return True
  if isinstance(exc, OSError) and getattr(exc, "filename", None):
    return True
  return isinstance(exc, _OWN_VALIDATION_TYPES) and _raised_here(exc)


def _frames(exc: BaseException) -> list[traceback.FrameSummary]:
  return list(traceback.extract_tb(exc.__traceback__))


def _raised_here(exc: BaseException) -> bool:
  frames = _frames(exc)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR + os.sep)


def one_line(exc: BaseException) -> str:
  """The exception's message on one line, without gin's "In call to configurable" context."""
  if isinstance(exc, OSError) and getattr(exc, "filename", None):
    text = f"{exc.strerror}: {exc.filename}"
    if isinstance(exc, PermissionError):
      text += " (choose a directory you can write, or fix its permissions)"
  elif isinstance(exc, KeyError) and len(exc.args) == 1:
    text = str(exc.args[0])
  else:
    text = str(exc)
  lines = [line.strip() for line in text.splitlines()]
  kept = [line for line in lines if line and not _is_gin_context(line)]
  return " ".join(kept) or type(exc).__name__


def _is_gin_context(line: str) -> bool:
  return line.startswith(("In call to configurable", "In file ", "No values supplied by Gin"))


def verbose_requested() -> bool:
  """`IMAGEN_JAX_VERBOSE=1` shows tracebacks for user errors too."""
  return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def check_writable_dir(path: str, what: str) -> None:
  """Creates `path` if missing and proves it writable with a probe file (local paths only).

  `what` names the path in the error (e.g. 'MODEL_DIR', '--out'). Runs before any data loads
  or program compiles, so a bad output directory costs seconds. Remote paths (gs://...) are
  left to the first write: probing them costs a round trip.
  """
  if "://" in path:
    return
  path = os.path.abspath(path)
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write_probe-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    why = e.strerror or type(e).__name__
    raise UserError(
      f"{what} {path} is not a writable directory ({why}: {e.filename or path}); "
      "choose a directory you can write, or fix its permissions"
    ) from None

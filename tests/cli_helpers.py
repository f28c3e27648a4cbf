"""Running `imagen-jax` in-process and reading its one-line user errors."""

from __future__ import annotations

import re
from collections.abc import Sequence

from imagen_jax import cli


def user_error(capsys, argv: Sequence[str], pattern: str) -> str:
  """Runs the CLI expecting a user error: exit 2 and ONE stderr line that matches `pattern`.

  Returns:
    The error line.
  """
  capsys.readouterr()
  status = cli.main(list(argv))
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2, (status, err)
  assert len(err) == 1, err
  line = err[0]
  command = next((a for a in argv if a in cli.SUBCOMMANDS), "")
  assert line.startswith(f"imagen-jax {command}: error: "), line
  assert re.search(pattern, line), (pattern, line)
  return line

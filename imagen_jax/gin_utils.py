"""Gin plumbing shared by every configurable subcommand.

Config files ship inside the package (`imagen_jax/configs/`, linked from the repository's
top-level `configs/`) and `include` each other by `configs/...` paths
(`include 'configs/models/base64.gin'`), which resolve from the working directory first, then
from the package, so they work from any directory and from a non-editable install. They use
`from __gin__ import dynamic_registration` so library code carries no gin decorators.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import gin

from imagen_jax import errors

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIGS_DIR = os.path.join(PACKAGE_DIR, "configs")


def split_gin_binding_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls `--gin.KEY=VALUE` flags out of argv.

  Returns:
    (bindings as 'KEY = VALUE' strings, the remaining argv).
  """
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin.") :].partition("=")
      if not sep or not key:
        raise errors.UserError(f"malformed gin binding {arg!r}: write it as --gin.KEY=VALUE")
      bindings.append(f"{key} = {value}")
    else:
      rest.append(arg)
  return bindings, rest


def add_gin_arguments(parser) -> None:
  """Adds the `--gin_file` flag (repeatable); `--gin.K=V` is handled before argparse."""
  parser.add_argument(
    "--gin_file",
    action="append",
    default=[],
    help="gin config file (repeatable), e.g. configs/models/tiny_base.gin; later files win. "
    "Bindings are given as --gin.KEY=VALUE and override the files.",
  )


def resolve_config_path(path: str) -> str:
  """Finds a gin file given as an absolute path, relative to cwd, or as `configs/...` (or a
  path inside `configs/`) of the installed package."""
  for candidate in (path, os.path.join(PACKAGE_DIR, path), os.path.join(CONFIGS_DIR, path)):
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
    f"gin file {path!r} not found (looked in the working directory, {PACKAGE_DIR} and "
    f"{CONFIGS_DIR}); pass a path like configs/models/tiny_base.gin"
  )


def parse_gin(
  gin_files: Sequence[str], bindings: Sequence[str] = (), finalize: bool = True
) -> None:
  """Clears gin and parses files then bindings, with the repo root on the include path.

  Raises:
    ValueError: an unknown configurable or parameter, naming the offending binding.
  """
  gin.clear_config()
  # Includes resolve against the working directory, then the package. Both go before gin's
  # default '' prefix: for a relative path missing from the working directory, gin's package
  # resource reader would find the namespace package `configs` and fail with a TypeError.
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  for path in (PACKAGE_DIR, os.getcwd()):
    if path in prefixes:
      prefixes.remove(path)
    prefixes.insert(0, path)
  files = [resolve_config_path(f) for f in gin_files]
  # gin's resource reader logs an ERROR for every search prefix that lacks an include.
  previous = logging.root.manager.disable
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=finalize)
  except SyntaxError as e:
    raise errors.UserError(_syntax_hint(e)) from e
  except (ValueError, KeyError, ImportError) as e:
    raise errors.UserError(f"invalid gin configuration: {e}") from e
  finally:
    logging.disable(previous)


def configured(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with the parsed gin bindings applied; `fn` itself when no config mentions it.

  Configs use dynamic registration, so a function is in gin's registry only once a parsed file
  or binding names it; commands whose gin files are optional must still run without one.
  """
  try:
    return gin.get_configurable(fn)
  except ValueError:
    return fn


def _syntax_hint(exc: SyntaxError) -> str:
  """gin's parse error, plus the fix for the usual cause: a string value without quotes."""
  where = f" in {exc.text.strip()!r}" if exc.text else ""
  return (
    f"gin could not parse{where}: {str(exc.msg).rstrip('.')}. String values need their own "
    "quotes inside the flag, e.g. --gin.MODEL_DIR=\"'/tmp/run'\" (in a gin file: "
    "MODEL_DIR = '/tmp/run')"
  )

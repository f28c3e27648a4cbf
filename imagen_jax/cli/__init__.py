"""The `imagen-jax` command line: one subcommand per job.

Each subcommand lives in its own module exposing
  `add_arguments(parser: argparse.ArgumentParser) -> None` and
  `run(args: argparse.Namespace) -> int`.
Modules are imported only when their subcommand runs, so `imagen-jax --help` stays fast.
Flags are absl-style (`--flag=value`); where configs apply, `--gin_file=F` (repeatable) and
`--gin.KEY=VALUE` bindings are accepted and collected into `args.gin_files` / `args.gin_bindings`.
How errors are reported: see `main`.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys
from collections.abc import Sequence

from imagen_jax import errors, gin_utils
from imagen_jax.utils import interrupts

VERBOSE_FLAG = "--verbose"

# name -> (module, one-line help). Add a subcommand by adding its line here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
  "train": ("imagen_jax.cli.train", "train one cascade stage (gin-configured, resumable)"),
  "precompute": ("imagen_jax.cli.precompute", "encode captions once and write resumable shards"),
  "encode": ("imagen_jax.cli.encode", "encode captions with the frozen T5 encoder into an .npz"),
  "compile": (
    "imagen_jax.cli.compile",
    "compile a stage's train step for a TPU slice without one: memory, FLOPs, step time",
  ),
  "info": ("imagen_jax.cli.info", "print params, training FLOPs and compiled memory of a network"),
  "eval": (
    "imagen_jax.cli.eval",
    "score images: shapes accuracy, FID (and its reference statistics), CLIP score",
  ),
  "sample": ("imagen_jax.cli.sample", "prompts -> PNGs + index.json through the cascade"),
  "export": ("imagen_jax.cli.export", "write an inference bundle (params, configs, StableHLO)"),
  "demo": ("imagen_jax.cli.demo", "train a tiny 3-stage cascade on shapes, sample and score it"),
}


def build_parser() -> argparse.ArgumentParser:
  """The top-level parser with one sub-parser per registered subcommand."""
  parser = argparse.ArgumentParser(
    prog="imagen-jax",
    description="Imagen cascaded text-to-image diffusion in JAX/Flax.",
    epilog=f"{VERBOSE_FLAG} (anywhere on the line) or {errors.VERBOSE_ENV}=1: show the "
    "traceback of a user error instead of its one-line message.",
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module_name, help_text) in SUBCOMMANDS.items():
    sub = subparsers.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(_module=module_name)
    _lazy_add_arguments(sub, module_name)
  return parser


def _lazy_add_arguments(sub: argparse.ArgumentParser, module_name: str) -> None:
  # Importing every subcommand module for `--help` would import TF and JAX; modules keep
  # their heavy imports inside functions so this stays cheap.
  module = importlib.import_module(module_name)
  module.add_arguments(sub)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `imagen-jax` console script.

  User errors print one line `imagen-jax COMMAND: error: ...` and exit 2 (`--verbose` anywhere
  on the command line, or IMAGEN_JAX_VERBOSE=1, shows the traceback); Ctrl-C exits 130 with one
  line; anything else is a bug and keeps its traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = VERBOSE_FLAG in argv or errors.verbose_requested()
  argv = [a for a in argv if a != VERBOSE_FLAG]
  command = next((a for a in argv if a in SUBCOMMANDS), None)
  prog = f"imagen-jax {command}" if command else "imagen-jax"
  interrupts.install()
  try:
    return run_command(argv)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs right here
    if verbose or not errors.is_user_error(e):
      raise
    print(f"{prog}: error: {errors.one_line(e)}", file=sys.stderr)
    return 2


def quiet_libtpu_without_a_tpu() -> None:
  """With libtpu installed (the [tpu] extra) on a machine without TPU chips, every JAX start
  prints half a page of libtpu errors about undiscoverable TPU metadata. TPU VMs expose their
  chips as /dev/accel* or /dev/vfio; elsewhere, name a placeholder slice so libtpu stops
  probing (it then finds no chips and JAX uses the CPU or GPU as usual)."""
  if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def run_command(argv: Sequence[str]) -> int:
  """Parses `argv` and runs its subcommand; exceptions propagate (for callers embedding us)."""
  quiet_libtpu_without_a_tpu()
  gin_bindings, argv = gin_utils.split_gin_binding_flags(argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 0
  args.gin_bindings = gin_bindings
  module = importlib.import_module(args._module)
  return int(module.run(args) or 0)

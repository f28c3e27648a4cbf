"""`imagen-jax info`: parameter count, training FLOPs and compiled memory of a network config.

imagen-jax info --gin_file=configs/models/sr256.gin [--remat] [--gin.K=V ...]
"""

from __future__ import annotations

import argparse

from imagen_jax import gin_utils
from imagen_jax.info import network_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of the `info` subcommand."""
  gin_utils.add_gin_arguments(parser)
  parser.add_argument(
    "--remat",
    action="store_true",
    help="force per-block rematerialisation on (otherwise the config's remat is used)",
  )
  parser.add_argument("--batch_size", type=int, default=1, help="batch compiled for (default 1)")
  parser.add_argument(
    "--text_length", type=int, default=128, help="text sequence length (default 128)"
  )
  parser.add_argument(
    "--params_only",
    action="store_true",
    help="print the parameter count only (skip the compile, which is slow for paper sizes)",
  )


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
  """Parses the gin config, builds its network and prints its cost."""
  import gin

  from imagen_jax.nn import factory

  if not args.gin_file:
    raise ValueError("info needs --gin_file=configs/models/<size>.gin")
  gin_utils.parse_gin(args.gin_file, getattr(args, "gin_bindings", []))
  network = gin.get_configurable(factory.network)()
  if args.remat:
    network = network.clone(remat=True)
  info = network_info(network, args.batch_size, args.text_length, not args.params_only)
  print(f"network: {type(network).__name__}")
  print(f"image_size: {network.image_size}")
  if network.is_super_resolution:
    print(f"lowres_size: {network.lowres_size}")
  print(f"remat: {network.remat} ({network.remat_policy})")
  print(f"params: {info['params']}")
  if "train_flops_per_image" in info:
    print(f"train_flops_per_image: {info['train_flops_per_image']:.6g}")
    print(f"compile_seconds: {info['compile_seconds']:.1f}")
  for k in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes"):
    if k in info:
      print(f"{k}: {info[k]} ({_gib(info[k])})")
  return 0

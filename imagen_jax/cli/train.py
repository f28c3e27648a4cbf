"""`imagen-jax train`: run the gin-configured training job of one cascade stage."""

from __future__ import annotations

import argparse

from imagen_jax import errors, gin_utils


def add_arguments(parser: argparse.ArgumentParser) -> None:
  gin_utils.add_gin_arguments(parser)
  parser.add_argument(
    "--coordinator_address",
    default=None,
    help="multi-host: host:port of process 0 (TPU pods/SLURM: leave unset, JAX detects it)",
  )
  parser.add_argument("--num_processes", type=int, default=None, help="multi-host: process count")
  parser.add_argument("--process_id", type=int, default=None, help="multi-host: this process's id")
  parser.add_argument(
    "--multihost",
    action="store_true",
    help="call jax.distributed.initialize() with the cluster's auto-detected settings (TPU pods)",
  )
  parser.add_argument(
    "--num_cpu_devices",
    type=int,
    default=None,
    help="simulate this many CPU devices per process (local testing of sharded code)",
  )
  parser.epilog = (
    "Example: imagen-jax train --gin_file=configs/stages/sr256.gin "
    "--gin_file=configs/mesh/v4-128.gin --gin_file=configs/runs/pretrain.gin "
    "--gin.MODEL_DIR=\"'gs://bucket/sr256'\" --gin.DATA=\"'gs://bucket/precomputed'\""
  )


def run(args: argparse.Namespace) -> int:
  import logging
  import os

  if not args.gin_file:  # before importing JAX: answered in well under a second
    raise errors.UserError("pass at least one --gin_file (a stage recipe and a run)")
  if args.num_cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={args.num_cpu_devices}"
    )
  import jax

  if args.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger().setLevel(logging.INFO)  # TF/absl may have configured the root logger
  for noisy in ("absl", "orbax", "jax._src", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  from imagen_jax import parallel, train

  # Parse (and reject unknown bindings) before touching any device.
  gin_utils.parse_gin(args.gin_file, args.gin_bindings)
  if args.multihost or args.coordinator_address or (args.num_processes or 1) > 1:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  try:
    train.configurable_train()()
  except train.TrainingError as e:
    logging.error("%s", e)
    return 1
  if jax.process_count() > 1:
    # Hosts finish at different times (process 0 writes the last summaries): meet first, then
    # shut the coordination service down together instead of racing its shutdown barrier.
    parallel.wait_for_all_processes("train_end")
    jax.distributed.shutdown()
  return 0

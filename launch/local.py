#!/usr/bin/env python3
"""Runs one `imagen-jax` job as N real processes on this machine: the pod code path at home.

Every process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
--num_cpu_devices=D`, so `jax.distributed.initialize()` runs for real, collectives go through
gloo, and the mesh spans N x D CPU devices exactly as it would span the hosts of a TPU slice.

  python launch/local.py --num_processes=2 --num_cpu_devices=4 -- \
      --gin_file=configs/stages/<tiny stage>.gin --gin_file=configs/mesh/cpu8_fsdp.gin \
      --gin_file=configs/runs/tiny.gin --gin.MODEL_DIR="'/tmp/run'" --gin.DATA="'/tmp/data'"

Output lines are prefixed `[pI]`. If one process fails, the others are stopped (SIGTERM, then
SIGKILL) and its exit status is returned; Ctrl-C sends SIGTERM to all (the trainer checkpoints).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (the coordinator binds it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def build_commands(
  num_processes: int,
  num_cpu_devices: int,
  port: int,
  job_args: Sequence[str],
  subcommand: str = "train",
  python: str = sys.executable,
) -> list[list[str]]:
  """The argv of each process.

  Args:
    num_processes: how many processes ("hosts").
    num_cpu_devices: simulated CPU devices per process.
    port: the coordinator's port on 127.0.0.1.
    job_args: flags of `imagen-jax <subcommand>` (gin files, `--gin.K=V` bindings, ...).
    subcommand: the imagen-jax subcommand (it must accept the multi-host flags).
    python: the interpreter that has imagen_jax installed.

  Returns:
    One argv per process, process 0 first.
  """
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes}; must be >= 1")
  if num_cpu_devices < 1:
    raise ValueError(f"--num_cpu_devices={num_cpu_devices}; must be >= 1")
  reserved = ("--coordinator_address", "--num_processes", "--process_id", "--num_cpu_devices")
  clash = [a for a in job_args if a.startswith(reserved)]
  if clash:
    raise ValueError(f"job arguments {clash} are set by launch/local.py; remove them")
  return [
    [
      python,
      "-m",
      "imagen_jax.cli",
      subcommand,
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
      f"--num_cpu_devices={num_cpu_devices}",
      *job_args,
    ]
    for i in range(num_processes)
  ]


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of each process: CPU only, no inherited device-count flag."""
  env = dict(os.environ if base is None else base)
  # The parent's forced device count (e.g. pytest's 8 devices) must not override --num_cpu_devices.
  flags = [
    f
    for f in env.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _pump(stream, prefix: str, out, lock: threading.Lock, log_file) -> None:
  for line in stream:
    with lock:
      out.write(prefix + line)
      out.flush()
    if log_file is not None:
      log_file.write(line)
      log_file.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM every live process, then SIGKILL what is left after `grace_s`."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run_local(
  commands: Sequence[Sequence[str]],
  env: dict[str, str] | None = None,
  log_dir: str | None = None,
  timeout_s: float | None = None,
  grace_s: float = 30.0,
  out=None,
  cwd: str = REPO_ROOT,
) -> int:
  """Starts every command, streams their prefixed output, and waits for all of them.

  Args:
    commands: one argv per process.
    env: the processes' environment (default `child_env()`).
    log_dir: if set, each process's output is also written to LOG_DIR/process_I.log.
    timeout_s: stop everything after this long and return 124.
    grace_s: SIGTERM-to-SIGKILL delay when stopping the others.
    out: where prefixed lines go (default stdout).
    cwd: working directory (the repo root, so repo-relative gin paths resolve).

  Returns:
    0 if every process exited 0; else the first failure's exit status (124 on timeout,
    130 on Ctrl-C).
  """
  out = sys.stdout if out is None else out
  env = child_env() if env is None else env
  lock = threading.Lock()
  if log_dir:
    os.makedirs(log_dir, exist_ok=True)
  procs, pumps, logs = [], [], []
  try:
    for i, cmd in enumerate(commands):
      log_file = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None  # noqa: SIM115
      logs.append(log_file)
      # Own session: a terminal's Ctrl-C reaches only us; we forward SIGTERM, which the
      # trainer turns into a final checkpoint instead of dying mid-step.
      p = subprocess.Popen(
        list(cmd),
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
      )
      procs.append(p)
      t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock, log_file))
      t.daemon = True
      t.start()
      pumps.append(t)
    deadline = None if timeout_s is None else time.time() + timeout_s
    status = 0
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, status = failed[0]
        with lock:
          out.write(f"[local] process {i} exited with status {status}; stopping the others\n")
        _stop(procs, grace_s)
        break
      if all(c == 0 for c in codes):
        break
      if deadline is not None and time.time() > deadline:
        with lock:
          out.write(f"[local] timeout after {timeout_s}s; stopping all processes\n")
        _stop(procs, grace_s)
        status = 124
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    _stop(procs, grace_s)
    status = 130
  finally:
    for t in pumps:
      t.join(timeout=5)
    for f in logs:
      if f is not None:
        f.close()
  return status


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point: parses launcher flags, passes everything else to `imagen-jax <subcommand>`."""
  parser = argparse.ArgumentParser(
    prog="launch/local.py",
    description="Run an imagen-jax job as N local processes (real multi-host JAX on CPU).",
    epilog="All other flags (--gin_file, --gin.K=V, ...) go to `imagen-jax SUBCOMMAND`.",
    allow_abbrev=False,
  )
  parser.add_argument("--num_processes", type=int, default=2, help="processes (simulated hosts)")
  parser.add_argument("--num_cpu_devices", type=int, default=4, help="CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  parser.add_argument("--subcommand", default="train", help="imagen-jax subcommand to run")
  parser.add_argument("--log_dir", default=None, help="also write LOG_DIR/process_I.log")
  parser.add_argument("--timeout_s", type=float, default=None, help="stop everything after this")
  parser.add_argument("--grace_s", type=float, default=30.0, help="SIGTERM-to-SIGKILL delay")
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    cut = argv.index("--")
    argv, job_args = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
  else:
    args, job_args = parser.parse_known_args(argv)
  try:
    commands = build_commands(
      args.num_processes, args.num_cpu_devices, args.port or free_port(), job_args, args.subcommand
    )
  except ValueError as e:
    parser.error(str(e))
  return run_local(commands, log_dir=args.log_dir, timeout_s=args.timeout_s, grace_s=args.grace_s)


if __name__ == "__main__":
  sys.exit(main())

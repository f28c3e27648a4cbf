#!/usr/bin/env python3
"""Cloud TPU VM slice launcher: create, setup, precompute, train, run, logs, stop, delete.

Multi-host JAX means the same command on every worker of the slice; this script builds those
`gcloud compute tpus ...` commands, validates everything it can before anything is created, and
with `--dry_run` prints every command instead of running it. It uses only the standard library
so it runs from any workstation that has `gcloud` (it need not have JAX or this package).

  python launch/tpu_vm.py create  --name=imagen-base --project=P --zone=us-east5-a \
      --accelerator_type=v5p-128
  python launch/tpu_vm.py setup   --name=imagen-base ...        # ships this checkout, installs it
  python launch/tpu_vm.py train   --name=imagen-base ... --bucket=gs://my-bucket \
      --gin_file=configs/stages/base64.gin --gin_file=configs/runs/pretrain.gin
  python launch/tpu_vm.py logs    --name=imagen-base ... [--follow] [--worker=all]
  python launch/tpu_vm.py stop    --name=imagen-base ...        # SIGTERM: the job checkpoints
  python launch/tpu_vm.py delete  --name=imagen-base ... [--yes]

See launch/README.md for the whole runbook.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The slice table lives in the package (standard library only, so no JAX is needed here).
sys.path.insert(0, REPO_ROOT)
from imagen_jax import tpu_slices  # noqa: E402

# Paths on every worker (relative to the ssh user's home, so no sudo is needed).
REMOTE_REPO = "~/imagen_jax"
REMOTE_VENV = "~/imagen_venv"
REMOTE_LOGS = "~/imagen_logs"
REMOTE_TARBALL = "~/imagen_jax.tar.gz"
IMAGEN_JAX = f"{REMOTE_VENV}/bin/imagen-jax"
# The worker's index in the slice, from the TPU VM metadata server (what JAX itself reads).
WORKER_ID_SH = (
  'WORKER_ID="${TPU_WORKER_ID:-$(curl -s -H Metadata-Flavor:Google '
  'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}"'
)
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"


class LaunchError(ValueError):
  """Bad launcher input, reported before any cloud resource is touched."""


# ================================================================================================
# Accelerator types
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One TPU slice type: what gcloud calls it and how big it is."""

  name: str  # as gcloud spells it, e.g. v5litepod-16
  generation: str  # v4 | v5p | v5e | v6e
  chips: int
  hosts: int
  devices: int  # JAX devices (megacore v4/v5p: one per chip)
  default_runtime: str
  queued_by_default: bool  # v5e/v5p/v6e capacity is handed out through queued resources


ACCELERATOR_FORMS = tpu_slices.SLICE_FORMS


def parse_accelerator(accelerator_type: str) -> Accelerator:
  """Validates an accelerator type and returns its size.

  Args:
    accelerator_type: e.g. 'v4-256', 'v5p-64', 'v5litepod-16' (alias 'v5e-16'), 'v6e-256'.

  Returns:
    The slice's gcloud name, chips, hosts, JAX devices and default runtime version.

  Raises:
    LaunchError: an unknown generation or a size that generation does not come in.
  """
  try:
    tpu = tpu_slices.parse_slice(accelerator_type)
  except ValueError as e:
    raise LaunchError(f"--accelerator_type: {e}") from None
  gen = tpu.generation
  return Accelerator(
    tpu.name, gen.name, tpu.chips, tpu.hosts, tpu.devices, gen.runtime, gen.queued_by_default
  )


# ================================================================================================
# Commands
# ================================================================================================


def _gcloud_scope(args: argparse.Namespace) -> list[str]:
  return [f"--project={args.project}", f"--zone={args.zone}"]


def _ssh(args: argparse.Namespace, worker: str, remote: str) -> list[str]:
  """`gcloud compute tpus tpu-vm ssh` running `remote` (a bash script) on `worker`."""
  return [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    args.name,
    *_gcloud_scope(args),
    f"--worker={worker}",
    f"--command={remote}",
  ]


def _use_queued(args: argparse.Namespace, acc: Accelerator) -> bool:
  return {"auto": acc.queued_by_default, "yes": True, "no": False}[args.queued]


def create_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Creates the slice: a queued resource (v5e/v5p/v6e by default) or a plain TPU VM."""
  runtime = args.runtime_version or acc.default_runtime
  if _use_queued(args, acc):
    cmd = [
      "gcloud",
      "compute",
      "tpus",
      "queued-resources",
      "create",
      args.name,
      f"--node-id={args.name}",
      *_gcloud_scope(args),
      f"--accelerator-type={acc.name}",
      f"--runtime-version={runtime}",
    ]
    if args.spot:
      cmd.append("--spot")
    if args.reserved:
      cmd.append("--reserved")
    return [cmd]
  cmd = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    args.name,
    *_gcloud_scope(args),
    f"--accelerator-type={acc.name}",
    f"--version={runtime}",
  ]
  if args.spot:
    cmd.append("--spot")
  if args.reserved:
    cmd.append("--reserved")
  return [cmd]


def queued_state_command(args: argparse.Namespace) -> list[str]:
  """Prints a queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)."""
  return [
    "gcloud",
    "compute",
    "tpus",
    "queued-resources",
    "describe",
    args.name,
    *_gcloud_scope(args),
    "--format=value(state.state)",
  ]


def setup_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Ships this checkout (working tree, uncommitted edits included) to every worker and
  installs it with Python 3.12 in a venv: TPU VM images ship Python 3.10, jax >= 0.11 needs 3.12,
  so `uv` fetches a standalone 3.12."""
  tarball = os.path.join(args.local_tmp, f"imagen_jax-{args.name}.tar.gz")
  pack = [
    "tar",
    "--exclude=./.venv",
    "--exclude=./.git",
    "--exclude=__pycache__",
    "--exclude=*.egg-info",
    "-czf",
    tarball,
    "-C",
    args.source,
    ".",
  ]
  scp = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    tarball,
    f"{args.name}:{REMOTE_TARBALL}",
    *_gcloud_scope(args),
    "--worker=all",
  ]
  pip_extra = " ".join(shlex.quote(p) for p in args.pip)
  install = " && ".join(
    [
      "set -e",
      f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} {REMOTE_LOGS}",
      f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_REPO}",
      "python3 -m pip install --user --quiet --upgrade uv",
      f"(test -x {REMOTE_VENV}/bin/python || ~/.local/bin/uv venv --python 3.12 {REMOTE_VENV})",
      f"~/.local/bin/uv pip install --python {REMOTE_VENV}/bin/python -f {LIBTPU_FIND_LINKS} "
      f"-e {REMOTE_REPO} {pip_extra}",
      f"{REMOTE_VENV}/bin/imagen-jax --help > /dev/null",
      'echo "imagen_jax installed on $(hostname)"',
    ]
  )
  return [pack, scp, _ssh(args, "all", install)]


def _detached(job: str, argv_sh: str, env: Sequence[str]) -> str:
  """A bash script that starts `argv_sh` detached (survives the ssh session), logging to
  ~/imagen_logs/<job>.log and recording its pid; refuses if that job already runs here."""
  log = f"{REMOTE_LOGS}/{job}.log"
  pid = f"{REMOTE_LOGS}/{job}.pid"
  exports = "".join(f"export {shlex.quote(e)}; " for e in env)
  return (
    f"mkdir -p {REMOTE_LOGS} && cd {REMOTE_REPO} && "
    f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
    f'echo "{job} already running on $(hostname) (pid $(cat {pid})); stop it first" >&2; exit 1; fi; '
    f"{WORKER_ID_SH}; {exports}"
    f"setsid nohup {argv_sh} > {log} 2>&1 < /dev/null & "
    f'echo $! > {pid}; echo "started {job} on $(hostname) (worker $WORKER_ID): pid $!, log {log}"'
  )


def _binding_value(bindings: Sequence[str], key: str) -> str | None:
  """The string a `--gin.KEY='value'` binding gives, quotes stripped."""
  for b in bindings:
    k, _, v = b[len("--gin.") :].partition("=")
    if k == key:
      return v.strip().strip("'\"")
  return None


def resolve_train_dirs(args: argparse.Namespace) -> tuple[str, str]:
  """MODEL_DIR and DATA from --model_dir/--data, --gin.MODEL_DIR/DATA, or --bucket."""
  model_dir = (
    args.model_dir
    or _binding_value(args.gin_bindings, "MODEL_DIR")
    or (f"{args.bucket.rstrip('/')}/{args.run_name}" if args.bucket else None)
  )
  data = (
    args.data
    or _binding_value(args.gin_bindings, "DATA")
    or (f"{args.bucket.rstrip('/')}/precomputed" if args.bucket else None)
  )
  if not model_dir:
    raise LaunchError("train: no MODEL_DIR; pass --bucket=gs://BUCKET or --model_dir=gs://...")
  if not data:
    raise LaunchError("train: no DATA; pass --bucket=gs://BUCKET or --data=gs://.../precomputed")
  return model_dir, data


def train_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Starts `imagen-jax train` detached on every worker (the same command everywhere)."""
  model_dir, data = resolve_train_dirs(args)
  if acc.hosts > 1 and not model_dir.startswith("gs://"):
    raise LaunchError(
      f"MODEL_DIR={model_dir!r} is not on GCS: a {acc.name} slice has {acc.hosts} hosts that "
      "must share one checkpoint directory; use gs://BUCKET/..."
    )
  if acc.hosts > 1 and not data.startswith("gs://"):
    raise LaunchError(
      f"DATA={data!r} is not on GCS: every one of the {acc.hosts} hosts reads its shards from "
      "it; use gs://BUCKET/precomputed"
    )
  gin_files = list(args.gin_file)
  mesh_preset = f"configs/mesh/{acc.name}.gin"
  if not args.no_mesh_preset and not any(f.startswith("configs/mesh/") for f in gin_files):
    if not os.path.exists(os.path.join(args.source, mesh_preset)):
      raise LaunchError(
        f"no mesh preset {mesh_preset} for {acc.name}; pass "
        "--gin_file=configs/mesh/<yours>.gin (or --no_mesh_preset)"
      )
    gin_files.append(mesh_preset)
  if not gin_files:
    raise LaunchError("train: pass --gin_file=configs/stages/<stage>.gin and a run config")
  # `setup` ships --source, and the workers run from that copy: a file missing here is missing there.
  missing = [f for f in gin_files if not os.path.isfile(os.path.join(args.source, f))]
  if missing:
    raise LaunchError(
      f"gin file(s) {missing} not found under {args.source}; give paths relative to the repo "
      "root (e.g. configs/stages/base64.gin) and rerun `setup` after adding files"
    )
  bindings = [b for b in args.gin_bindings if not b.startswith(("--gin.MODEL_DIR=", "--gin.DATA="))]
  argv = ["train"]
  if acc.hosts > 1:
    argv.append("--multihost")
  argv += [f"--gin_file={f}" for f in gin_files]
  # Gin strings in double quotes, so the shell quoting stays readable.
  argv += [f'--gin.MODEL_DIR="{model_dir}"', f'--gin.DATA="{data}"', *bindings]
  env = ["TF_CPP_MIN_LOG_LEVEL=2", *args.env]
  # The venv path stays unquoted: the remote shell must expand its `~`.
  return [_ssh(args, "all", _detached(args.job, f"{IMAGEN_JAX} {shlex.join(argv)}", env))]


def precompute_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Runs `imagen-jax precompute` detached on every worker, each writing its own shards."""
  if not args.out:
    raise LaunchError("precompute: pass --out=gs://BUCKET/precomputed")
  if acc.hosts > 1 and not args.out.startswith("gs://"):
    raise LaunchError(f"--out={args.out!r}: a multi-host slice writes shards to GCS (gs://...)")
  argv = ["precompute", f"--out={args.out}", *args.passthrough]
  # The worker index is only known on the worker: leave it to the remote shell to expand.
  argv_sh = (
    f'{IMAGEN_JAX} {shlex.join(argv)} --process_index="$WORKER_ID" '
    f"--process_count={acc.hosts} --no_progress"
  )
  env = ["TF_CPP_MIN_LOG_LEVEL=2", *args.env]
  return [_ssh(args, "all", _detached(args.job, argv_sh, env))]


def logs_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Tails the job's log on one worker (or all, each line prefixed by its host)."""
  log = f"{REMOTE_LOGS}/{args.job}.log"
  if args.follow:
    remote = f"tail -n {args.lines} -F {log}"
  else:
    remote = f'tail -n {args.lines} {log} | sed "s/^/[$(hostname)] /"'
  return [_ssh(args, args.worker, remote)]


def stop_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """SIGTERM on every worker: the trainer saves a checkpoint after its current step and exits
  (use --force for SIGKILL, e.g. when a worker hangs in a collective)."""
  sig = "KILL" if args.force else "TERM"
  pid = f"{REMOTE_LOGS}/{args.job}.pid"
  remote = (
    f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then kill -{sig} "$(cat {pid})" && '
    f'echo "sent SIG{sig} to {args.job} on $(hostname)"; else echo "{args.job} not running on '
    f'$(hostname)"; fi'
  )
  return [_ssh(args, "all", remote)]


def delete_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Deletes the slice (with --force a queued resource takes its node with it)."""
  if _use_queued(args, acc):
    verb = ["queued-resources", "delete", args.name, "--force"]
  else:
    verb = ["tpu-vm", "delete", args.name]
  # --quiet: the confirmation was ours (or --yes); gcloud must not prompt on every worker.
  return [["gcloud", "compute", "tpus", *verb, *_gcloud_scope(args), "--quiet"]]


def run_commands(args: argparse.Namespace, acc: Accelerator) -> list[list[str]]:
  """Runs an arbitrary shell command on the workers (e.g. copying a vocabulary from GCS)."""
  if not args.remote:
    raise LaunchError("run: pass --remote='COMMAND' (run in ~/imagen_jax on each worker)")
  return [_ssh(args, args.worker, f"cd {REMOTE_REPO} && {args.remote}")]


COMMANDS = {
  "create": (create_commands, "create the slice (queued resource where the type needs one)"),
  "setup": (setup_commands, "ship this checkout to every worker and install it (Python 3.12)"),
  "precompute": (precompute_commands, "run `imagen-jax precompute` on every worker, detached"),
  "train": (train_commands, "run `imagen-jax train` on every worker, detached, logging to files"),
  "run": (run_commands, "run a shell command in ~/imagen_jax on the workers"),
  "logs": (logs_commands, "show a job's log from one worker (or all)"),
  "stop": (stop_commands, "SIGTERM the job on every worker (it checkpoints, then exits)"),
  "delete": (delete_commands, "delete the slice (asks first unless --yes)"),
}


# ================================================================================================
# Command line
# ================================================================================================


def build_parser() -> argparse.ArgumentParser:
  """The launcher's parser: one sub-parser per command, sharing the slice flags."""
  common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  c = common.add_argument
  c("--name", required=True, help="TPU VM (node) name; also the queued resource id")
  c("--project", required=True, help="GCP project id")
  c("--zone", required=True, help="zone, e.g. us-central2-b (v4), us-east5-a (v5p)")
  c("--accelerator_type", required=True, help=f"slice type: {ACCELERATOR_FORMS}")
  c("--runtime_version", default=None, help="TPU software version (default: per generation)")
  c(
    "--queued",
    choices=("auto", "yes", "no"),
    default="auto",
    help="use queued resources (auto: yes for v5e/v5p/v6e, no for v4)",
  )
  c("--dry_run", action="store_true", help="print every command instead of running it")
  c(
    "--job",
    default=None,
    help="job name: log ~/imagen_logs/JOB.log, pid JOB.pid on each worker (default: train, or "
    "precompute for `precompute`)",
  )
  c("--env", action="append", default=[], help="KEY=VALUE exported before the job (repeatable)")

  parser = argparse.ArgumentParser(
    prog="launch/tpu_vm.py",
    description="Create, set up and run imagen_jax jobs on a Cloud TPU VM slice.",
    epilog="Gin bindings --gin.KEY=VALUE pass through to `imagen-jax train`. See launch/README.md.",
    allow_abbrev=False,
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  p = {
    name: sub.add_parser(name, parents=[common], help=h, description=h, allow_abbrev=False)
    for name, (_, h) in COMMANDS.items()
  }

  p["create"].add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  p["create"].add_argument("--reserved", action="store_true", help="use a reservation")
  p["create"].add_argument(
    "--no_wait", action="store_true", help="do not wait for a queued resource to become ACTIVE"
  )
  p["create"].add_argument("--wait_timeout_s", type=float, default=3 * 3600)
  for name in ("setup", "train"):
    p[name].add_argument("--source", default=REPO_ROOT, help="the checkout to ship / read presets")
  p["setup"].add_argument("--local_tmp", default="/tmp", help="where the tarball is packed")
  p["setup"].add_argument(
    "--pip",
    action="append",
    default=None,
    help="extra pip requirements on the workers (repeatable; default 'jax[tpu]')",
  )
  t = p["train"].add_argument
  t(
    "--bucket", default=None, help="gs://BUCKET: MODEL_DIR=BUCKET/RUN_NAME, DATA=BUCKET/precomputed"
  )
  t("--run_name", default="run", help="MODEL_DIR subfolder under --bucket")
  t("--model_dir", default=None, help="checkpoint/TensorBoard dir (gs:// on multi-host slices)")
  t("--data", default=None, help="precomputed shards dir (gs:// on multi-host slices)")
  t("--gin_file", action="append", default=[], help="gin file, repo-relative (repeatable)")
  t(
    "--no_mesh_preset",
    action="store_true",
    help="do not add configs/mesh/<accelerator_type>.gin when no mesh file is given",
  )
  p["precompute"].add_argument("--out", default=None, help="gs://BUCKET/precomputed")
  p["run"].add_argument("--remote", default=None, help="the shell command to run")
  p["run"].add_argument("--worker", default="all", help="worker index or 'all'")
  p["logs"].add_argument("--worker", default="0", help="worker index or 'all'")
  p["logs"].add_argument("--lines", type=int, default=100)
  p["logs"].add_argument("--follow", action="store_true", help="tail -F (one worker)")
  p["stop"].add_argument("--force", action="store_true", help="SIGKILL instead of SIGTERM")
  p["delete"].add_argument("--yes", action="store_true", help="do not ask for confirmation")
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses argv; `--gin.K=V` flags are kept aside, and `precompute` passes unknown flags on."""
  argv = list(argv)
  gin_bindings = [a for a in argv if a.startswith("--gin.")]
  rest = [a for a in argv if not a.startswith("--gin.")]
  parser = build_parser()
  args, unknown = parser.parse_known_args(rest)
  if unknown and args.command != "precompute":
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if gin_bindings and args.command != "train":
    parser.error(f"--gin.* bindings only apply to `train` (got {gin_bindings})")
  for b in gin_bindings:
    if "=" not in b or b.startswith("--gin.="):
      parser.error(f"malformed gin binding {b!r}: write it as --gin.KEY=VALUE")
  args.gin_bindings = gin_bindings
  if args.job is None:
    args.job = "precompute" if args.command == "precompute" else "train"
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.job):
    parser.error(f"--job={args.job!r}: use letters, digits, '_', '.', '-'")
  args.passthrough = unknown
  if getattr(args, "pip", None) is None:
    args.pip = ["jax[tpu]"]
  for e in args.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e):
      parser.error(f"--env={e!r}: write it as KEY=VALUE")
  return args


def plan(args: argparse.Namespace) -> list[list[str]]:
  """Validates the arguments and returns the commands to run, in order (nothing is run)."""
  acc = parse_accelerator(args.accelerator_type)
  if args.command == "logs" and args.follow and args.worker == "all":
    raise LaunchError("logs: --follow needs one --worker (an index), not 'all'")
  return COMMANDS[args.command][0](args, acc)


def _wait_until_active(args: argparse.Namespace) -> None:
  deadline = time.time() + args.wait_timeout_s
  last = None
  while True:
    state = subprocess.run(
      queued_state_command(args), check=True, capture_output=True, text=True
    ).stdout.strip()
    if state != last:
      print(f"queued resource {args.name}: {state}", flush=True)
      last = state
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise RuntimeError(f"queued resource {args.name} is {state}; see `gcloud ... describe`")
    if time.time() > deadline:
      raise TimeoutError(f"queued resource {args.name} still {state} after {args.wait_timeout_s}s")
    time.sleep(30)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status of the first failing command (0 if all succeed)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    commands = plan(args)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  waits = (
    args.command == "create"
    and not args.no_wait
    and _use_queued(args, parse_accelerator(args.accelerator_type))
  )
  if args.dry_run:
    for cmd in commands:
      print(shlex.join(cmd))
    if waits:
      print(f"# then, every 30 s until ACTIVE: {shlex.join(queued_state_command(args))}")
    return 0
  if shutil.which("gcloud") is None:
    print(
      "error: gcloud not found on PATH; install the Google Cloud CLI "
      "(https://cloud.google.com/sdk/docs/install) or use --dry_run",
      file=sys.stderr,
    )
    return 2
  if args.command == "delete" and not args.yes:
    try:
      answer = input(f"Delete TPU slice {args.name!r} in {args.project}/{args.zone}? [y/N] ")
    except EOFError:
      answer = ""
    if answer.strip().lower() not in ("y", "yes"):
      print("aborted; nothing deleted", file=sys.stderr)
      return 1
  for cmd in commands:
    print(f"+ {shlex.join(cmd)}", flush=True)
    status = subprocess.run(cmd).returncode
    if status:
      print(f"error: command failed with exit status {status}", file=sys.stderr)
      return status
  if waits:
    _wait_until_active(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Launchers: TPU VM command lines (dry run and through a recording `gcloud`), validation before
anything is created, the local multi-process runner, the SLURM wrapper and the mesh presets."""

from __future__ import annotations

import importlib.util
import io
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
    f"launch_{name}", os.path.join(LAUNCH, f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


tpu_vm = _load("tpu_vm")
local = _load("local")

SLICE = ["--name=imagen", "--project=proj", "--zone=us-east5-a", "--accelerator_type=v5p-64"]
SCOPE = "--project=proj --zone=us-east5-a"


@pytest.fixture
def source(tmp_path):
  """A checkout holding the files `train` checks: a stage, a run config, the v5p-64 preset."""
  root = tmp_path / "src"
  for rel in ("configs/stages/base64.gin", "configs/runs/pretrain.gin"):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("# stub\n")
  (root / "configs/mesh").mkdir()
  shutil.copy(os.path.join(REPO, "configs/mesh/v5p-64.gin"), root / "configs/mesh/v5p-64.gin")
  return str(root)


def _dry(capsys, *argv: str) -> tuple[int, list[str]]:
  status = tpu_vm.main([*argv, "--dry_run"])
  return status, capsys.readouterr().out.splitlines()


def _remote(line: str) -> str:
  """The bash script of a printed `gcloud ... ssh --command=SCRIPT` line."""
  (script,) = [a for a in shlex.split(line) if a.startswith("--command=")]
  return script[len("--command=") :]


# ------------------------------------------------------------------------------------------------
# tpu_vm.py: --dry_run on a v5p-64 slice
# ------------------------------------------------------------------------------------------------


def test_accelerator_table():
  v5p = tpu_vm.parse_accelerator("v5p-64")
  assert (v5p.chips, v5p.hosts, v5p.devices, v5p.queued_by_default) == (32, 8, 32, True)
  v4 = tpu_vm.parse_accelerator("v4-256")
  assert (v4.chips, v4.hosts, v4.devices, v4.queued_by_default) == (128, 32, 128, False)
  assert tpu_vm.parse_accelerator("v4-8").hosts == 1
  v5e = tpu_vm.parse_accelerator("v5e-16")
  assert (v5e.name, v5e.hosts, v5e.devices) == ("v5litepod-16", 4, 16)
  assert tpu_vm.parse_accelerator("v6e-8").hosts == 1
  assert tpu_vm.parse_accelerator("v6e-256").hosts == 64


def test_dry_run_create_uses_queued_resources(capsys):
  status, lines = _dry(capsys, "create", *SLICE)
  assert status == 0
  assert lines[0] == (
    "gcloud compute tpus queued-resources create imagen --node-id=imagen "
    f"{SCOPE} --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5"
  )
  assert lines[1].startswith("# then, every 30 s until ACTIVE: gcloud compute tpus queued-")
  assert len(lines) == 2


def test_dry_run_create_v4_is_a_plain_tpu_vm(capsys):
  status, lines = _dry(
    capsys, "create", "--name=b", "--project=p", "--zone=us-central2-b", "--accelerator_type=v4-256"
  )
  assert status == 0
  assert lines == [
    "gcloud compute tpus tpu-vm create b --project=p --zone=us-central2-b "
    "--accelerator-type=v4-256 --version=tpu-ubuntu2204-base"
  ]


def test_dry_run_setup_ships_and_installs_on_all_workers(capsys, source):
  status, lines = _dry(capsys, "setup", *SLICE, f"--source={source}")
  assert status == 0 and len(lines) == 3
  assert shlex.split(lines[0])[-3:] == ["-C", source, "."]
  assert lines[1] == (
    "gcloud compute tpus tpu-vm scp /tmp/imagen_jax-imagen.tar.gz 'imagen:~/imagen_jax.tar.gz' "
    f"{SCOPE} --worker=all"
  )
  assert lines[2].startswith(f"gcloud compute tpus tpu-vm ssh imagen {SCOPE} --worker=all ")
  script = _remote(lines[2])
  assert "uv venv --python 3.12 ~/imagen_venv" in script
  assert "-e ~/imagen_jax 'jax[tpu]'" in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


def test_dry_run_train_runs_detached_on_every_worker(capsys, source):
  status, lines = _dry(
    capsys,
    "train",
    *SLICE,
    f"--source={source}",
    "--bucket=gs://bkt",
    "--run_name=base64",
    "--gin_file=configs/stages/base64.gin",
    "--gin_file=configs/runs/pretrain.gin",
    "--gin.train.train.seed=1",
    "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
  )
  assert status == 0 and len(lines) == 1
  assert lines[0].startswith(f"gcloud compute tpus tpu-vm ssh imagen {SCOPE} --worker=all ")
  script = _remote(lines[0])
  # The same command on every worker, mesh preset appended after the stage (its batch wins).
  assert (
    "setsid nohup ~/imagen_venv/bin/imagen-jax train --multihost "
    "--gin_file=configs/stages/base64.gin --gin_file=configs/runs/pretrain.gin "
    "--gin_file=configs/mesh/v5p-64.gin "
    "'--gin.MODEL_DIR=\"gs://bkt/base64\"' '--gin.DATA=\"gs://bkt/precomputed\"' "
    "--gin.train.train.seed=1 > ~/imagen_logs/train.log 2>&1 < /dev/null &"
  ) in script
  assert "export TF_CPP_MIN_LOG_LEVEL=2; " in script
  assert "export LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true; " in script
  assert "echo $! > ~/imagen_logs/train.pid" in script
  assert "already running" in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


def test_dry_run_precompute_gives_each_worker_its_index(capsys):
  status, lines = _dry(
    capsys, "precompute", *SLICE, "--out=gs://bkt/precomputed", "--source=shapes", "--vocab=v"
  )
  assert status == 0
  script = _remote(lines[0])
  assert (
    "~/imagen_venv/bin/imagen-jax precompute --out=gs://bkt/precomputed --source=shapes "
    '--vocab=v --process_index="$WORKER_ID" --process_count=8 --no_progress '
    "> ~/imagen_logs/precompute.log"
  ) in script
  assert "agent-worker-number" in script
  subprocess.run(["bash", "-n", "-c", script], check=True)


def test_dry_run_logs_stop_delete(capsys):
  status, lines = _dry(capsys, "logs", *SLICE, "--worker=3", "--follow", "--lines=20")
  assert status == 0
  assert lines == [
    f"gcloud compute tpus tpu-vm ssh imagen {SCOPE} --worker=3 "
    "'--command=tail -n 20 -F ~/imagen_logs/train.log'"
  ]
  status, lines = _dry(capsys, "stop", *SLICE)
  assert status == 0 and "--worker=all" in lines[0]
  assert 'kill -TERM "$(cat ~/imagen_logs/train.pid)"' in _remote(lines[0])
  subprocess.run(["bash", "-n", "-c", _remote(lines[0])], check=True)
  status, lines = _dry(capsys, "run", *SLICE, "--remote=ls assets")
  assert status == 0
  assert lines == [
    f"gcloud compute tpus tpu-vm ssh imagen {SCOPE} --worker=all "
    "'--command=cd ~/imagen_jax && ls assets'"
  ]
  status, lines = _dry(capsys, "delete", *SLICE)
  assert status == 0
  assert lines == [f"gcloud compute tpus queued-resources delete imagen --force {SCOPE} --quiet"]


# ------------------------------------------------------------------------------------------------
# tpu_vm.py: bad input, and real runs through a recording gcloud
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """A `gcloud` on PATH that appends its argv to a file (and says ACTIVE when described)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "calls.txt"
  script = bin_dir / "gcloud"
  script.write_text(
    "#!/usr/bin/env bash\n"
    f'echo "$*" >> {shlex.quote(str(record))}\n'
    'if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi\n'
  )
  script.chmod(script.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
  return record


def _calls(record) -> list[str]:
  return record.read_text().splitlines() if record.exists() else []


@pytest.mark.parametrize("bad", ["v3-8", "v5p-12", "v6e-3", "v5e-2", "tpu-v4-8", "v4-9000"])
def test_unknown_accelerator_rejected_before_anything_runs(bad, fake_gcloud, capsys):
  args = ["create", "--name=n", "--project=p", "--zone=z", f"--accelerator_type={bad}"]
  assert tpu_vm.main(args) == 2
  assert "--accelerator_type" in capsys.readouterr().err
  assert _calls(fake_gcloud) == []


def test_model_dir_must_be_on_gcs_for_a_multihost_slice(fake_gcloud, capsys, source):
  args = ["train", *SLICE, f"--source={source}", "--gin_file=configs/stages/base64.gin"]
  assert tpu_vm.main([*args, "--gin.MODEL_DIR='/tmp/run'", "--data=gs://b/d"]) == 2
  assert "MODEL_DIR='/tmp/run' is not on GCS" in capsys.readouterr().err
  assert tpu_vm.main([*args, "--model_dir=gs://b/run"]) == 2
  assert "no DATA" in capsys.readouterr().err
  assert _calls(fake_gcloud) == []


def test_single_host_slice_accepts_a_local_model_dir(capsys, tmp_path):
  root = tmp_path / "src"
  (root / "configs/mesh").mkdir(parents=True)
  (root / "configs/mesh/cpu.gin").write_text("# stub\n")
  args = ["train", "--name=n", "--project=p", "--zone=z", "--accelerator_type=v5p-8"]
  status, lines = _dry(
    capsys,
    *args,
    f"--source={root}",
    "--gin_file=configs/mesh/cpu.gin",
    "--model_dir=/m",
    "--data=/d",
  )
  assert status == 0
  assert "--multihost" not in lines[0] and '--gin.MODEL_DIR="/m"' in lines[0]


def test_missing_gin_file_and_missing_preset_are_reported(capsys, source):
  args = ["train", "--name=n", "--project=p", "--zone=z", f"--source={source}", "--bucket=gs://b"]
  status = tpu_vm.main([*args, "--accelerator_type=v5p-64", "--gin_file=configs/stages/nope.gin"])
  assert status == 2 and "nope.gin" in capsys.readouterr().err
  status = tpu_vm.main([*args, "--accelerator_type=v5p-32", "--gin_file=configs/stages/base64.gin"])
  assert status == 2 and "no mesh preset configs/mesh/v5p-32.gin" in capsys.readouterr().err


def test_missing_gcloud_is_an_error_unless_dry_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))  # no gcloud anywhere
  assert tpu_vm.main(["create", *SLICE]) == 2
  assert "gcloud not found" in capsys.readouterr().err
  assert tpu_vm.main(["create", *SLICE, "--dry_run"]) == 0


def test_create_runs_gcloud_and_waits_until_active(fake_gcloud):
  assert tpu_vm.main(["create", *SLICE, "--spot"]) == 0
  calls = _calls(fake_gcloud)
  assert calls[0] == (
    "compute tpus queued-resources create imagen --node-id=imagen --project=proj "
    "--zone=us-east5-a --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot"
  )
  assert calls[1].startswith("compute tpus queued-resources describe imagen")
  assert len(calls) == 2


def test_delete_asks_first(fake_gcloud, monkeypatch, capsys):
  monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
  assert tpu_vm.main(["delete", *SLICE]) == 1
  assert "nothing deleted" in capsys.readouterr().err
  monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal: treated as "no"
  assert tpu_vm.main(["delete", *SLICE]) == 1
  assert _calls(fake_gcloud) == []
  monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
  assert tpu_vm.main(["delete", *SLICE]) == 0
  assert tpu_vm.main(["delete", *SLICE, "--yes"]) == 0
  expected = (
    "compute tpus queued-resources delete imagen --force --project=proj --zone=us-east5-a --quiet"
  )
  assert _calls(fake_gcloud) == [expected, expected]


def test_failing_gcloud_stops_the_sequence(tmp_path, monkeypatch, source):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text("#!/usr/bin/env bash\nexit 7\n")
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
  # setup = tar, scp, ssh: the tar succeeds, the scp fails, the ssh never runs.
  assert tpu_vm.main(["setup", *SLICE, f"--source={source}", f"--local_tmp={tmp_path}"]) == 7
  assert (tmp_path / "imagen_jax-imagen.tar.gz").stat().st_size > 0


def test_launchers_pass_ruff():
  files = [os.path.join(LAUNCH, f) for f in ("tpu_vm.py", "local.py")]
  ruff = [sys.executable, "-m", "ruff"]
  for cmd in (["check"], ["format", "--check"]):
    r = subprocess.run([*ruff, *cmd, *files], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------
# slurm_gpu.sbatch
# ------------------------------------------------------------------------------------------------

SBATCH = os.path.join(LAUNCH, "slurm_gpu.sbatch")


def _sbatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
  base = {"PATH": os.environ["PATH"], "DRY_RUN": "1"}
  return subprocess.run(
    ["bash", SBATCH, *args], env={**base, **env}, capture_output=True, text=True, check=False
  )


def test_sbatch_syntax_and_command():
  subprocess.run(["bash", "-n", SBATCH], check=True)
  r = _sbatch(
    {"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "h100:8", "IMAGEN_JAX": "/v/imagen-jax"},
    "--gin_file=configs/runs/pretrain.gin",
    "--gin.MODEL_DIR='/shared/run'",
  )
  assert r.returncode == 0, r.stderr
  assert shlex.split(r.stdout) == [
    "srun",
    "--kill-on-bad-exit=1",
    "--cpu-bind=none",
    "/v/imagen-jax",
    "train",
    "--multihost",
    "--gin_file=configs/runs/pretrain.gin",
    "--gin.MODEL_DIR='/shared/run'",
  ]


def test_sbatch_rejects_one_task_per_node_and_no_flags():
  r = _sbatch({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_PER_NODE": "8"}, "--gin_file=x.gin")
  assert r.returncode == 2 and "one task per GPU" in r.stderr
  r = _sbatch({})
  assert r.returncode == 2 and "pass the training flags" in r.stderr


# ------------------------------------------------------------------------------------------------
# Mesh presets
# ------------------------------------------------------------------------------------------------

PRESETS = sorted(
  f[: -len(".gin")]
  for f in os.listdir(os.path.join(REPO, "configs/mesh"))
  if f.startswith("v") and f.endswith(".gin")
)


def test_presets_cover_the_issue_slices():
  assert {"v4-256", "v4-128", "v5p-128", "v5p-64", "v6e-256"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_mesh_preset_fills_its_slice_with_batch_2048(name):
  import gin

  from imagen_jax import gin_utils

  acc = tpu_vm.parse_accelerator(name)
  assert acc.name == name  # presets are named as gcloud names the slice
  gin_utils.parse_gin([f"configs/mesh/{name}.gin"], finalize=False)
  try:
    sizes = [gin.query_parameter(f"parallel.MeshConfig.{a}") for a in ("data", "fsdp", "model")]
    topology = gin.query_parameter("parallel.MeshConfig.topology")
    batch = gin.query_parameter("train.train.batch_size")
  finally:
    gin.clear_config()
  assert topology == name
  assert sizes[0] * sizes[1] * sizes[2] == acc.devices
  assert batch == 2048
  assert batch % acc.devices == 0 and batch % acc.hosts == 0


# ------------------------------------------------------------------------------------------------
# local.py
# ------------------------------------------------------------------------------------------------


def test_local_commands_and_env():
  cmds = local.build_commands(2, 4, 1234, ["--gin_file=a.gin", "--gin.X=1"], python="py")
  assert cmds[1] == [
    "py",
    "-m",
    "imagen_jax.cli",
    "train",
    "--coordinator_address=127.0.0.1:1234",
    "--num_processes=2",
    "--process_id=1",
    "--num_cpu_devices=4",
    "--gin_file=a.gin",
    "--gin.X=1",
  ]
  with pytest.raises(ValueError, match="set by launch/local.py"):
    local.build_commands(2, 4, 1, ["--process_id=0"])
  with pytest.raises(ValueError, match="num_processes"):
    local.build_commands(0, 4, 1, [])
  env = local.child_env(
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/d", "JAX_PLATFORMS": ""}
  )
  assert env["XLA_FLAGS"] == "--xla_dump_to=/d" and env["JAX_PLATFORMS"] == "cpu"


def test_local_runner_prefixes_output_and_stops_the_others(tmp_path):
  py = sys.executable
  out = io.StringIO()
  t0 = time.time()
  status = local.run_local(
    [
      [py, "-c", "import time; print('waiting', flush=True); time.sleep(60)"],
      [py, "-c", "import sys; print('boom'); sys.exit(3)"],
    ],
    log_dir=str(tmp_path),
    grace_s=5,
    out=out,
  )
  assert status == 3
  assert time.time() - t0 < 20  # the sleeper was stopped, not waited for
  text = out.getvalue()
  assert "[p1] boom" in text and "[p0] waiting" in text
  assert "process 1 exited with status 3" in text
  assert (tmp_path / "process_1.log").read_text() == "boom\n"


def test_local_runner_success_and_timeout():
  py = sys.executable
  out = io.StringIO()
  ok = [[py, "-c", f"print({i})"] for i in range(3)]
  assert local.run_local(ok, out=out) == 0
  assert sorted(out.getvalue().splitlines()) == ["[p0] 0", "[p1] 1", "[p2] 2"]
  slow = [[py, "-c", "import time; time.sleep(60)"]]
  assert local.run_local(slow, timeout_s=1, grace_s=2, out=io.StringIO()) == 124


# The real 2-process run through launch/local.py is tests/test_train.py::
# test_two_processes_match_one_process (it also checks the losses against one process).

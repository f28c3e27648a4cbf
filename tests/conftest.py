"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backends."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu is installed for the deviceless TPU compile tests: keep it from probing for TPU
# hardware and workers (a second of errors on stderr per process otherwise).
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Deviceless compiles touch no chip, so parallel test workers may all load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# Tests are dominated by XLA:CPU compile time (LLVM); level 0 cuts it 2–5× for tiny models.
# Subprocesses started by tests inherit it through the environment.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
# Non-partitionable threefry compiles inits several times faster on CPU; values differ from the
# default but are equally deterministic (set via the environment so subprocesses agree).
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
# Many tests (and the subprocesses they start) compile the same tiny train step: share the
# compiled programs through JAX's persistent cache instead of recompiling each time.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "imagen_jax_test_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests compare against closed forms and reference numbers: keep float32 matmuls exact on CPU.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Runs the tests marked `slow` first: with `pytest -n 2`, a multi-minute test dealt out last
  would leave one worker idle while it runs; started first, the short ones fill in around it."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""The orbax checkpointer: named items round-trip, keep-last-K, fallback past a corrupt step."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax import checkpoints, parallel


def _trees(scale: float):
  state = {"step": jnp.asarray(int(scale), jnp.int32), "w": jnp.full((8, 4), scale)}
  ema = {"w": jnp.full((8, 4), -scale)}
  return state, ema


def _abstract(tree, mesh):
  return checkpoints.abstract_with_shardings(
    tree, jax.tree.map(lambda _: parallel.replicated(mesh), tree)
  )


def test_round_trip_keep_last_and_corrupt_fallback(tmp_path, caplog):
  mesh = parallel.create_mesh()
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=1)
  for step in (1, 2, 3):
    state, ema = _trees(float(step))
    ckpt.save(step, state, ema, {"epoch": 0, "position": step}, f"# gin at {step}")
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [2, 3], "keep the last 2"
  state, ema = _trees(0.0)
  step, (s, e, it, cfg) = ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh))
  assert step == 3 and it == {"epoch": 0, "position": 3} and cfg == "# gin at 3"
  np.testing.assert_array_equal(s["w"], 3.0)
  np.testing.assert_array_equal(e["w"], -3.0)
  ckpt.close()

  # Corrupt the newest step's EMA arrays: restore warns and falls back to step 2.
  for path in glob.glob(str(tmp_path / "3" / "ema_params" / "**" / "*"), recursive=True):
    if os.path.isfile(path) and not path.endswith((".json", "_METADATA")):
      with open(path, "wb") as f:
        f.write(b"garbage")
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=1)
  with caplog.at_level(logging.WARNING):
    step, (s, e, it, _) = ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh))
  assert step == 2 and it["position"] == 2
  np.testing.assert_array_equal(e["w"], -2.0)
  assert "could not be restored" in caplog.text
  ckpt.close()


def test_empty_directory_has_nothing_to_restore(tmp_path):
  mesh = parallel.create_mesh()
  ckpt = checkpoints.Checkpointer(str(tmp_path / "none"))
  state, ema = _trees(0.0)
  assert ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh)) is None
  assert ckpt.latest_step() is None
  ckpt.close()


def test_single_tree_helpers_round_trip(tmp_path):
  tree = {"a": {"kernel": np.arange(6.0, dtype=np.float32).reshape(2, 3)}, "b": np.ones(4)}
  path = str(tmp_path / "tree")
  checkpoints.save_pytree(path, tree)
  meta = checkpoints.read_pytree_metadata(path)
  assert tuple(meta["a"]["kernel"].shape) == (2, 3)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  subset = {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=device)}}
  restored = checkpoints.restore_pytree_subset(path, subset)
  assert set(restored) == {"a"} and restored["a"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(restored["a"]["kernel"], np.float32), tree["a"]["kernel"]
  )


def test_relative_paths_work(tmp_path, monkeypatch):
  # orbax itself rejects relative paths on restore; users pass them (--stage_dirs=rel/dir).
  monkeypatch.chdir(tmp_path)
  mesh = parallel.create_mesh()
  ckpt = checkpoints.Checkpointer("run/checkpoints", save_interval_steps=1, async_save=False)
  state, ema = _trees(5.0)
  ckpt.save(5, state, ema, {"position": 5}, "# gin")
  ckpt.close()
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "5")
  ckpt = checkpoints.Checkpointer("run/checkpoints")
  step, (_, e, _, _) = ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh))
  ckpt.close()
  assert step == 5
  np.testing.assert_array_equal(e["w"], -5.0)
  checkpoints.save_pytree("tree", {"k": np.arange(3.0, dtype=np.float32)})
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"k": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=device)}
  np.testing.assert_array_equal(checkpoints.restore_pytree_subset("tree", abstract)["k"], [0, 1, 2])

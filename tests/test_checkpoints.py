"""The orbax checkpointer: named items round-trip, keep-last-K, every reader falls back past a
truncated or corrupt step (real orbax files, damaged on disk), training moves such steps aside."""

import glob
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax import checkpoints, errors, parallel


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
  _garble_arrays(tmp_path / "3" / "ema_params")
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=1)
  with caplog.at_level(logging.WARNING):
    step, (s, e, it, _) = ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh))
  assert step == 2 and it["position"] == 2
  np.testing.assert_array_equal(e["w"], -2.0)
  assert f"skipping checkpoint step 3 in {tmp_path}: {tmp_path / '3' / 'ema_params'}" in caplog.text
  assert os.path.isdir(tmp_path / "3"), "a reader never moves steps"
  ckpt.close()


def _garble_arrays(item_dir):
  """Overwrites an array item's data files (what a torn write to storage leaves)."""
  for path in glob.glob(str(item_dir / "**" / "*"), recursive=True):
    if os.path.isfile(path) and not path.endswith((".json", "_METADATA")):
      with open(path, "wb") as f:
        f.write(b"garbage")


def _truncate(path, keep=5):
  with open(path, "rb") as f:
    data = f.read()
  assert len(data) > keep, path
  with open(path, "wb") as f:
    f.write(data[:keep])


def _saved(directory, steps, max_to_keep=3):
  ckpt = checkpoints.Checkpointer(
    str(directory), max_to_keep=max_to_keep, save_interval_steps=1, async_save=False
  )
  for step in steps:
    state, ema = _trees(float(step))
    ckpt.save(step, state, ema, {"position": step}, f"# gin at {step}")
  return ckpt


def test_every_reader_skips_a_truncated_newest_step(tmp_path, caplog):
  mesh = parallel.create_mesh()
  _saved(tmp_path, (1, 2)).close()
  _truncate(tmp_path / "2" / "config" / "metadata")  # the JSON item: a JSONDecodeError
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    assert ckpt.read_config() == "# gin at 1"
    # A reader of the EMA alone reads an item that is intact at step 2.
    np.testing.assert_array_equal(ckpt.restore_ema_params(None)["w"], -2.0)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  config_file = tmp_path / "2" / "config" / "metadata"
  assert warnings[0].startswith(f"skipping checkpoint step 2 in {tmp_path}: {config_file}: ")
  assert "JSONDecodeError" in warnings[0] and "\n" not in warnings[0]
  # An explicit step is an answer, not a hint: its failure names the file.
  with pytest.raises(
    errors.UserError, match=re.escape(f"{tmp_path / '2' / 'config' / 'metadata'}")
  ):
    ckpt.read_config(2)
  state, ema = _trees(0.0)
  with pytest.raises(errors.UserError, match=r"checkpoint step 2 does not load: .*metadata"):
    ckpt.load_newest(lambda s: ckpt.restore(s, _abstract(state, mesh), _abstract(ema, mesh)), 2)
  with pytest.raises(errors.UserError, match=r"step 9 is not in .*finalized steps: \[1, 2\]"):
    ckpt.load_newest(ckpt.read_config, 9)
  ckpt.close()


def test_no_loadable_step_is_one_line_naming_the_steps(tmp_path):
  _saved(tmp_path, (1, 2)).close()
  _truncate(tmp_path / "2" / "config" / "metadata")
  _garble_arrays(tmp_path / "1" / "ema_params")
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(errors.UserError) as e:
    ckpt.load_newest(lambda s: (ckpt.read_config(s), ckpt.restore_ema_params(s)), move_aside=True)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"no checkpoint in {tmp_path} loads (tried steps 2, 1); step 2: "), msg
  assert "JSONDecodeError" in msg
  # Nothing moves when nothing loads: every step failing is more likely a changed config.
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  ckpt.close()


def test_training_moves_a_corrupt_step_out_of_keep_last_k(tmp_path, caplog):
  mesh = parallel.create_mesh()
  _saved(tmp_path, (1, 2, 3), max_to_keep=2).close()
  _garble_arrays(tmp_path / "3" / "state")
  state, ema = _trees(0.0)
  ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=2, save_interval_steps=1)
  with caplog.at_level(logging.WARNING):
    step, _ = ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh), move_aside=True)
  assert step == 2
  assert ckpt.all_steps() == [2]
  assert os.path.isdir(tmp_path / "corrupt.3"), "moved aside, never deleted"
  assert f"moved unloadable checkpoint step 3 to {tmp_path / 'corrupt.3'}" in caplog.text
  # The run redoes step 3 and goes on: keep-last-2 now keeps the good steps 3 and 4. (With
  # the corrupt step counted, saving 3 would fail and 4 would delete the good step 2.)
  for step in (3, 4):
    state, ema = _trees(float(step))
    assert ckpt.save(step, state, ema, {"position": step}, "# gin")
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [3, 4]
  assert sorted(os.listdir(tmp_path)) == ["3", "4", "corrupt.3"]
  step, (_, e, it, _) = ckpt.restore_latest(_abstract(state, mesh), _abstract(ema, mesh))
  assert step == 4 and it == {"position": 4}
  ckpt.close()


def test_check_writable_dir(tmp_path):
  errors.check_writable_dir(str(tmp_path / "new" / "run"), "MODEL_DIR")
  assert os.listdir(tmp_path / "new" / "run") == [], "created, probe removed"
  (tmp_path / "a_file").write_text("x")
  # Under a regular file nothing can be created, even by root.
  with pytest.raises(errors.UserError, match=r"^MODEL_DIR .*a_file/sub is not a writable dir"):
    errors.check_writable_dir(str(tmp_path / "a_file" / "sub"), "MODEL_DIR")
  errors.check_writable_dir("gs://bucket/run", "MODEL_DIR")  # remote: left to the writes


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


def test_a_stage_loads_from_its_saved_spec_without_gin(tmp_path):
  """A step with a stage_spec item is rebuilt from it alone: its gin config here is text no
  gin parse could read (as after renaming the training function), yet sample/export's loader
  rebuilds the same network and params. Steps without the item (the previous layout) are read
  through their gin config: tests/test_cli.py's stage dirs are written that way."""
  from imagen_jax.inference import cascade
  from tests import cascade_helpers

  made = cascade_helpers.random_stage(*cascade_helpers.STAGES[0], seed=3)
  spec = json.loads(json.dumps(made.spec))  # as JSON stores it
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(4, {"step": np.int32(4)}, made.params, {}, "not_a_binding(", stage_spec=spec)
  ckpt.close()
  with pytest.raises(Exception):  # noqa: B017 - whatever gin raises: it is never consulted
    cascade.stage_spec_from_gin("not_a_binding(")
  loaded = cascade.load_stage_dir(str(tmp_path))
  assert loaded.spec["network"] == spec["network"]
  assert loaded.spec["stage_config"] == spec["stage_config"]
  assert loaded.spec["source"] == {"model_dir": str(tmp_path), "step": 4}
  assert type(loaded.stage.network) is type(made.stage.network)
  assert loaded.stage.network.channels == made.stage.network.channels
  for a, b in zip(jax.tree.leaves(made.params), jax.tree.leaves(loaded.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

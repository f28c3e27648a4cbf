"""Eval during training: the validation split's loss at a fixed t grid (evaluation.ValidationLoss).

The loss must be a function of the params alone (same examples, t and noise every call, on
any number of devices), so its curve over steps is comparable; the training job logs it to
metrics.jsonl and TensorBoard every `eval_every` steps and draws MODEL_DIR/eval_loss.png.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import PIL.Image
import pytest

from imagen_jax import errors, gin_utils, parallel, train
from imagen_jax.stage import Stage
from imagen_jax.training import evaluation
from tests import train_helpers

STAGE_GIN = "configs/stages/tiny_base.gin"
GRID = evaluation.EVAL_T_GRID


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """64 train + 32 validation `shapes` examples, both splits precomputed."""
  from imagen_jax.data import precompute

  work = str(tmp_path_factory.mktemp("shapes"))
  cfg = precompute.PrecomputeConfig(
    source="shapes",
    out=os.path.join(work, "precomputed"),
    vocab=train_helpers.shapes_vocabulary(work),
    t5_checkpoint="random",
    t5_size="tiny",
    max_length=train_helpers.MAX_LENGTH,
    examples_per_shard=16,
    tfds_data_dir=os.path.join(work, "tfds"),
    num_examples=64,
    num_validation=32,
    resolution=32,
    batch_size=32,
    splits=("train", "validation"),
    progress=False,
  )
  precompute.run_precompute(cfg)
  return cfg.out


def _bindings(model_dir, data_dir, **extra):
  b = [f"MODEL_DIR = '{model_dir}'", f"DATA = '{data_dir}'"]
  return b + [f"train.train.{k} = {v!r}" for k, v in extra.items()]


def _tiny_stage(data_dir, tmp_path, stage_gin=STAGE_GIN) -> Stage:
  import gin

  from imagen_jax import stage
  from imagen_jax.nn import factory

  gin_utils.parse_gin(
    [stage_gin, "configs/mesh/cpu1.gin", "configs/runs/tiny.gin"], _bindings(tmp_path, data_dir)
  )
  return Stage(gin.get_configurable(factory.network)(), gin.get_configurable(stage.StageConfig)())


def _validation(data_dir, batch_size, resolution=16, lowres_resolution=None):
  from imagen_jax.data import input_pipeline

  return input_pipeline.make_train_iterator(
    data_dir,
    batch_size=batch_size,
    resolution=resolution,
    lowres_resolution=lowres_resolution,
    max_length=train_helpers.MAX_LENGTH,
    split="validation",
    process_index=0,
    process_count=1,
  )


def _init_params(stage_obj, mesh):
  batch = stage_obj.dummy_batch(1, train_helpers.MAX_LENGTH, train_helpers.TEXT_DIM)
  inputs = {k: np.zeros(v.shape, v.dtype) for k, v in batch.items()}
  return train_helpers.sharded_init(stage_obj.init_params, mesh, jax.random.PRNGKey(0), inputs)


def _perturbed(params, scale=0.05):
  """Host copies of `params` + seeded noise: a network whose output is not zero."""
  rng = np.random.default_rng(0)
  return jax.tree.map(
    lambda p: (np.asarray(p) + scale * rng.standard_normal(p.shape)).astype(np.float32), params
  )


def test_eval_loss_is_fixed_per_params_on_1_and_8_devices(data_dir, tmp_path):
  stage_obj = _tiny_stage(data_dir, tmp_path)
  one = parallel.MeshConfig(data=1, fsdp=1, model=1, max_devices=1).build()
  eight = parallel.MeshConfig(data=2, fsdp=4, model=1).build()
  params, _ = _init_params(stage_obj, one)
  evaluate = evaluation.ValidationLoss(stage_obj, one, params, _validation(data_dir, 8), GRID, 2, 0)
  assert evaluate.num_examples == 16

  # Closed form at init: the output conv is zero-initialised, so ε-prediction's loss of example
  # i is mean(ε_i²) at every t, with ε_i = normal(fold_in(fold_in(fold_in(seed 0, 1), i), 0)).
  key = jax.random.fold_in(jax.random.PRNGKey(0), 1)
  expected = np.mean(
    [
      np.mean(
        np.square(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0), (16, 16, 3)))
      )
      for i in range(16)
    ]
  )
  at_init = evaluate(params)
  assert list(at_init) == evaluation.eval_metric_names(GRID)
  np.testing.assert_allclose(list(at_init.values()), expected, rtol=1e-6)

  # A non-trivial network: perturb every weight (zero output would hide the devices' numerics).
  host = _perturbed(params)
  params = jax.device_put(host, jax.tree.map(lambda p: p.sharding, params))
  first, second = evaluate(params), evaluate(params)
  assert first == second  # bit-identical: same examples, t and noise on every call
  per_t = [first[n] for n in evaluation.eval_metric_names(GRID)[1:]]
  assert len(set(per_t)) == len(GRID)  # the buckets really differ by t
  np.testing.assert_allclose(first["eval/loss"], np.mean(per_t), rtol=1e-12)

  _, shardings = parallel.abstract_and_shardings(
    stage_obj.init_params,
    eight,
    jax.random.PRNGKey(0),
    stage_obj.dummy_batch(1, train_helpers.MAX_LENGTH, train_helpers.TEXT_DIM),
  )
  sharded = jax.device_put(host, shardings)
  on_eight = evaluation.ValidationLoss(
    stage_obj, eight, sharded, _validation(data_dir, 8), GRID, 2, 0
  )
  # Same values on 8 devices (FSDP 2x4) up to float32 reduction order inside the convolutions:
  # measured max relative difference 0 to a few 1e-7; 1e-5 allows for other CPUs.
  got = on_eight(sharded)
  np.testing.assert_allclose(list(got.values()), list(first.values()), rtol=1e-5)


@pytest.mark.slow
def test_train_job_logs_falling_eval_loss_to_metrics_tensorboard_and_a_plot(
  data_dir, tmp_path, caplog
):
  import tensorflow as tf

  caplog.set_level(logging.INFO, logger="imagen_jax")
  gin_utils.parse_gin(
    [STAGE_GIN, "configs/mesh/cpu1.gin", "configs/runs/tiny.gin"],
    _bindings(
      tmp_path,
      data_dir,
      num_train_steps=80,
      log_every=20,
      checkpoint_every=1000,
      eval_every=20,
      eval_batches=2,
    ),
  )
  train.configurable_train()()
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  names = evaluation.eval_metric_names(GRID)
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [20, 40, 60, 80]
  assert all(sorted(r) == sorted(["step", *names]) for r in evals)
  curve = [r["eval/loss"] for r in evals]
  # Measured: the EMA's loss falls at every eval (ε-prediction starts at E[ε²] = 1).
  assert all(b < a for a, b in zip(curve, curve[1:])), curve
  assert curve[-1] < 0.8 * curve[0], curve
  assert "eval step compiled: 32 validation examples x 8 t every 20 steps" in caplog.text

  tags = set()
  for event_file in tf.io.gfile.glob(str(tmp_path / "tensorboard" / "events.*")):
    for event in tf.compat.v1.train.summary_iterator(event_file):
      tags.update(v.tag for v in event.summary.value)
  assert set(names) <= tags

  plot = np.asarray(PIL.Image.open(tmp_path / evaluation.EVAL_PLOT).convert("RGB"))
  assert plot.shape == (400, 640, 3)
  # The mean is drawn thick in black over a white canvas: there are dark pixels inside the axes.
  inside = plot[30:360, 61:489]
  assert (inside.sum(axis=-1) < 60).sum() > 100


def test_data_without_a_validation_split_skips_eval_with_one_line(data_dir, tmp_path, caplog):
  no_val = str(tmp_path / "data")
  shutil.copytree(data_dir, no_val)
  manifest_path = os.path.join(no_val, "manifest.json")
  with open(manifest_path) as f:
    manifest = json.load(f)
  del manifest["splits"]["validation"]
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  assert evaluation.has_validation_split(data_dir, None)
  assert not evaluation.has_validation_split(no_val, None)
  # On-the-fly text mode reads the prepared TFDS dataset's splits (shapes builds both).
  (info,) = glob.glob(
    os.path.join(os.path.dirname(data_dir), "tfds", "**", "dataset_info.json"), recursive=True
  )
  assert evaluation.has_validation_split(os.path.dirname(info), None)
  caplog.set_level(logging.INFO, logger="imagen_jax")
  assert evaluation.open_validation(no_val, False, None, 8) is None
  assert caplog.text.count("no validation split") == 1


@pytest.mark.parametrize("grid", [(), (0.0, 0.5), (0.5, 1.0), (0.2, 0.2), "x"])
def test_bad_t_grid_is_a_user_error(grid):
  with pytest.raises(errors.UserError, match=r"eval_t_grid=.* must be distinct times in \(0, 1\)"):
    evaluation.check_eval_t_grid(grid)


def test_plot_draws_the_headline_from_its_first_to_its_last_point():
  from imagen_jax.evaluation import curves

  # y falls from 1 to 0 over x 0..10: the thick black line runs from the axes' top-left corner
  # (60, 30) to their bottom-right one (490, 360); a second series must not move it.
  image = curves.plot_series({"mean": ([0, 10], [1.0, 0.0]), "t": ([0, 10], [0.5, 0.5])}, "t")
  assert image.shape == (400, 640, 3)
  assert (image[30, 60] == 0).all() and (image[360, 490] == 0).all()
  assert (image[195, 275] == 0).all()  # the middle of the diagonal
  orange = np.array(curves.COLOURS[0])
  assert (image[195, 100] == orange).all()  # the flat series at y = 0.5, in its own colour


def test_sr_eval_loss_is_loss_at_with_each_example_index_noise(data_dir, tmp_path):
  """The eval's plumbing (rows, indices, ε and low-res augmentation noise, means) against
  `Stage.loss_at` called directly on the same examples with noise rebuilt on the host."""
  import jax.numpy as jnp

  stage_obj = _tiny_stage(data_dir, tmp_path, "configs/stages/tiny_sr.gin")
  one = parallel.MeshConfig(data=1, fsdp=1, model=1, max_devices=1).build()
  params, shardings = _init_params(stage_obj, one)
  params = jax.device_put(_perturbed(params), shardings)
  grid, seed = (0.3, 0.7), 3
  evaluate = evaluation.ValidationLoss(
    stage_obj, one, params, _validation(data_dir, 4, 32, 16), grid, 2, seed
  )
  got = evaluate(params)

  key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  normal = lambda i, stream, shape: jax.random.normal(
    jax.random.fold_in(jax.random.fold_in(key, i), stream), shape
  )
  loss_at = jax.jit(stage_obj.loss_at)
  examples, per_t = _validation(data_dir, 4, 32, 16), {t: [] for t in grid}
  for b in range(2):
    batch = {k: v for k, v in next(examples).items() if k != "key"}
    rows = range(4 * b, 4 * b + 4)
    noise = np.stack([normal(i, 0, (32, 32, 3)) for i in rows])
    aug_noise = np.stack([normal(i, 1, (16, 16, 3)) for i in rows])
    for t in grid:
      per_t[t] += list(np.asarray(loss_at(params, batch, jnp.full((4,), t), noise, aug_noise)))
  expected = [np.mean([np.mean(v) for v in per_t.values()])] + [np.mean(per_t[t]) for t in grid]
  # Same math, other programs (vmapped draws, lax.map over t): float32 rounding apart.
  np.testing.assert_allclose(list(got.values()), expected, rtol=1e-5)
  # The augmentation noise is an input that matters: other noise, another loss.
  other = loss_at(params, batch, jnp.full((4,), 0.3), noise, aug_noise[::-1])
  assert not np.allclose(other, per_t[0.3][-4:], rtol=1e-4)

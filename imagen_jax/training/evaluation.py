"""Eval during training: the validation split's loss at a fixed grid of t, and its plot."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from imagen_jax import errors, images, parallel
from imagen_jax.stage import Stage

log = logging.getLogger(__name__)

# Midpoints of 8 equal buckets of [0, 1]: their mean is the midpoint rule for the loss averaged
# over t ~ U(0, 1), the expectation the training loss estimates (without text drop).
EVAL_T_GRID = tuple((k + 0.5) / 8 for k in range(8))
EVAL_PLOT = "eval_loss.png"
EVAL_NOISE_STREAM = 1  # folded into PRNGKey(seed): a key of its own, not one the step splits


def check_eval_settings(eval_every: int, eval_batches: int, eval_t_grid: Any) -> tuple[float, ...]:
  """The eval knobs, checked before any work; returns the t grid (empty when eval is off)."""
  if eval_every < 0 or eval_batches < 1:
    raise errors.UserError(
      f"eval_every={eval_every} must be >= 0 and eval_batches={eval_batches} >= 1; pass e.g. "
      "--gin.train.train.eval_every=1000 --gin.train.train.eval_batches=4"
    )
  return check_eval_t_grid(eval_t_grid) if eval_every else ()


def log_eval_compiled(evaluator: Any, validation: Any, eval_every: int, seconds: float) -> None:
  log.info(
    "eval step compiled: %d validation examples x %d t every %d steps (%.1fs)%s",
    evaluator.num_examples,
    len(evaluator.t_grid),
    eval_every,
    seconds,
    f"; the split has {validation.num_examples}, so examples repeat, each with its own noise"
    if evaluator.num_examples > validation.num_examples
    else "",
  )


def check_eval_t_grid(t_grid: Any) -> tuple[float, ...]:
  """The grid as floats: distinct times strictly inside (0, 1) (λ(t) is infinite at 0 and 1)."""
  try:
    values = tuple(float(t) for t in t_grid)
  except (TypeError, ValueError):
    values = ()
  if not values or len(set(values)) != len(values) or not all(0 < t < 1 for t in values):
    raise errors.UserError(
      f"eval_t_grid={t_grid!r} must be distinct times in (0, 1); pass e.g. "
      "--gin.train.train.eval_t_grid=(0.25,0.5,0.75)"
    )
  return values


def eval_metric_names(t_grid: tuple[float, ...]) -> list[str]:
  """metrics.jsonl / TensorBoard names: `eval/loss` (the mean) then one per t."""
  return ["eval/loss"] + [f"eval/loss_t{t:g}" for t in t_grid]


def make_eval_step(
  stage: Stage, t_grid: tuple[float, ...], key: jax.Array
) -> Callable[[Any, dict], jax.Array]:
  """(params, batch with an int 'index' per row) -> [T, B] per-example losses, one row per t.

  Example i's noise is drawn from fold_in(key, i), so it depends on neither the batch layout
  nor the devices; one ε per example serves every t, so buckets differ by t, not by noise.
  """
  ts = jnp.asarray(t_grid, jnp.float32)

  def eval_step(params: Any, batch: dict) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
    draw = lambda name, stream: jax.vmap(
      lambda k: jax.random.normal(jax.random.fold_in(k, stream), batch[name].shape[1:])
    )(keys)
    noise = draw("image", 0)
    aug_noise = draw("lowres", 1) if "lowres" in batch else None
    inputs = {k: v for k, v in batch.items() if k != "index"}
    b = batch["image"].shape[0]
    at = lambda t: stage.loss_at(params, inputs, jnp.full((b,), t), noise, aug_noise)
    return jax.lax.map(at, ts)  # one t at a time: the activations of one forward pass

  return eval_step


class ValidationLoss:
  """The validation split's loss at a fixed t grid: the same examples, t and noise each call.

  Args:
    stage: the stage (owns the objective: `Stage.loss_at`).
    mesh: the training mesh; the eval batch is split over ('data', 'fsdp') like training's.
    params_like: arrays or ShapeDtypeStructs with the params' shapes and shardings.
    examples: this process's validation iterator; rewound to its start on every call.
    t_grid: diffusion times (`check_eval_t_grid`).
    num_batches: global batches per call (the eval set: the iterator's first ones).
    seed: the run seed the noise key derives from.
  """

  def __init__(
    self,
    stage: Stage,
    mesh: Mesh,
    params_like: Any,
    examples: Any,
    t_grid: tuple[float, ...],
    num_batches: int,
    seed: int,
  ):
    self.examples, self.t_grid, self.num_batches, self.mesh = examples, t_grid, num_batches, mesh
    self._start = examples.get_state()
    self.local_batch = examples.batch_size
    self.global_batch = examples.batch_size * jax.process_count()
    shapes = {
      k: jax.ShapeDtypeStruct(
        (self.global_batch, *s[1:]), d, sharding=parallel.batch_sharding(mesh, len(s))
      )
      for k, (s, d) in examples.batch_shapes().items()
    }
    shapes["index"] = jax.ShapeDtypeStruct(
      (self.global_batch,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1)
    )
    self._fields = tuple(shapes)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_NOISE_STREAM)
    param_shardings = jax.tree.map(lambda x: x.sharding, params_like)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
      self._step = (
        jax.jit(
          make_eval_step(stage, t_grid, key),
          in_shardings=(param_shardings, {k: v.sharding for k, v in shapes.items()}),
          out_shardings=parallel.replicated(mesh),
        )
        .lower(params_like, shapes)
        .compile()
      )

  @property
  def num_examples(self) -> int:
    return self.num_batches * self.global_batch

  def __call__(self, params: Any) -> dict[str, float]:
    """{'eval/loss': mean, 'eval/loss_t<t>': per-t means}, summed on the host in float64."""
    from imagen_jax.data import global_batch

    self.examples.set_state(self._start)
    sums = np.zeros(len(self.t_grid), np.float64)
    for b in range(self.num_batches):
      host = next(self.examples)
      first = b * self.global_batch + jax.process_index() * self.local_batch
      host["index"] = np.arange(first, first + self.local_batch, dtype=np.int32)
      batch = global_batch.to_global_batch({k: host[k] for k in self._fields}, self.mesh)
      sums += np.asarray(jax.device_get(self._step(params, batch)), np.float64).sum(axis=1)
    means = sums / self.num_examples
    return dict(zip(eval_metric_names(self.t_grid), [float(means.mean()), *map(float, means)]))


def open_validation(
  data_dir: str, split_exists: bool, make_iterator: Callable[..., Any], batch_size: int
) -> Any:
  """This process's validation iterator, or None (logged once) when the data has no split."""
  if not split_exists:
    log.info(
      "eval_every is set but %s has no validation split (precompute writes it with "
      "--split=train --split=validation): no eval loss",
      data_dir,
    )
    return None
  examples = make_iterator(split="validation", batch_size=batch_size, num_threads=2)
  if not examples.num_examples:
    log.info("the validation split of %s is empty: no eval loss", data_dir)
    return None
  return examples


def evaluate(
  evaluator: ValidationLoss,
  params: Any,
  step: int,
  writer: Any,
  metrics_log: Any,
  model_dir: str,
) -> None:
  """Runs the eval (every host: it is one program); host 0 logs, writes and redraws the plot."""
  t0 = time.time()
  scalars = evaluator(params)
  if writer is None:
    return
  writer.write(step, scalars)
  metrics_log.write(step, scalars)
  write_eval_plot(metrics_log.path, list(scalars), os.path.join(model_dir, EVAL_PLOT))
  log.info("eval step %d: eval/loss %.5f (%.1fs)", step, scalars["eval/loss"], time.time() - t0)


def has_validation_split(data_dir: str, tfds_name: str | None) -> bool:
  """Whether the precomputed manifest (or, on-the-fly, the TFDS dataset) has 'validation'."""
  import tensorflow as tf

  from imagen_jax.data import records, shards

  if tf.io.gfile.exists(os.path.join(data_dir, shards.MANIFEST)):
    return "validation" in shards.read_manifest(data_dir)["splits"]
  source = records.TfdsSource(records.find_tfds_dir(data_dir, tfds_name), "train")
  return "validation" in source.available_splits


def write_eval_plot(metrics_path: str, names: list[str], path: str) -> None:
  """MODEL_DIR/eval_loss.png: every eval record of metrics.jsonl, the mean thick."""
  import json

  import tensorflow as tf

  from imagen_jax.evaluation import curves

  with tf.io.gfile.GFile(metrics_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  records = [r for r in records if names[0] in r]
  series = {n: ([r["step"] for r in records], [r.get(n, np.nan) for r in records]) for n in names}
  images.save_png(curves.plot_series(series, "validation loss at fixed t (eval/*)"), path)

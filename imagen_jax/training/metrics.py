"""What a training run writes besides checkpoints: metrics.jsonl, TensorBoard, sample grids."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from imagen_jax import images
from imagen_jax.diffusion import samplers
from imagen_jax.stage import Stage

log = logging.getLogger(__name__)

# MODEL_DIR/METRICS_FILE: one JSON record per logged step (the demo's progress lines read it).
METRICS_FILE = "metrics.jsonl"


def operative_config() -> str:
  try:
    import gin

    return gin.config_str()
  except Exception:  # gin not configured (direct Python call)
    return ""


class JsonLines:
  """Appends {'step': N, ...} records to a JSON-lines file (created on first write)."""

  def __init__(self, path: str):
    self.path = path

  def drop_after(self, step: int) -> int:
    """Rewrites the file without records past `step` (and a line torn by a kill), atomically.

    Returns:
      The number of lines dropped.
    """
    import json

    import tensorflow as tf

    from imagen_jax.data import shards  # its temp-then-rename writer serves gs:// too

    if not tf.io.gfile.exists(self.path):
      return 0
    with tf.io.gfile.GFile(self.path) as f:
      lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # half a line: the writer was killed mid-write
      if line.endswith("\n") and record.get("step", 0) <= step:
        kept.append(line)
    if len(kept) == len(lines):
      return 0
    shards.atomic_write_text(self.path, "".join(kept))
    log.info(
      "%s: dropped %d records past step %d (redone now)", self.path, len(lines) - len(kept), step
    )
    return len(lines) - len(kept)

  def write(self, step: int, value: Any) -> None:
    import json

    import tensorflow as tf

    if isinstance(value, dict):
      record = {"step": step, **value}
    else:
      keys = (
        [] if value is None else [k.decode() if isinstance(k, bytes) else str(k) for k in value]
      )
      record = {"step": step, "keys": keys}
    tf.io.gfile.makedirs(os.path.dirname(self.path))
    with tf.io.gfile.GFile(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


class SummaryWriter:
  """TensorBoard scalars via tf.summary (works for local and gs:// dirs)."""

  def __init__(self, logdir: str):
    import tensorflow as tf

    self._tf = tf
    self._writer = tf.summary.create_file_writer(logdir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    with self._writer.as_default(step=step):
      for name, value in scalars.items():
        if value is not None and np.isfinite(value):
          self._tf.summary.scalar(name, value)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def fixed_sample_condition(host_batch: dict, n: int) -> dict:
  """The first n examples of the run's first global batch: fixed prompts for the sample grids.

  Those rows live on host 0; every host gets host 0's copy, since sampling is one program that
  all hosts run on the same inputs.
  """
  keys = ("text_emb", "text_mask", "lowres", "image")
  cond = {k: np.asarray(host_batch[k][:n]) for k in keys if k in host_batch}
  if jax.process_count() > 1:
    cond = jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(cond))
  return cond


def write_sample_grid(
  stage: Stage,
  ema_params: Any,
  cond: dict,
  step: int,
  model_dir: str,
  mesh: Mesh,
  sample_steps: int,
  guidance_weight: float,
) -> None:
  """Samples the fixed prompts with the EMA params and writes samples/step_N.png.

  Rows: (SR stages) the low-res input, then the sample, then the training image.
  """
  config = samplers.SamplerConfig(
    sampler="ddim", num_steps=sample_steps, guidance_weight=guidance_weight
  )
  with jax.set_mesh(mesh):
    out = stage.sample(
      ema_params,
      jnp.asarray(cond["text_emb"]),
      jnp.asarray(cond["text_mask"]),
      jax.random.PRNGKey(step),
      config,
      lowres=jnp.asarray(cond["lowres"]) if "lowres" in cond else None,
    )
  if jax.process_count() > 1:
    out = multihost_utils.process_allgather(out, tiled=True)
  if jax.process_index() != 0:
    return
  out = images.to_uint8(jax.device_get(out))
  res = out.shape[1]
  rows = []
  if "lowres" in cond:
    rows.append(np.stack([images.resize_nearest(x, res) for x in images.to_uint8(cond["lowres"])]))
  rows.append(out)
  if "image" in cond and cond["image"].shape[1] == res:
    rows.append(images.to_uint8(cond["image"]))
  grid = images.make_grid(np.concatenate(rows), columns=out.shape[0])
  images.save_png(grid, os.path.join(model_dir, "samples", f"step_{step:08d}.png"))

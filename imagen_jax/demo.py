"""`imagen-jax demo`: the whole system on a laptop, from nothing to a scored sample grid.

Steps (each reuses its output when rerun, so an interrupted demo continues):
  1. render the `shapes` dataset (64 px) and train a SentencePiece vocabulary on its captions;
  2. precompute caption embeddings with a tiny T5 encoder with RANDOM weights (no real T5
     weights can be downloaded offline; see the README for real checkpoints);
  3. train the three-stage cascade: base 16 px -> SR 16->32 (self + text attention) ->
     SR 32->64 (text cross-attention only, trained on random 32 px crops). The stages are
     independent (each SR stage trains on real low-res images), so they train as separate
     `imagen-jax train` processes, two at a time by default: on 2 CPU cores that took 6%
     less time than one after the other (README "The demo");
  4. sample fixed grammar prompts through the cascade -> OUT/samples.png + OUT/samples/*.png;
  5. score the samples with the shapes detector and print the metric table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

from imagen_jax.utils import cpu_malloc, job_pool

STAGE_GINS = (
  "configs/stages/demo_base16.gin",
  "configs/stages/demo_sr32.gin",
  "configs/stages/demo_sr64.gin",
)
MAX_LENGTH = 32
VOCAB_SIZE = 128


def _log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def demo_prompt_specs(n: int, seed: int) -> list:
  """The n shapes-grammar specs (seeded) behind `demo_prompts`: what each prompt should draw."""
  import numpy as np

  from imagen_jax.data import shapes

  rng = np.random.default_rng([seed, 7])
  return [shapes.sample_spec(rng) for _ in range(n)]


def demo_prompts(n: int, seed: int) -> list[str]:
  """n prompts drawn from the shapes grammar (seeded)."""
  from imagen_jax.data import shapes

  return [shapes.caption(spec) for spec in demo_prompt_specs(n, seed)]


def train_shapes_vocabulary(model_prefix: str, seed: int = 0) -> str:
  """A word-level SentencePiece model for the shapes grammar; returns the .model path."""
  import numpy as np

  from imagen_jax.data import shapes
  from imagen_jax.text import vocabulary

  rng = np.random.default_rng(seed)
  captions = [shapes.caption(shapes.sample_spec(rng)) for _ in range(2000)]
  # The grammar's few distinct captions alone train a near-character vocabulary (~40 tokens a
  # caption); its words as extra sentences give one piece per word (~12 tokens a caption).
  words = [w for c in captions for w in c.split()]
  return vocabulary.train_sentencepiece(captions + words, model_prefix, vocab_size=VOCAB_SIZE)


def precompute_shapes(
  work: str,
  *,
  num_examples: int,
  num_validation: int,
  resolution: int,
  max_length: int,
  examples_per_shard: int,
  batch_size: int,
  seed: int = 0,
) -> tuple[str, str]:
  """Word-level vocabulary + `shapes` encoded by a random tiny T5 into WORK/precomputed.

  Returns:
    (vocabulary path, precomputed data dir).
  """
  from imagen_jax.data import precompute

  vocab_prefix = os.path.join(work, "spm")
  vocab = vocab_prefix + ".model"
  if not os.path.isfile(vocab):
    vocab = train_shapes_vocabulary(vocab_prefix, seed)
  data = os.path.join(work, "precomputed")
  cfg = precompute.PrecomputeConfig(
    source="shapes",
    out=data,
    vocab=vocab,
    t5_checkpoint="random",
    t5_size="tiny",
    max_length=max_length,
    examples_per_shard=examples_per_shard,
    tfds_data_dir=os.path.join(work, "tfds"),
    num_examples=num_examples,
    num_validation=num_validation,
    resolution=resolution,
    seed=seed,
    batch_size=batch_size,
    progress=False,
  )
  precompute.run_precompute(cfg)
  return vocab, data


def build_data(work: str, num_examples: int, seed: int) -> tuple[str, str]:
  """The demo's vocabulary + precomputed 64 px shapes; returns (vocab path, data dir)."""
  return precompute_shapes(
    work,
    num_examples=num_examples,
    num_validation=64,
    resolution=64,
    max_length=MAX_LENGTH,
    examples_per_shard=1000,
    batch_size=128,
    seed=seed,
  )


def stage_train_job(
  stage_gin: str,
  model_dir: str,
  data: str,
  steps: int,
  batch_size: int,
  seed: int,
  extra_gin_files: Sequence[str] = (),
) -> job_pool.Job:
  """One stage's training as an `imagen-jax train` command (it resumes from MODEL_DIR's
  checkpoints) with glibc malloc set to keep XLA:CPU's step scratch memory (`cpu_malloc`); its
  output goes to MODEL_DIR/train.log."""
  bindings = {
    "MODEL_DIR": repr(model_dir),
    "DATA": repr(data),
    "train.train.num_train_steps": steps,
    "train.train.batch_size": batch_size,
    "train.train.checkpoint_every": max(steps // 2, 1),
    # 20 rows in metrics.jsonl: the demo's progress lines read them.
    "train.train.log_every": max(steps // 20, 1),
    "train.train.seed": seed,
  }
  gin_files = [stage_gin, "configs/mesh/cpu.gin", "configs/runs/tiny.gin", *extra_gin_files]
  argv = [sys.executable, "-m", "imagen_jax.cli", "train"]
  argv += [f"--gin_file={f}" for f in gin_files]
  argv += [f"--gin.{k}={v}" for k, v in bindings.items()]
  name = os.path.basename(model_dir)
  log_path = os.path.join(model_dir, "train.log")
  return job_pool.Job(name, argv, log_path, cpu_malloc.child_env(os.environ))


def trained_steps(model_dir: str) -> int:
  """The newest checkpointed step in MODEL_DIR (0 if none)."""
  from imagen_jax import checkpoints

  directory = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(directory):
    return 0
  ckpt = checkpoints.Checkpointer(directory)
  try:
    return ckpt.latest_step() or 0
  finally:
    ckpt.close()


def last_metrics(model_dir: str) -> dict:
  """The last row of MODEL_DIR/metrics.jsonl ({} before the first)."""
  from imagen_jax.training.metrics import METRICS_FILE

  line = job_pool.last_line(os.path.join(model_dir, METRICS_FILE))
  try:
    return json.loads(line) if line else {}
  except json.JSONDecodeError:  # a row being written
    return {}


class StageProgress:
  """`on_tick` of the stage jobs: a log line with each stage's step, rate and ETA, printed
  when a stage starts or ends and at most every `every_s` seconds in between."""

  def __init__(self, model_dirs: dict[str, str], steps: dict[str, int], every_s: float = 20.0):
    self.model_dirs, self.steps, self.every_s = model_dirs, steps, every_s
    self._last_print, self._last_state = 0.0, {}

  def __call__(self, state: dict[str, str]) -> None:
    now = time.time()
    if state == self._last_state and now - self._last_print < self.every_s:
      return
    self._last_state, self._last_print = state, now
    _log("    " + " | ".join(self._describe(name, s) for name, s in state.items()))

  def _describe(self, name: str, state: str) -> str:
    total = self.steps[name]
    if state != "running":
      return f"{name} {state}"
    row = last_metrics(self.model_dirs[name])
    step, rate = int(row.get("step", 0)), float(row.get("steps_per_sec", 0.0))
    if step < 1:
      return f"{name} starting"
    if step == 1 or rate <= 0:  # the first row's rate includes the compile
      return f"{name} {step}/{total}"
    eta = (total - step) / rate
    return f"{name} {step}/{total} ({rate:.1f} step/s, ETA {eta // 60:.0f}m{eta % 60:02.0f}s)"

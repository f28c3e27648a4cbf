"""Training input throughput: our loader vs a grain pipeline over the same precomputed shards.

  python benchmarks/input_pipeline.py [--stages=64,256,1024] [--examples=256] [--threads=4]
      [--workers=2] [--grain_path=DIR] [--out=benchmarks/results/input_pipeline.md]

Per stage, synthetic shards in the precompute format are written to a temporary directory:
JPEG images at the stage's source size (64 stage: 256 px sources resized to 64; 256 stage: 256
px sources + a 64 px low-res; 1024 stage: 1024 px sources, random 256 crops + a 64 px low-res,
the paper's SR-1024 training crop) and bf16 embeddings at T5-XXL width (4096) of 10..40 real
tokens, padded to 128. Both loaders do the same work per example (decode + centre crop + resize
+ crop + low-res + embedding re-pad + batch):

  ours   imagen_jax.data.input_pipeline.make_train_iterator (random access by our sidecar index,
         a PIL thread pool of --threads)
  grain  grain.DataLoader over a RandomAccessDataSource of the same records (IndexSampler with a
         global shuffle, --workers processes), the same per-example function

Each is warmed up (grain: one batch per worker + 1, so every worker has started), then timed over
--examples examples (whole batches; epochs repeat), --repeats times interleaved; the median
[min, max] examples/s per host is reported.
grain is not a dependency: install it anywhere and pass --grain_path (or put it on PYTHONPATH).
Nothing is asserted; the markdown table is written to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTH, LENGTH = 4096, 128
# stage -> (source px, resolution, low-res px or None, crop or None, examples, batch)
STAGES = {
  "64": (256, 64, None, None, 512, 32),
  "256": (256, 256, 64, None, 256, 32),
  "1024": (1024, 1024, 256, 256, 96, 8),
}


def _image(rng: np.random.Generator, size: int) -> bytes:
  """A smooth random JPEG (compresses like a photo, not like noise)."""
  from PIL import Image

  small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  im = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
  out = io.BytesIO()
  im.save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_shards(root: str, source_px: int, num: int, per_shard: int = 64) -> None:
  """Precompute-format shards + manifest of `num` synthetic examples."""
  from imagen_jax.data import shards

  rng = np.random.default_rng(0)
  names = []
  for s in range(0, num, per_shard):
    payloads, sizes = [], []
    for i in range(s, min(num, s + per_shard)):
      n = int(rng.integers(10, 41))
      tokens = rng.integers(3, 32000, n)
      emb = rng.standard_normal((n, WIDTH)).astype(np.float32)
      payloads.append(
        shards.make_record(
          f"{i:08d}", "a caption", _image(rng, source_px), source_px, source_px, tokens, emb
        )
      )
      sizes.append((source_px, source_px))
    name = shards.shard_name("train", len(names), -(-num // per_shard))
    shards.write_shard(os.path.join(root, name), payloads, sizes)
    names.append(name)
  manifest = {
    "format": shards.FORMAT,
    "encoder": {"size": "xxl"},
    "max_length": LENGTH,
    "embedding_width": WIDTH,
    "splits": {"train": {"shards": names, "num_records": num}},
  }
  with open(os.path.join(root, shards.MANIFEST), "w") as f:
    json.dump(manifest, f)


class _Source:
  """grain RandomAccessDataSource over precompute shards (picklable: readers open lazily)."""

  def __init__(self, root: str):
    from imagen_jax.data import shards

    manifest = shards.read_manifest(root)
    self.items = []
    for name in manifest["splits"]["train"]["shards"]:
      path = os.path.join(root, name)
      self.items += [(path, o) for o in shards.read_shard_meta(path)["offsets"]]
    self._readers = None

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, index: int) -> bytes:
    from imagen_jax.data import records

    if self._readers is None:
      self._readers = records.RandomReaders()
    path, offset = self.items[index]
    return self._readers.read(path, offset)

  def __getstate__(self):
    return {"items": self.items, "_readers": None}


def _grain_transform(grain, resolution: int, lowres: int | None, crop: int | None):
  class Prepare(grain.RandomMapTransform):
    """Decode the record and image, crop / resize / low-res, re-pad the embedding."""

    def random_map(self, payload: bytes, rng: np.random.Generator):
      import ml_dtypes

      from imagen_jax.data import input_pipeline, shards

      ex = shards.decode_record(payload, WIDTH)
      image, low = input_pipeline.process_image(ex["image"], resolution, lowres, crop, rng)
      emb = np.zeros((LENGTH, WIDTH), ml_dtypes.bfloat16)
      emb[: len(ex["tokens"])] = ex["embedding"]
      out = {"image": image, "text_emb": emb, "text_mask": np.arange(LENGTH) < len(ex["tokens"])}
      if low is not None:
        out["lowres"] = low
      return out

  return Prepare()


def _examples_per_s(it, warmup: int, examples: int, batch: int) -> float:
  """Examples/s of `it` over whole batches covering `examples`, after `warmup` batches."""
  for _ in range(warmup):
    next(it)
  batches = -(-examples // batch)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t0)


def time_ours(root: str, stage: tuple, examples: int, threads: int) -> float:
  import ml_dtypes

  from imagen_jax.data import input_pipeline

  _, res, low, crop, _, batch = stage
  it = input_pipeline.make_train_iterator(
    root,
    batch_size=batch,
    resolution=res,
    lowres_resolution=low,
    crop_size=crop,
    max_length=LENGTH,
    process_index=0,
    process_count=1,
    num_threads=threads,
    emb_dtype=ml_dtypes.bfloat16,
  )
  rate = _examples_per_s(it, 1, examples, batch)
  it.close()
  return rate


def time_grain(root: str, stage: tuple, examples: int, workers: int, threads: int) -> float:
  import grain.python as grain

  _, res, low, crop, _, batch = stage
  source = _Source(root)
  loader = grain.DataLoader(
    data_source=source,
    sampler=grain.IndexSampler(
      num_records=len(source),
      shard_options=grain.NoSharding(),
      shuffle=True,
      num_epochs=None,
      seed=0,
    ),
    operations=[_grain_transform(grain, res, low, crop), grain.Batch(batch, drop_remainder=True)],
    worker_count=workers,
    read_options=grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch),
  )
  # One batch per worker + 1, so every worker has started before the clock does.
  return _examples_per_s(iter(loader), workers + 1, examples, batch)


def needed_per_host() -> dict[str, str]:
  """Examples/s one v4 host (4 chips) consumes at `imagen-jax compile`'s estimated step time."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tpu_aot.json")
  out = {}
  try:
    with open(path) as f:
      rows = json.load(f)
  except (OSError, ValueError):
    return out
  for row in rows:
    rep = row.get("report", {})
    step = rep.get("roofline_s")
    if not step or not rep.get("global_batch") or not rep.get("chips"):
      continue
    per_chip = rep["global_batch"] / rep["chips"] / step
    stage = {"sr256": "256", "sr1024": "1024", "base64": "64"}.get(row.get("stage"), "")
    fits = "" if rep.get("fits", True) else ", a compile that does not fit HBM"
    out[stage] = f"{4 * per_chip:.0f} ({row['preset']}, {step:.3f} s/step, 4 chips/host{fits})"
  return out


def _fmt(values: list[float]) -> str:
  """Median [min, max]."""
  return f"{np.median(values):.1f} [{min(values):.0f}, {max(values):.0f}]"


def _decision(rows: list) -> list[str]:
  """The choice the figures support, and why."""
  med = np.median
  faster = [n for n, _, o, g, h, _ in rows if max(med(g), med(h)) > 1.1 * med(o)]
  ratio = ", ".join(f"{n}: {max(med(g), med(h)) / med(o):.2f}x" for n, _, o, g, h, _ in rows)
  verdict = (
    f"grain is more than 10% faster at stage(s) {', '.join(faster)}"
    if faster
    else "grain is not more than 10% faster at any stage"
  )
  return [
    f"Best grain / ours: {ratio}. Decision: keep our loader; {verdict} on this machine. "
    "Both spend their time in the same PIL decode and resize (the per-example function is "
    "shared), so their speed follows the cores they get: ours scales with its thread pool "
    "(PIL releases the GIL while decoding), grain with worker processes. What decides is the "
    "guarantees the tests prove of ours: exact resume from (epoch, position), the same global "
    "batches for any process count, corrupt records skipped and counted against a tolerance "
    "with a one-line repair command, elastic resume on a slice of another size, all over "
    "TFRecord shards any tool reads. A grain pipeline would have to rebuild the corrupt-record "
    "replacement and the process-count-independent order on top of its sampler, and grain is "
    "not a dependency today. Revisit if a host cannot feed its chips: the needed column is "
    "the rate at `imagen-jax compile`'s estimated step time (a lower bound on the step, so an "
    "upper bound on the need), and a TPU v4 host has 240 vCPUs, not this machine's 2 shared ones.",
  ]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--stages", default="64,256,1024")
  p.add_argument("--examples", type=int, default=256, help="timed examples per loader and stage")
  p.add_argument("--repeats", type=int, default=3, help="interleaved runs (median [min, max])")
  p.add_argument("--threads", type=int, default=4)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--grain_path", default=None)
  p.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results", "input_pipeline.md")
  )
  args = p.parse_args(argv)
  if args.grain_path:
    sys.path.insert(0, args.grain_path)
  import grain  # noqa: F401  (fail early, before any shard is written)
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain reads absl flags (defaults are fine)

  need = needed_per_host()
  rows = []
  load0 = os.getloadavg()[0]
  for name in args.stages.split(","):
    stage = STAGES[name]
    with tempfile.TemporaryDirectory() as root:
      write_shards(root, stage[0], stage[4])
      runs = {"ours": [], "grain_mp": [], "grain_threads": []}
      # Interleaved repeats: a shared CPU's load drifts, and each loader sees the same drift.
      for _ in range(args.repeats):
        runs["ours"].append(time_ours(root, stage, args.examples, args.threads))
        runs["grain_mp"].append(time_grain(root, stage, args.examples, args.workers, 1))
        runs["grain_threads"].append(time_grain(root, stage, args.examples, 0, args.threads))
    ours, grain_mp, grain_threads = (runs[k] for k in ("ours", "grain_mp", "grain_threads"))
    rows.append((name, stage, ours, grain_mp, grain_threads, need.get(name, "n/a")))
    print(
      f"stage {name}: ours {_fmt(ours)}, grain workers={args.workers} {_fmt(grain_mp)}, "
      f"grain threads={args.threads} {_fmt(grain_threads)} examples/s",
      flush=True,
    )
  load1 = os.getloadavg()[0]
  lines = [
    "# Training input: examples/s per host, ours vs grain",
    "",
    f"`python benchmarks/input_pipeline.py` on {platform.node()} ({os.cpu_count()} CPUs, load "
    f"{load0:.1f} -> {load1:.1f}: a shared CPU makes every figure pessimistic), "
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Same shards, same per-example work "
    "(decode, crop, resize, low-res, bf16 T5-XXL embeddings re-padded to 128, batch); after a "
    f"warm-up, {args.examples} examples timed per loader, {args.repeats} interleaved repeats: "
    "median [min, max] examples/s.",
    "",
    f"| stage | source px | batch | ours ({args.threads} threads) | grain DataLoader "
    f"({args.workers} workers) | grain ({args.threads} threads, 0 workers) | needed per v4 host |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for name, stage, ours, gmp, gth, needed in rows:
    lines.append(
      f"| {name} | {stage[0]} | {stage[5]} | {_fmt(ours)} | {_fmt(gmp)} | {_fmt(gth)} | {needed} |"
    )
  lines += ["", *_decision(rows)]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Frozen T5 encoder throughput: captions/s for one size at a fixed batch and token length.

  python benchmarks/t5_encode.py [--size=base] [--batch=64] [--length=128] \
      [--dtypes=float32,bfloat16] [--iters=3]

Random weights (throughput does not depend on them), a throwaway SentencePiece vocabulary, all
local devices data-parallel. Each dtype is compiled once ahead of time (FLOPs from XLA's
cost_analysis), warmed up, then timed over `--iters` batches of full-length token ids. Prints a
table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(
  size: str = "base",
  batch: int = 64,
  length: int = 128,
  dtypes: str = "float32,bfloat16",
  iters: int = 3,
) -> list[dict]:
  """Compiles and times the encoder once per dtype.

  Args:
    size: T5 v1.1 size name ('small', 'base', ...).
    batch: captions per encoder call.
    length: token length of each caption.
    dtypes: comma-separated compute dtypes.
    iters: timed calls after one warm-up call (the median is reported, with min/max).

  Returns:
    One dict per dtype: dtype, compile_s, batch_s (median), batch_s_min, batch_s_max,
    captions_per_s, tflops_per_s (0 when XLA gives no FLOP count).
  """
  import jax
  import numpy as np

  from imagen_jax.text import encoder, vocabulary

  if batch < 1 or length < 2 or iters < 1:
    raise ValueError(f"batch={batch}, length={length}, iters={iters}: need >= 1, >= 2, >= 1")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    spm = vocabulary.train_sentencepiece(
      ["a photo of a cat", "an astronaut riding a horse"], os.path.join(tmp, "v"), 64
    )
    for dtype in dtypes.split(","):
      enc = encoder.load_text_encoder(None, spm, size=size, max_length=length, dtype=dtype)
      rng = np.random.default_rng(0)
      tokens = rng.integers(3, enc.config.vocab_size, (batch, length)).astype(np.int32)
      tokens[:, -1] = 1
      t0 = time.perf_counter()
      with jax.set_mesh(enc.mesh):
        compiled = enc._forward.lower(enc.params, tokens).compile()
      compile_s = time.perf_counter() - t0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      flops = float((cost or {}).get("flops", 0.0))
      jax.block_until_ready(enc.encode_tokens(tokens))  # warm-up
      times = []
      for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(enc.encode_tokens(tokens))
        times.append(time.perf_counter() - t0)
      step = float(np.median(times))
      rows.append(
        {
          "size": size,
          "dtype": dtype,
          "batch": batch,
          "length": length,
          "compile_s": compile_s,
          "batch_s": step,
          "batch_s_min": min(times),
          "batch_s_max": max(times),
          "captions_per_s": batch / step,
          "tflops_per_s": flops / step / 1e12 if flops else 0.0,
        }
      )
      del enc
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="base")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()

  import jax

  rows = measure(args.size, args.batch, args.length, args.dtypes, args.iters)
  devices = jax.devices()
  print(
    f"\nT5 v1.1 '{args.size}' encoder, batch {args.batch} x {args.length} tokens, "
    f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
    f"median of {args.iters}"
  )
  print(f"{'dtype':<10} {'compile s':>10} {'batch s':>10} {'captions/s':>11} {'TFLOP/s':>9}")
  for r in rows:
    print(
      f"{r['dtype']:<10} {r['compile_s']:>10.2f} {r['batch_s']:>10.3f} "
      f"{r['captions_per_s']:>11.1f} {r['tflops_per_s']:>9.3f}"
    )


if __name__ == "__main__":
  main()

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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="base")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()

  import jax
  import numpy as np

  from imagen_jax.text import encoder, vocabulary

  with tempfile.TemporaryDirectory() as tmp:
    spm = vocabulary.train_sentencepiece(
      ["a photo of a cat", "an astronaut riding a horse"], os.path.join(tmp, "v"), 64
    )
    rows = []
    for dtype in args.dtypes.split(","):
      enc = encoder.load_text_encoder(
        None, spm, size=args.size, max_length=args.length, dtype=dtype
      )
      rng = np.random.default_rng(0)
      tokens = rng.integers(3, enc.config.vocab_size, (args.batch, args.length)).astype(np.int32)
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
      for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(enc.encode_tokens(tokens))
        times.append(time.perf_counter() - t0)
      step = float(np.median(times))
      rows.append((dtype, compile_s, step, args.batch / step, flops / step / 1e12 if flops else 0))
      del enc

  devices = jax.devices()
  print(
    f"\nT5 v1.1 '{args.size}' encoder, batch {args.batch} x {args.length} tokens, "
    f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
    f"median of {args.iters}"
  )
  print(f"{'dtype':<10} {'compile s':>10} {'batch s':>10} {'captions/s':>11} {'TFLOP/s':>9}")
  for dtype, compile_s, step, cps, tflops in rows:
    print(f"{dtype:<10} {compile_s:>10.2f} {step:>10.3f} {cps:>11.1f} {tflops:>9.3f}")


if __name__ == "__main__":
  main()

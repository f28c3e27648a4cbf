"""`imagen-jax encode`: captions -> T5 embeddings in an .npz file.

  imagen-jax encode --t5_checkpoint=PATH --vocab=SPM_MODEL --text="a cat" [--text=...] \
      --out=FILE.npz [--max_length=N] [--t5_size=base] [--gin_file=configs/models/t5_xxl.gin]

The checkpoint format (T5X legacy/orbax, Hugging Face safetensors) is detected from the files;
`--t5_checkpoint=random` uses random weights (demos only). Writes `embeddings` [B, L, D] float32
(bf16 results are widened: npz has no bfloat16), `mask` [B, L] bool and `tokens` [B, L] int32.
Explicit flags override gin bindings of `encoder.load_text_encoder`, which override its defaults.
"""

from __future__ import annotations

import argparse
import logging
import os

from imagen_jax import errors, gin_utils


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the encode flags."""
  parser.add_argument(
    "--t5_checkpoint",
    required=True,
    help="T5 v1.1 checkpoint: T5X dir (legacy or orbax), HF safetensors file/dir/index json, "
    "or 'random' for random weights (meaningless embeddings, demos only)",
  )
  parser.add_argument("--vocab", required=True, help="SentencePiece .model (pad=0, eos=1, unk=2)")
  parser.add_argument(
    "--text", action="append", default=[], help="caption to encode (repeatable; '' = EOS only)"
  )
  parser.add_argument("--out", required=True, help="output .npz path")
  parser.add_argument("--max_length", type=int, default=None, help="token length (default 128)")
  parser.add_argument(
    "--t5_size",
    default=None,
    help="tiny|small|base|large|xl|xxl (default base, or the gin file's)",
  )
  # The spelling of precompute, sample and export is --t5_size; --size still works.
  parser.add_argument("--size", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32")
  parser.add_argument("--seed", type=int, default=None, help="weight seed for 'random'")
  gin_utils.add_gin_arguments(parser)


def _check_inputs(args: argparse.Namespace) -> None:
  """Flag checks that run before the encoder loads."""
  if not args.text:
    raise errors.UserError("give at least one --text=CAPTION")
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):
    raise errors.UserError(f"--out={args.out!r}: directory {out_dir!r} does not exist")
  errors.check_writable_dir(out_dir, "--out's directory")
  # Remote paths (gs://) are checked by their readers.
  checkpoint = args.t5_checkpoint
  if checkpoint != "random" and "://" not in checkpoint and not os.path.exists(checkpoint):
    raise errors.UserError(
      f"--t5_checkpoint={checkpoint!r} does not exist (or pass 'random' for random weights)"
    )
  if "://" not in args.vocab and not os.path.isfile(args.vocab):
    raise errors.UserError(f"--vocab={args.vocab!r} is not a file (a SentencePiece .model)")


def run(args: argparse.Namespace) -> int:
  """Encodes `--text` captions and writes the .npz; returns the exit code."""
  _check_inputs(args)
  if args.size is not None:
    logging.warning("encode: --size is deprecated; spell it --t5_size=%s", args.size)
    args.t5_size = args.t5_size or args.size

  import numpy as np

  from imagen_jax.text import encoder

  gin_utils.parse_gin(args.gin_file, getattr(args, "gin_bindings", []))
  overrides = {
    k: v
    for k, v in dict(
      size=args.t5_size, max_length=args.max_length, dtype=args.dtype, seed=args.seed
    ).items()
    if v is not None
  }
  checkpoint = None if args.t5_checkpoint == "random" else args.t5_checkpoint
  load = gin_utils.configured(encoder.load_text_encoder)
  text_encoder = load(checkpoint, args.vocab, **overrides)
  tokens = text_encoder.tokenize(args.text)
  embeddings, mask = text_encoder.encode_tokens(tokens)
  np.savez(
    args.out,
    embeddings=np.asarray(embeddings, np.float32),
    mask=np.asarray(mask, bool),
    tokens=tokens.astype(np.int32),
  )
  identity = text_encoder.identity()
  print(
    f"wrote {args.out}: {len(args.text)} caption(s), embeddings {tuple(embeddings.shape)} "
    f"({identity['dtype']}, T5 {identity['size']}, {identity['checkpoint_format']})"
  )
  return 0

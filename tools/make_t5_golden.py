"""Regenerates the T5 parity golden files in tests/golden/ with Hugging Face's PyTorch T5.

Needs torch, transformers, safetensors and numpy, which the project venv does not carry (the
test that reads the golden files needs none of them). Run it from a throwaway venv, e.g.

  python3.11 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/torchenv/bin/python tools/make_t5_golden.py

It writes
  tests/golden/t5_tiny_hf/{config.json, model.safetensors}: a random tiny T5 v1.1 encoder
    (HF's own init; layer-norm weights perturbed away from 1 so a mis-mapped norm shows);
  tests/golden/t5_tiny_parity.npz: `tokens` [B, L] int32 (tokens + EOS, 0-padded, one EOS-only
    row), `last_hidden_state` [B, L, D] float32 from T5EncoderModel with attention_mask =
    tokens > 0, and the library versions used.
"""

import argparse
import os

import numpy as np
import torch
import transformers
from transformers import T5Config, T5EncoderModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Must match imagen_jax.nn.t5.SIZES['tiny'].
TINY = dict(vocab_size=256, d_model=64, num_heads=2, d_kv=32, d_ff=128, num_layers=2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.path.join(REPO, "tests", "golden"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  torch.manual_seed(args.seed)
  config = T5Config(
    **TINY,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
    pad_token_id=0,
    eos_token_id=1,
  )
  model = T5EncoderModel(config).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  ckpt_dir = os.path.join(args.out_dir, "t5_tiny_hf")
  model.save_pretrained(ckpt_dir, safe_serialization=True)

  # Lengths cover the EOS-only (unconditional) row, a full row, and relative distances past
  # the exact buckets (>= 8) and across a bucket edge (16).
  rng = np.random.default_rng(args.seed)
  length = 32
  n_tokens = [0, 5, 20, 31]
  tokens = np.zeros((len(n_tokens), length), np.int32)
  for row, n in enumerate(n_tokens):
    tokens[row, :n] = rng.integers(3, TINY["vocab_size"], size=n)
    tokens[row, n] = 1  # EOS
  with torch.no_grad():
    ids = torch.from_numpy(tokens.astype(np.int64))
    out = model(input_ids=ids, attention_mask=(ids > 0).long()).last_hidden_state
  np.savez(
    os.path.join(args.out_dir, "t5_tiny_parity.npz"),
    tokens=tokens,
    last_hidden_state=out.numpy().astype(np.float32),
    versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"),
  )
  print(f"wrote {ckpt_dir} and t5_tiny_parity.npz ({out.shape})")


if __name__ == "__main__":
  main()

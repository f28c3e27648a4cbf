"""Regenerates tests/golden/clip_tiny/: a tiny random CLIPModel and HF's outputs on it.

Needs torch, transformers (5.x; its CLIPTokenizer is the `tokenizers` BPE), safetensors and
pillow, which the project venv does not carry (the test reads only the written files):

  /tmp/torchvenv/bin/pip install torch transformers safetensors pillow
  /tmp/torchvenv/bin/python tools/make_clip_golden.py

It writes, in HF's folder layout (what `imagen-jax eval clip --clip=DIR` reads):
  config.json, model.safetensors   `CLIPModel.save_pretrained` of a seeded random model: text
                                   hidden 32 / vision hidden 32, 2 layers, 4 heads, patch 8,
                                   image 32, projection 16; the text tower uses exact gelu and
                                   the vision tower quick_gelu, so a tower mix-up shows;
  vocab.json, merges.txt           a byte-level BPE vocabulary: CLIP's layout (256 bytes, the
                                   same with </w>, merges, the two special tokens) with merges
                                   counted greedily on a few sentences (no training library);
  golden.npz                       uint8 `image_<i>` of three sizes, HF CLIPImageProcessor's
                                   `pixels` (PIL path) and `pixels_torchvision`, `image_embeds`
                                   (get_image_features, unnormalised), `prompts`' `input_ids`
                                   (HF's tokenizer, max_length 77, padded) and `text_embeds`,
                                   and `tokens` (JSON: text -> HF's ids, no padding).
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "golden", "clip_tiny")
SEED = 0
NUM_MERGES = 150
CORPUS = (
  "a photo of a cat sitting on the red sofa . a painting of two dogs playing in the snow , "
  "an astronaut riding a horse on the moon ! the quick brown fox jumps over the lazy dog 's "
  "tail . it's a small blue square above a large green circle 1234 times"
)
PROMPTS = (
  "a photo of a cat",
  "A Painting of TWO dogs playing in the snow!!",
  "an astronaut riding a horse on the moon, " * 12,  # > 77 tokens: truncated, end kept
)
TOKEN_CASES = (
  "a photo of a cat",
  "Hello, World!",
  "it's   a\tdog's   life\n\nisn't it",
  "they're we've I'm you'll he'd",
  "1234 apples + 56.7% = ?",
  "UPPER lower MiXeD",
  "naïve café — résumé",
  "日本語のテキスト",
  "emoji 🐱🐶 and ½ ² Ⅻ",
  "...!!!???",
  "  leading and trailing  ",
  "<|endoftext|> inside",
  "",
  "ΣΑΣ İstanbul ǅ ß",  # HF lowercases per character: no final sigma
  "\x1ca\x1c",  # not White_Space: kept (str.strip would drop them)
  "a\u00a0b\u3000c\x85d\u2028e",  # White_Space beyond ASCII
  "a\u200bb \ufeffc",  # zero-width characters are not spaces
)
IMAGE_SIZES = ((32, 32), (48, 40), (20, 28))  # (H, W): as is, shrink + crop, enlarge + crop


def byte_alphabet() -> list[str]:
  """The 256 printable stand-ins for bytes, from HF's own ByteLevel pre-tokenizer."""
  from tokenizers import pre_tokenizers

  return sorted(pre_tokenizers.ByteLevel.alphabet())


def _byte_word(word: str, table: dict[int, str]) -> list[str]:
  chars = [table[b] for b in word.encode("utf-8")]
  return [*chars[:-1], chars[-1] + "</w>"]


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """CLIP's vocabulary layout with NUM_MERGES greedy merges counted on CORPUS."""
  import re

  alphabet = byte_alphabet()
  words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", CORPUS.lower()))
  table = _table_from_alphabet(alphabet)
  split = {w: _byte_word(w, table) for w in words}
  merges: list[tuple[str, str]] = []
  for _ in range(NUM_MERGES):
    pairs: collections.Counter = collections.Counter()
    for w, n in words.items():
      parts = split[w]
      for a, b in zip(parts, parts[1:], strict=False):
        pairs[a, b] += n
    if not pairs:
      break
    best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
    merges.append(best)
    for w, parts in split.items():
      out, i = [], 0
      while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          out.append(parts[i] + parts[i + 1])
          i += 2
        else:
          out.append(parts[i])
          i += 1
      split[w] = out
  tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m) for m in merges)]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
  return vocab, merges


def _table_from_alphabet(alphabet: list[str]) -> dict[int, str]:
  # GPT-2's rule: printable Latin-1 bytes map to themselves, the rest to 256 + k in byte order;
  # checked against HF's alphabet (same set of 256 characters).
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  table = {b: chr(b) for b in keep}
  k = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + k)
      k += 1
  assert sorted(table.values()) == alphabet, "byte table differs from HF's ByteLevel alphabet"
  return table


def random_model(vocab_size: int, eos_token_id: int):
  import torch
  from transformers import CLIPConfig, CLIPModel

  config = CLIPConfig(
    text_config=dict(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
      bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    ),
    vision_config=dict(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=32, patch_size=8, hidden_act="quick_gelu",
    ),
    projection_dim=16,
  )  # fmt: skip
  torch.manual_seed(SEED)
  model = CLIPModel(config).eval()
  # HF's init (std 0.02) leaves near-constant features; O(1) weights exercise every path.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      elif name == "logit_scale":
        continue
      elif p.ndim >= 2 and "embedding" not in name:
        p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(0.5 * torch.randn_like(p))
  return model


def main() -> None:
  import torch
  import transformers
  from PIL import Image
  from transformers import CLIPImageProcessor, CLIPTokenizer
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  os.makedirs(OUT, exist_ok=True)
  vocab, merges = build_vocab()
  with open(os.path.join(OUT, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(OUT, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  tokenizer = CLIPTokenizer.from_pretrained(OUT)
  eos = vocab["<|endoftext|>"]
  assert tokenizer.eos_token_id == eos and tokenizer.pad_token_id == eos

  model = random_model(len(vocab), eos)
  model.save_pretrained(OUT, safe_serialization=True)
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(OUT, extra)):
      os.remove(os.path.join(OUT, extra))

  rng = np.random.default_rng(SEED)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]
  pil = [Image.fromarray(im) for im in images]
  kw = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  pixels = CLIPImageProcessorPil(**kw)(images=pil, return_tensors="pt")["pixel_values"]
  pixels_tv = CLIPImageProcessor(**kw)(images=pil, return_tensors="pt")["pixel_values"]
  batch = tokenizer(
    list(PROMPTS), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
  )
  with torch.no_grad():
    image_embeds = model.get_image_features(pixel_values=pixels).pooler_output
    text_embeds = model.get_text_features(
      input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).pooler_output
  tokens = {t: tokenizer(t)["input_ids"] for t in TOKEN_CASES}
  arrays = {f"image_{i}": im for i, im in enumerate(images)}
  np.savez(
    os.path.join(OUT, "golden.npz"),
    **arrays,
    pixels=pixels.numpy().transpose(0, 2, 3, 1),  # NCHW -> NHWC
    pixels_torchvision=pixels_tv.numpy().transpose(0, 2, 3, 1),
    image_embeds=image_embeds.numpy(),
    prompts=np.array(PROMPTS),
    input_ids=batch["input_ids"].numpy().astype(np.int32),
    text_embeds=text_embeds.numpy(),
    tokens=np.array(json.dumps(tokens, ensure_ascii=False)),
    versions=np.array(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__})),
  )  # fmt: skip
  total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
  print(f"wrote {OUT}: {sorted(os.listdir(OUT))}, {total / 1024:.0f} KiB, vocab {len(vocab)}")


if __name__ == "__main__":
  main()

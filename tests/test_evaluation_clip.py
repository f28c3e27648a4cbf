"""CLIP score: the Flax CLIP towers and tokenizer against Hugging Face transformers on a tiny
random model, the weight reader, the score's closed forms, and `imagen-jax eval clip`.

tests/golden/clip_tiny/ is a HF CLIP folder written by tools/make_clip_golden.py (transformers
5.x `CLIPModel.save_pretrained` of seeded random weights, a 620-token byte-level BPE
vocabulary) plus golden.npz with HF's pixels, token ids and embeddings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from imagen_jax import cli, errors
from imagen_jax.evaluation import clip, clip_model, clip_tokenizer
from tests import cli_helpers

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "clip_tiny")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
  with np.load(os.path.join(TINY, "golden.npz")) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def tokenizer() -> clip_tokenizer.CLIPTokenizer:
  return clip_tokenizer.CLIPTokenizer.from_directory(TINY)


@pytest.fixture(scope="module")
def loaded() -> tuple[clip_model.CLIP, dict]:
  return clip_model.load(TINY)


# ---- the tokenizer ----


def test_tokenizer_matches_hf(golden, tokenizer):
  cases = json.loads(str(golden["tokens"]))
  assert len(cases) >= 10
  for text, want in cases.items():
    assert [tokenizer.start_id, *tokenizer.encode(text), tokenizer.end_id] == want, text
  # Framed, padded with the end token, the > 77-token prompt truncated keeping the end token.
  ids = tokenizer([str(p) for p in golden["prompts"]])
  np.testing.assert_array_equal(ids, golden["input_ids"])
  assert ids.shape == (3, 77) and ids[2, -1] == tokenizer.end_id and ids[2, -2] != tokenizer.end_id


@pytest.mark.parametrize(
  "text, pieces",
  [
    ("Hello,  World!", ["hello", ",", "world", "!"]),
    ("it's a\tdog's\n\nlife", ["it", "'s", "a", "dog", "'s", "life"]),
    ("they're I'M you'll", ["they", "'re", "i", "'m", "you", "'ll"]),
    ("''s", ["''", "s"]),  # no contraction at the first quote: a punctuation run
    ("1234 apples", ["1", "2", "3", "4", "apples"]),  # digits one by one
    ("56.7% = ?", ["5", "6", ".", "7", "%", "=", "?"]),
    ("...!!!???", ["...!!!???"]),
    ("½ ² Ⅻ", ["½", "²", "ⅻ"]),  # numbers of categories No/Nl stand alone, as \p{N}
    ("nai\u0308ve CAFÉ", ["naïve", "café"]),  # NFC composes the diaeresis
    ("q\u0301", ["q", "\u0301"]),  # a mark with no precomposed form is not a letter
    ("日本語のテキスト", ["日本語のテキスト"]),
    ("a<|endoftext|>b", ["a", "<|endoftext|>", "b"]),
  ],
)
def test_pre_tokenizer_pieces(text, pieces):
  assert clip_tokenizer.split_pattern().findall(clip_tokenizer.normalize(text)) == pieces


def test_byte_table_and_bpe(tokenizer):
  table = clip_tokenizer.bytes_to_unicode()
  assert len(set(table.values())) == 256
  assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[0] == "Ā"
  inverse = {i: t for t, i in tokenizer.vocab.items()}
  words = [inverse[i] for i in tokenizer.encode("A photo of a CAT")]
  assert words == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]  # all in the corpus
  # An unseen word falls back to merged pieces, its last one marked end-of-word.
  pieces = [inverse[i] for i in tokenizer.encode("zebra")]
  assert "".join(pieces) == "zebra</w>" and pieces[-1].endswith("</w>") and len(pieces) > 1


# ---- the networks ----


def test_parameter_names_are_hf_clipmodels(loaded):
  from imagen_jax.text import t5_checkpoints

  model, _ = loaded
  stored = set(t5_checkpoints._safetensors_index(os.path.join(TINY, "model.safetensors")))
  ours = {clip_model.hf_name(k) for k in clip_model.param_shapes(model.config)}
  assert ours == stored - set(clip_model.UNUSED)


# (text hidden/mlp/layers/heads, vision hidden/mlp/layers/heads, patch, image, projection) of
# OpenAI's released sizes, and HF CLIPModel's parameter count for each (logit_scale excluded).
SIZES = {
  "ViT-B/32": ((512, 2048, 12, 8), (768, 3072, 12, 12), 32, 224, 512, 151_277_312),
  "ViT-B/16": ((512, 2048, 12, 8), (768, 3072, 12, 12), 16, 224, 512, 149_620_736),
  "ViT-L/14": ((768, 3072, 12, 12), (1024, 4096, 24, 16), 14, 224, 768, 427_616_512),
  "ViT-L/14-336": ((768, 3072, 12, 12), (1024, 4096, 24, 16), 14, 336, 768, 427_944_192),
}


@pytest.mark.parametrize("size", SIZES)
def test_released_sizes_have_hfs_parameter_count(size):
  text, vision, patch, image, projection, count = SIZES[size]

  def tower(dims):
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return dict(zip(keys, dims, strict=True))

  config = clip_model.CLIPConfig.from_hf({
    "projection_dim": projection,
    "text_config": dict(tower(text), eos_token_id=2),  # as OpenAI's configs on the Hub say
    "vision_config": dict(tower(vision), patch_size=patch, image_size=image),
  })  # fmt: skip
  shapes = clip_model.param_shapes(config)
  assert sum(int(np.prod(s)) for s in shapes.values()) == count
  assert (
    shapes["vision_model/embeddings/position_embedding/embedding"][0] == (image // patch) ** 2 + 1
  )


def test_embeddings_match_hf(golden, loaded):
  """Projected image and text embeddings vs HF CLIPModel.get_*_features on random weights.

  Tolerance: float32 on both sides through 2 blocks per tower with different summation orders
  (and erf vs torch's gelu); measured max |diff| is 6e-7 on embeddings up to ~2.5, so atol 1e-5
  leaves a 15x margin, while a wrong activation, eps, scale or pooled token is off by > 1e-2.
  """
  model, variables = loaded
  image = np.asarray(model.apply(variables, golden["pixels"], method="encode_image"))
  text = np.asarray(model.apply(variables, golden["input_ids"], method="encode_text"))
  np.testing.assert_allclose(image, golden["image_embeds"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(text, golden["text_embeds"], rtol=0, atol=1e-5)
  # Configs written before transformers 4.31 say eos_token_id 2: HF then pools at the highest
  # id, which is the end token for CLIP's vocabulary: the same features.
  legacy = clip_model.CLIP(dataclasses.replace(model.config, eos_token_id=2))
  again = np.asarray(legacy.apply(variables, golden["input_ids"], method="encode_text"))
  np.testing.assert_allclose(again, text, rtol=0, atol=1e-6)


def test_scorer_one_device_equals_eight(tmp_path, golden, loaded, tokenizer):
  import jax

  model, variables = loaded
  images = [golden[f"image_{i}"] for i in range(3)]
  prompts = [str(p) for p in golden["prompts"]]
  assert len(jax.local_devices()) == 8  # tests/conftest.py
  one = clip.Scorer(model, variables, tokenizer, batch_size=3, devices=jax.local_devices()[:1])
  eight = clip.Scorer(model, variables, tokenizer, batch_size=3)
  assert one.batch_size == 3 and eight.batch_size == 8  # rounded up to the device count
  want = clip.cosine(golden["image_embeds"], golden["text_embeds"])
  np.testing.assert_allclose(one(images, prompts), want, rtol=0, atol=1e-5)
  np.testing.assert_allclose(eight(images, prompts), one(images, prompts), rtol=0, atol=1e-6)
  # Files in batches of 3: a full batch and a padded one.
  src = str(tmp_path / "samples")
  _sample_dir(src, golden)
  pairs = clip.indexed_prompts(src)
  got = clip.cosine_pairs(pairs, one, progress=False)
  image = golden["image_embeds"][[i for i, _ in PAIRS]]
  np.testing.assert_allclose(
    got, clip.cosine(image, golden["text_embeds"][[t for _, t in PAIRS]]), atol=1e-5
  )


def test_preprocess_matches_hf_image_processor(golden):
  images = [golden[f"image_{i}"] for i in range(3)]
  assert {im.shape[:2] for im in images} == {(32, 32), (48, 40), (20, 28)}
  ours = np.stack([clip.preprocess(im, 32) for im in images])
  # HF's PIL path runs the same PIL bicubic on uint8, so only float rounding differs.
  np.testing.assert_allclose(ours, golden["pixels"], rtol=0, atol=1e-6)
  # HF's default (torchvision) path resizes in float with torch's antialiased bicubic: at
  # most one grey level (1 / 255 / std ~ 0.0146) apart, and equal without a resize.
  diff = np.abs(ours - golden["pixels_torchvision"])
  assert diff.max() <= 1.0 / 255 / clip.STD.min() + 1e-6
  assert diff[0].max() < 1e-6
  assert clip.resized_size(48, 40, 32) == (38, 32) and clip.resized_size(20, 28, 32) == (32, 44)


def test_sharded_safetensors_and_pytorch_bin(tmp_path, loaded):
  from safetensors.numpy import save_file

  from imagen_jax.text import t5_checkpoints
  from tests.test_evaluation_fid import _write_torch_zip

  _, variables = loaded
  tensors = {
    k: np.array(v) for k, (v, _) in
    t5_checkpoints._safetensors_index(os.path.join(TINY, "model.safetensors")).items()
  }  # fmt: skip
  names = sorted(tensors)
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  for f in ("config.json", "vocab.json", "merges.txt"):
    shutil.copy(os.path.join(TINY, f), sharded / f)
  weight_map = {}
  for s, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    file = f"model-{s + 1:05d}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, str(sharded / file))
    weight_map.update(dict.fromkeys(part, file))
  (sharded / clip_model.WEIGHTS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
  bin_dir = tmp_path / "bin"
  shutil.copytree(sharded, bin_dir)
  for f in os.listdir(bin_dir):
    if "safetensors" in f:
      os.remove(bin_dir / f)
  _write_torch_zip(str(bin_dir / clip_model.TORCH_WEIGHTS_FILE), tensors)
  for folder in (sharded, bin_dir):
    _, again = clip_model.load(str(folder))
    flat = dict(_leaves(again))
    for path, leaf in _leaves(variables):
      np.testing.assert_array_equal(flat[path], leaf)
  assert "torch" not in sys.modules


def _leaves(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree, sep="/").items()


def test_loader_errors(tmp_path):
  from safetensors.numpy import save_file

  from imagen_jax.text import t5_checkpoints

  tensors = {
    k: np.array(v) for k, (v, _) in
    t5_checkpoints._safetensors_index(os.path.join(TINY, "model.safetensors")).items()
  }  # fmt: skip
  config = clip_model.read_config(TINY)
  less = {k: v for k, v in tensors.items() if k != "text_projection.weight"}
  with pytest.raises(errors.UserError, match=r"missing tensor 'text_projection\.weight'"):
    clip_model.variables_from_state_dict(less, config)
  more = dict(tensors, **{"text_model.pooler.weight": np.zeros(2, np.float32)})
  with pytest.raises(errors.UserError, match=r"unexpected tensor 'text_model\.pooler\.weight'"):
    clip_model.variables_from_state_dict(more, config)
  wider = dataclasses.replace(config, projection_dim=8)
  with pytest.raises(errors.UserError, match=r"shape \(16, 32\), but config\.json gives \(8, 32\)"):
    clip_model.variables_from_state_dict(tensors, wider)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
  with pytest.raises(errors.UserError, match="not a CLIPModel config"):
    clip_model.read_config(str(bad))
  with pytest.raises(errors.UserError, match="no model.safetensors"):
    clip_model.weight_files(str(bad))
  save_file({"w": np.zeros(1, np.float32)}, str(bad / "x.safetensors"))
  with pytest.raises(errors.UserError, match="vocab.json: missing"):
    clip_tokenizer.CLIPTokenizer.from_directory(str(bad))


# ---- the score ----


def test_score_closed_forms():
  rng = np.random.default_rng(0)
  v = rng.standard_normal((4, 16))
  np.testing.assert_allclose(clip.score(v, 3.0 * v), 100.0, rtol=1e-12)  # scale-free
  e = np.eye(16)[:4]
  np.testing.assert_array_equal(clip.score(e, np.eye(16)[4:8]), 0.0)  # orthogonal
  np.testing.assert_array_equal(clip.score(v, -v), 0.0)  # negative cosine clipped to 0
  a, b = np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]])
  np.testing.assert_allclose(clip.score(a, b), [100.0 / np.sqrt(2.0)], rtol=1e-12)


# ---- the CLI ----


# (image, prompt) pairs of the CLI test: the golden pairs, and image 2 with prompt 1, the one
# pair whose cosine is positive under the random weights (so the clip at 0 is seen both ways).
PAIRS = ((0, 0), (1, 1), (2, 2), (2, 1))


def _sample_dir(directory, golden, pairs=PAIRS) -> None:
  """The golden images as PNGs with an index.json like `imagen-jax sample` writes."""
  os.makedirs(directory, exist_ok=True)
  entries = []
  for n, (i, t) in enumerate(pairs):
    name = f"{n:05d}.png"
    Image.fromarray(golden[f"image_{i}"]).save(os.path.join(directory, name))
    entries.append({"file": name, "prompt": str(golden["prompts"][t]), "seed": n})
  with open(os.path.join(directory, "index.json"), "w") as f:
    json.dump({"images": entries}, f)


def test_cli_eval_clip_end_to_end(tmp_path, golden, capsys):
  src = str(tmp_path / "samples")
  _sample_dir(src, golden)
  report_path = str(tmp_path / "report.json")
  argv = ["eval", "clip", f"--images={src}", f"--clip={TINY}", f"--out={report_path}"]
  capsys.readouterr()
  assert cli.main([*argv, "--batch_size=3"]) == 0  # one padded batch over the 8 test devices
  assert "CLIP score: " in capsys.readouterr().out
  with open(report_path) as f:
    report = json.load(f)
  # The pipeline (PNG -> pixels -> embeddings -> score) against HF's embeddings of the pairs.
  image = golden["image_embeds"][[i for i, _ in PAIRS]]
  text = golden["text_embeds"][[t for _, t in PAIRS]]
  np.testing.assert_allclose(
    [r["cosine"] for r in report["per_image"]], clip.cosine(image, text), rtol=0, atol=1e-5
  )
  want = clip.score(image, text)
  assert want[3] > 5.0 and want[:3].max() == 0.0  # one positive cosine, three clipped
  np.testing.assert_allclose([r["clip_score"] for r in report["per_image"]], want, atol=1e-3)
  assert report["clip_score"] == pytest.approx(float(want.mean()), abs=1e-3)
  assert report["num_images"] == 4 and report["clip"] == os.path.abspath(TINY)
  assert report["batch_size"] == 8 and report["devices"] == 8
  assert [r["prompt"] for r in report["per_image"]][3] == str(golden["prompts"][1])


def test_cli_eval_clip_bad_inputs(tmp_path, golden, capsys):
  src = str(tmp_path / "samples")
  _sample_dir(src, golden)
  no_index = tmp_path / "no_index"
  no_index.mkdir()
  no_prompt = tmp_path / "no_prompt"
  no_prompt.mkdir()
  (no_prompt / "index.json").write_text(json.dumps({"images": [{"file": "a.png"}]}))
  gone = tmp_path / "gone"
  gone.mkdir()
  (gone / "index.json").write_text(json.dumps({"images": [{"file": "a.png", "prompt": "x"}]}))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(os.path.join(TINY, "config.json"), no_weights / "config.json")
  no_vocab = tmp_path / "no_vocab"
  shutil.copytree(TINY, no_vocab)
  os.remove(no_vocab / "vocab.json")
  clip_dir = f"--clip={TINY}"
  cases = [
    (["eval", "clip", f"--images={tmp_path}/nope", clip_dir], "is not a directory"),
    (["eval", "clip", f"--images={no_index}", clip_dir], r"index\.json: missing"),
    (["eval", "clip", f"--images={no_prompt}", clip_dir], "has no 'prompt'"),
    (["eval", "clip", f"--images={gone}", clip_dir], "names 'a.png', which is missing"),
    (["eval", "clip", f"--images={src}", f"--clip={tmp_path}/nope"], "--clip=.*is not a directory"),
    (["eval", "clip", f"--images={src}", f"--clip={no_index}"], r"config\.json: missing"),
    (["eval", "clip", f"--images={src}", f"--clip={no_weights}"], r"no model\.safetensors"),
    (["eval", "clip", f"--images={src}", f"--clip={no_vocab}"], r"vocab\.json: missing"),
    (["eval", "clip", f"--images={src}", clip_dir, "--batch_size=0"], "--batch_size=0"),
    (["eval", "clip", f"--images={src}", clip_dir, f"--out={src}"], "is a directory"),
  ]  # fmt: skip
  lines = [cli_helpers.user_error(capsys, argv, pattern) for argv, pattern in cases]
  assert len(set(lines)) == len(cases), lines  # each bad input gets its own message

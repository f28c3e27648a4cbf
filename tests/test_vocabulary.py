"""The T5 SentencePiece vocabulary: special ids, EOS on truncation, empty captions."""

import hashlib
import logging

import numpy as np
import pytest
import sentencepiece as spm

from imagen_jax.text import vocabulary

SENTENCES = [
  "a red circle on a blue background",
  "two green squares next to a yellow triangle",
  "a small purple star above a large orange square",
  "an astronaut riding a horse on the moon",
  "a photo of a cat sitting on a wooden table",
  "three blue triangles in a row",
] * 4


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
  return vocabulary.train_sentencepiece(SENTENCES, prefix, vocab_size=64)


def test_trained_model_has_t5_special_ids(spm_path):
  vocab = vocabulary.load_vocabulary(spm_path)
  sp = vocab.tokenizer
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert vocab.eos_id == 1 and vocab.pad_id == 0
  assert 8 < vocab.vocab_size <= 64
  # seqio round-trips text through the trained model.
  assert vocab.decode(vocab.encode("a red circle")) == "a red circle"


def test_tokenize_appends_eos_and_pads(spm_path):
  vocab = vocabulary.load_vocabulary(spm_path)
  ids = list(vocab.encode("a red circle"))
  out = vocabulary.tokenize(vocab, ["a red circle", ""], max_length=16)
  assert out.dtype == np.int32 and out.shape == (2, 16)
  np.testing.assert_array_equal(out[0, : len(ids) + 1], ids + [1])
  assert (out[0, len(ids) + 1 :] == 0).all()
  # The empty caption is EOS only: the unconditional input.
  np.testing.assert_array_equal(out[1], [1] + [0] * 15)


def test_truncation_keeps_eos_and_warns_once(spm_path, caplog, monkeypatch):
  monkeypatch.setattr(vocabulary, "_warned_truncation", False)
  vocab = vocabulary.load_vocabulary(spm_path)
  long_text = " ".join(SENTENCES[:3])
  ids = list(vocab.encode(long_text))
  assert len(ids) > 6
  with caplog.at_level(logging.WARNING, logger=vocabulary.__name__):
    out = vocabulary.tokenize(vocab, [long_text, long_text], max_length=6)
  np.testing.assert_array_equal(out[0], ids[:5] + [1])
  np.testing.assert_array_equal(out[1], out[0])
  assert sum("truncated" in r.message for r in caplog.records) == 1
  # Exactly max_length - 1 tokens fits without truncation.
  exact = vocabulary.tokenize(
    vocab, ["a red circle"], max_length=len(vocab.encode("a red circle")) + 1
  )
  assert exact[0, -1] == 1


def test_wrong_special_ids_rejected(tmp_path):
  prefix = str(tmp_path / "bos")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(SENTENCES),
    model_prefix=prefix,
    vocab_size=40,
    hard_vocab_limit=False,
    minloglevel=2,
  )  # sentencepiece defaults: unk=0, bos=1, eos=2, no pad
  with pytest.raises(ValueError, match=r"bos\.model.*pad=0, eos=1, unk=2"):
    vocabulary.load_vocabulary(prefix + ".model")


def test_bad_inputs(tmp_path, spm_path):
  with pytest.raises(FileNotFoundError, match="missing.model"):
    vocabulary.load_vocabulary(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a sentencepiece proto")
  with pytest.raises(ValueError, match="junk.model"):
    vocabulary.load_vocabulary(str(junk))
  vocab = vocabulary.load_vocabulary(spm_path)
  with pytest.raises(ValueError, match="max_length"):
    vocabulary.tokenize(vocab, ["a"], max_length=0)
  with pytest.raises(ValueError, match="sequence of strings"):
    vocabulary.tokenize(vocab, "a red circle")
  with pytest.raises(ValueError, match="sentences"):
    vocabulary.train_sentencepiece(["", "  "], str(tmp_path / "empty"))


def test_file_sha256(tmp_path, spm_path):
  with open(spm_path, "rb") as f:
    data = f.read()
  assert vocabulary.file_sha256(spm_path) == hashlib.sha256(data).hexdigest()
  # Training is deterministic, so the manifest hash of a re-trained demo vocab is stable.
  again = vocabulary.train_sentencepiece(SENTENCES, str(tmp_path / "again"), vocab_size=64)
  assert vocabulary.file_sha256(again) == vocabulary.file_sha256(spm_path)

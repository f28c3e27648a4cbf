"""T5 tokenization: a SentencePiece vocabulary (pad=0, eos=1, unk=2, no BOS) through seqio.

T5 inputs are `tokens + [EOS]`, right-padded with 0 to a fixed length; truncation keeps the EOS
so a long caption still ends like the ones the encoder was trained on. The empty caption becomes
`[EOS, 0, ...]`, the unconditional input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import seqio

from imagen_jax.utils import files

logger = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

_warned_truncation = False


def train_sentencepiece(sentences: Iterable[str], model_prefix: str, vocab_size: int = 256) -> str:
  """Trains a T5-style SentencePiece unigram model (pad=0, eos=1, unk=2, no BOS).

  `vocab_size` is an upper bound: with few sentences the model gets as many pieces as the text
  supports, so tests and demos can train on a handful of captions.

  Args:
    sentences: training text, one sentence per item (must contain some non-empty text).
    model_prefix: output path prefix; `<prefix>.model` and `<prefix>.vocab` are written.
    vocab_size: the largest vocabulary to build (>= 8).

  Returns:
    The path of the `.model` file.
  """
  import sentencepiece as spm

  if vocab_size < 8:
    raise ValueError(f"vocab_size must be >= 8 (3 special ids + pieces), got {vocab_size}")
  sentences = [s.strip() for s in sentences]
  sentences = [s for s in sentences if s]
  if not sentences:
    raise ValueError("train_sentencepiece: `sentences` holds no non-empty text to train on")
  directory = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(directory, exist_ok=True)
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_prefix=model_prefix,
    vocab_size=vocab_size,
    model_type="unigram",
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    pad_piece="<pad>",
    eos_piece="</s>",
    unk_piece="<unk>",
    # Few sentences cannot fill a fixed vocabulary; accept a smaller one.
    hard_vocab_limit=False,
    character_coverage=1.0,
    # One thread keeps the trained model identical run to run.
    num_threads=1,
    minloglevel=2,
  )
  # The proto records the output prefix; drop it so the same sentences give the same bytes
  # (and the same sha256 in data manifests) wherever the model is written.
  from sentencepiece import sentencepiece_model_pb2

  path = model_prefix + ".model"
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  proto.trainer_spec.ClearField("model_prefix")
  with open(path, "wb") as f:
    f.write(proto.SerializeToString(deterministic=True))
  return path


def load_vocabulary(spm_path: str) -> seqio.SentencePieceVocabulary:
  """Loads a SentencePiece model through seqio and checks T5's special ids.

  Args:
    spm_path: path of a SentencePiece `.model` file.

  Returns:
    The seqio vocabulary.

  Raises:
    FileNotFoundError: `spm_path` does not exist.
    ValueError: the file is not a SentencePiece model, or its special ids are not
      pad=0, eos=1, unk=2.
  """
  if not spm_path or not os.path.isfile(spm_path):
    raise FileNotFoundError(f"vocabulary file {spm_path!r} does not exist (a SentencePiece .model)")
  vocab = seqio.SentencePieceVocabulary(spm_path)
  try:
    sp = vocab.tokenizer
  except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
    raise ValueError(f"vocabulary file {spm_path!r} is not a SentencePiece model: {e}") from e
  got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
  want = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}
  if got != want:
    raise ValueError(
      f"vocabulary {spm_path!r} has special ids {got}; T5 needs pad=0, eos=1, unk=2 "
      "(train it with pad_id=0 eos_id=1 unk_id=2 bos_id=-1)"
    )
  return vocab


def tokenize(vocab: seqio.Vocabulary, texts: Sequence[str], max_length: int = 128) -> np.ndarray:
  """Tokenizes captions to T5 encoder inputs.

  Args:
    vocab: the vocabulary (eos must be 1, pad 0).
    texts: captions; "" gives the EOS-only (unconditional) input.
    max_length: fixed output length (>= 1).

  Returns:
    int32 [len(texts), max_length]: tokens + EOS, right-padded with 0; a text too long is cut to
    `max_length - 1` tokens + EOS (a warning is logged once per process).
  """
  global _warned_truncation
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  if isinstance(texts, str | bytes):
    raise ValueError("texts must be a sequence of strings, not a single string")
  eos = vocab.eos_id
  out = np.zeros((len(texts), max_length), np.int32)
  for i, text in enumerate(texts):
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    if not isinstance(text, str):
      raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
    ids = list(vocab.encode(text)) if text else []
    if len(ids) + 1 > max_length:
      if not _warned_truncation:
        logger.warning(
          "caption of %d tokens truncated to max_length=%d (EOS kept); further truncations "
          "are not reported",
          len(ids) + 1,
          max_length,
        )
        _warned_truncation = True
      ids = ids[: max_length - 1]
    ids.append(eos)
    out[i, : len(ids)] = ids
  return out


# Hex SHA-256 of a file's bytes (identifies a vocabulary or checkpoint file in manifests).
file_sha256 = files.sha256

"""CLIP's byte-level BPE tokenizer, reading the `vocab.json` + `merges.txt` HF ships with CLIP.

The same ids as Hugging Face's `CLIPTokenizer` (and OpenAI's `simple_tokenizer` on text it
does not "fix"):
  normalise  Unicode NFC, every run of whitespace -> one space, lowercase (per character);
  split      `<|startoftext|>`, `<|endoftext|>`, the contractions 's 't 're 've 'm 'll 'd, runs
             of letters, single digits/numbers, runs of anything else that is not a space;
  bytes      each piece's UTF-8 bytes mapped to printable characters (`bytes_to_unicode`),
             the last one marked with `</w>`, merged pair by pair in `merges.txt` rank order;
  frame      <|startoftext|> ids <|endoftext|>, truncated to 77 keeping the end token, padded.

OpenAI's tokenizer also runs `ftfy.fix_text` (which, among others, straightens curly quotes)
and `html.unescape` twice before this, and lowercases with the final-sigma rule; HF's does
none of that (ftfy is not a dependency here), so text with curly quotes, mojibake, HTML
entities (`&amp;`) or a word-final capital sigma can tokenize differently from OpenAI's.

The split pattern needs Unicode letter and number classes (`\\p{L}`, `\\p{N}`), which `re` lacks
and the `regex` package is not a dependency. `re`'s `[^\\W\\d_]` would be close but is not the
same: it also counts the "letter-like" numbers (categories Nl, No: ², ½, Ⅻ, circled digits) as
letters, so they would glue onto words instead of standing alone. Here the two classes are built
from `unicodedata` categories (L*, N*) once per process (under a second), which is exact up to
the Unicode version of Python's tables versus the Rust ones HF uses (newly encoded scripts only).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

from imagen_jax import errors

CONTEXT_LENGTH = 77
START = "<|startoftext|>"
END = "<|endoftext|>"
END_OF_WORD = "</w>"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# The Unicode White_Space property (what `regex` and HF's Rust regex call \s). Python's `\s`
# also matches U+001C..U+001F, which are not spaces to them.
_WHITESPACE = (
  "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
  "\u200a\u2028\u2029\u202f\u205f\u3000"
)


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's byte -> printable character table: printable Latin-1 bytes stand for themselves,
  the other 68 bytes (controls, space, soft hyphen...) take code points from 256 upwards."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  keep += range(ord("®"), ord("ÿ") + 1)
  table = {b: chr(b) for b in keep}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return dict(sorted(table.items()))


def _class_of(codepoints: list[int]) -> str:
  """A `re` character class body of code points, as ranges."""
  parts = []
  start = prev = codepoints[0]
  for c in [*codepoints[1:], -2]:
    if c != prev + 1:
      parts.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
      start = c
    prev = c
  return "".join(parts)


@functools.lru_cache(maxsize=1)
def split_pattern() -> re.Pattern:
  """CLIP's pre-tokenizer pattern with \\p{L} and \\p{N} spelled out from unicodedata."""
  letters, numbers = [], []
  for c in range(sys.maxunicode + 1):
    kind = unicodedata.category(chr(c))[0]
    if kind == "L":
      letters.append(c)
    elif kind == "N":
      numbers.append(c)
  lc, nc = _class_of(letters), _class_of(numbers)
  ws = "".join(re.escape(c) for c in _WHITESPACE)
  return re.compile(
    rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[{lc}]+|[{nc}]|[^{ws}{lc}{nc}]+"
  )


_SPACES = re.compile("[" + "".join(re.escape(c) for c in _WHITESPACE) + "]+")


def normalize(text: str) -> str:
  """NFC, whitespace runs -> one space, lowercase (HF's normaliser).

  Lowercased character by character, as HF's Rust normaliser does: `str.lower` on the whole
  string applies the final-sigma rule (ΣΑΣ -> σας, OpenAI's tokenizer), HF gives σασ. No strip:
  the split drops spaces anyway, and `str.strip` would also drop U+001C..U+001F, which HF keeps.
  """
  return "".join(map(str.lower, _SPACES.sub(" ", unicodedata.normalize("NFC", text))))


class CLIPTokenizer:
  """Text -> CLIP token ids from a vocabulary {token: id} and ranked merges [(a, b), ...]."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
    self.vocab = vocab
    self.ranks = {tuple(pair): i for i, pair in enumerate(merges)}
    missing = [t for t in (START, END) if t not in vocab]
    if missing:
      raise ValueError(f"the CLIP vocabulary lacks the special token(s) {missing}")
    self.start_id, self.end_id = vocab[START], vocab[END]
    self.byte_chars = bytes_to_unicode()
    self._cache: dict[str, list[str]] = {START: [START], END: [END]}

  @classmethod
  def from_directory(cls, directory: str) -> CLIPTokenizer:
    """Reads `vocab.json` and `merges.txt` (HF's CLIP folder layout)."""
    vocab_path, merges_path = (os.path.join(directory, f) for f in (VOCAB_FILE, MERGES_FILE))
    for path in (vocab_path, merges_path):
      if not os.path.isfile(path):
        raise errors.UserError(
          f"{path}: missing; a Hugging Face CLIP folder (e.g. openai/clip-vit-large-patch14) "
          f"ships {VOCAB_FILE} and {MERGES_FILE} beside model.safetensors"
        )
    try:
      with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
      with open(merges_path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise errors.UserError(f"{directory}: unreadable CLIP tokenizer files ({e})") from e
    if not isinstance(vocab, dict):
      raise errors.UserError(f"{vocab_path}: not a {{token: id}} vocabulary")
    merges = []
    for n, line in enumerate(lines):
      if not line.strip() or (n == 0 and line.startswith("#version")):
        continue
      pair = line.split()
      if len(pair) != 2:
        raise errors.UserError(f"{merges_path}:{n + 1}: a merge is two tokens, got {line!r}")
      merges.append((pair[0], pair[1]))
    try:
      return cls(vocab, merges)
    except ValueError as e:
      raise errors.UserError(f"{vocab_path}: {e}") from e

  def bpe(self, piece: str) -> list[str]:
    """One pre-token (already byte-mapped) -> its BPE sub-tokens."""
    if piece in self._cache:
      return self._cache[piece]
    word = [*piece[:-1], piece[-1] + END_OF_WORD]
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      # Merge every occurrence of the best pair, left to right (OpenAI's loop).
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` without the start/end tokens."""
    ids = []
    for piece in split_pattern().findall(normalize(text)):
      if piece not in (START, END):
        piece = "".join(self.byte_chars[b] for b in piece.encode("utf-8"))
      for token in self.bpe(piece):
        # Every byte and byte</w> is in CLIP's vocabulary; a cut-down one falls back like HF.
        ids.append(self.vocab.get(token, self.end_id))
    return ids

  def __call__(
    self, texts: Sequence[str], context_length: int = CONTEXT_LENGTH, pad_id: int | None = None
  ) -> np.ndarray:
    """int32 [len(texts), context_length]: start, ids, end, then `pad_id` (default the end
    token, HF's pad token for CLIP); too long texts keep their first ids and the end token."""
    pad = self.end_id if pad_id is None else pad_id
    out = np.full((len(texts), context_length), pad, np.int32)
    for row, text in enumerate(texts):
      ids = [self.start_id, *self.encode(text)][: context_length - 1] + [self.end_id]
      out[row, : len(ids)] = ids
    return out

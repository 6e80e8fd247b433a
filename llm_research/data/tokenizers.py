"""Tokenizers: a byte-level one, a SentencePiece BPE one (`train_sentencepiece`; the pipeline
trains it on the configured corpus: `pipeline.get_tokenizer`), bGPT's raw bytes, and a given
file (`tokenizer_from_file`: a Hugging Face `tokenizer.json` or a SentencePiece model, as
`llm_research.convert from-hf` brings along).

All follow `Tokenizer`: `encode` adds no bos/eos; `decode` drops pad/bos/eos; every str
round-trips: `decode(encode(text)) == text`. The byte and SentencePiece tokenizers have ids
0 pad, 1 bos, 2 eos; `RawByteTokenizer` (data.source="bytes") keeps byte values as ids and has
one more, 256, for pad, bos and eos alike (bGPT's patch padding).
"""
import json
import os
import tempfile
from typing import Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm
import tokenizers

from llm_research.errors import ConfigError


# Training input cap (characters): all of the stdlib (~30M) fits; BPE on it takes ~10 s.
MAX_TRAINING_CHARS = 64_000_000
# Text goes to the trainer in line-aligned pieces: 1024 characters are at most 4096 UTF-8 bytes,
# below SentencePiece's max_sentence_length (4192 bytes).
MAX_PIECE_CHARS = 1024


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


class ByteTokenizer:
  """UTF-8 bytes: id = byte + 3 after pad 0, bos 1, eos 2."""

  vocab_size = 259
  pad_id, bos_id, eos_id = 0, 1, 2
  _offset = 3

  def encode(self, text: str) -> list[int]:
    return [b + self._offset for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int]) -> str:
    # errors="replace" only matters for byte sequences a model made up.
    data = bytes(int(i) - self._offset for i in ids if int(i) >= self._offset)
    return data.decode("utf-8", errors="replace")


class RawByteTokenizer:
  """bGPT's ids: a byte is its value 0..255; 256 is padding (and stands for bos and eos)."""

  vocab_size = 257
  pad_id = bos_id = eos_id = 256

  def encode(self, text: str) -> list[int]:
    # surrogateescape: bytes a command line gave that are not UTF-8 (Python decodes argv so)
    # come back as the bytes they were.
    return self.encode_bytes(text.encode("utf-8", errors="surrogateescape"))

  def decode(self, ids: Sequence[int]) -> str:
    return self.decode_bytes(ids).decode("utf-8", errors="replace")

  @staticmethod
  def encode_bytes(data: bytes) -> list[int]:
    return list(data)

  @staticmethod
  def decode_bytes(ids: Sequence[int]) -> bytes:
    """The bytes among `ids`; 256 (padding, patch ends, separators) is dropped."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256)


class SentencePieceTokenizer:
  """A SentencePiece model: pad 0, bos 1, eos 2, unk 3 (see `train_sentencepiece`)."""

  def __init__(self, model_path: str):
    self._processor = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._processor.get_piece_size()
    self.pad_id = self._processor.pad_id()
    self.bos_id = self._processor.bos_id()
    self.eos_id = self._processor.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    # pad/bos/eos are control pieces: SentencePiece decodes them to nothing.
    return self._processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library). bos, eos and pad are the
  tokens `tokenizer_config.json` beside it names; without a bos token (Qwen2) sequences start
  with eos, as GPT-2's do; without a pad token, pad is eos. `vocab_size` is the model's (its
  embedding rows, often more than the tokenizer's ids)."""

  def __init__(self, path: str, vocab_size: int):
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    special = _special_tokens(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    ids = {role: self._tokenizer.token_to_id(token) for role, token in special.items()}
    if ids.get("eos") is None:
      raise ConfigError(f"{path}: no eos token (tokenizer_config.json beside it names none)")
    self.eos_id = ids["eos"]
    self.bos_id = ids["bos"] if ids.get("bos") is not None else self.eos_id
    self.pad_id = ids["pad"] if ids.get("pad") is not None else self.eos_id
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_tokens(config_path: str) -> dict[str, str]:
  """{'bos': token, 'eos': ..., 'pad': ...} named by a tokenizer_config.json (a token is a
  string, or an AddedToken's dict with its 'content')."""
  if not os.path.isfile(config_path):
    return {}
  with open(config_path) as f:
    config = json.load(f)
  tokens = {}
  for role in ("bos", "eos", "pad"):
    token = config.get(f"{role}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token:
      tokens[role] = token
  return tokens


def tokenizer_from_file(path: str, vocab_size: int) -> Tokenizer:
  """The tokenizer in `path`: a `tokenizer.json`, or a SentencePiece model (`*.model`)."""
  if not os.path.isfile(path):
    raise ConfigError(f"data.tokenizer_file={path!r} does not exist")
  if path.endswith(".json"):
    return HuggingFaceTokenizer(path, vocab_size)
  tokenizer = SentencePieceTokenizer(path)
  tokenizer.vocab_size = vocab_size  # the model's embedding rows
  return tokenizer


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
  """Splits texts into line-aligned pieces of <= MAX_PIECE_CHARS, up to MAX_TRAINING_CHARS."""
  total = 0
  for text in texts:
    piece = ""
    for line in text.splitlines(keepends=True):
      if piece and len(piece) + len(line) > MAX_PIECE_CHARS:
        yield piece
        piece = ""
      piece += line
      total += len(line)
    if piece:
      yield piece
    if total >= MAX_TRAINING_CHARS:
      return


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        model_path: str) -> SentencePieceTokenizer:
  """Trains a byte-fallback BPE model that keeps all whitespace; writes `model_path` atomically.

  Deterministic for the same texts, so processes that train concurrently get the same vocabulary.
  """
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    prefix = os.path.join(tmp, "model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_pieces(texts), model_prefix=prefix,
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True,
        # Keep source code verbatim: no normalization, indentation pieces like "▁▁▁▁".
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        shuffle_input_sentence=False, num_threads=os.cpu_count() or 1, minloglevel=2)
    os.replace(prefix + ".model", model_path)
  return SentencePieceTokenizer(model_path)

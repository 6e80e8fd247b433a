"""Grain pipelines: documents -> tokens -> packed, sharded, checkpointable batches.

The data config (`config.data`, an ml_collections ConfigDict):
  source         'stdlib' | 'tfds' | 'text_dir': where documents come from; or 'bytes': raw
                 bytes for bGPT, one example a row (below); or 'preferences': (prompt, chosen,
                 rejected) pairs for DPO, packed side by side (preferences.py: the rows).
  stdlib_config  'full' | 'tiny': builder config of the `stdlib_source` TFDS dataset
                 (source='stdlib'; built into data_dir on first use, in seconds).
  tfds_name      a prepared TFDS dataset, e.g. 'lm1b' (source='tfds'); read from data_dir in
                 the array_record format, never downloaded.
  text_key       the text feature of a TFDS dataset (default 'text').
  text_dir       a folder of UTF-8 text files (source='text_dir'): every file below it, hidden
                 ones aside, is a document; train/validation split by a hash of the path.
  data_dir       where TFDS datasets live (and where stdlib_source is built).
  cache_dir      where tokenizers are cached (<cache_dir>/tokenizers/).
  tokenizer      'byte' | 'sentencepiece' (ignored for source='bytes': raw bytes, 257 ids).
  vocab_size     SentencePiece vocab size (the byte tokenizer always has 259).
  tokenizer_file a given tokenizer, used as it is instead of one trained on the corpus: a
                 Hugging Face tokenizer.json or a SentencePiece .model (with
                 tokenizer='sentencepiece'; vocab_size is then the model's vocabulary, at
                 least the file's). llm_research.convert from-hf sets it. '' : none.
  seq_len        length of a packed row (source='bytes': of a row, in bytes).
  byte_dataset   source='bytes': 'cpu_states' | 'abc_to_midi' | 'midi_to_abc' | 'abc' |
                 'midi' (each format alone) | 'digits_bmp' | 'wav_tones' (local TFDS builders,
                 byte_datasets.py; built into data_dir on first use) | 'files' (every
                 non-hidden file under byte_dir is one example; train/validation split by a
                 hash of the path, as text_dir).
  byte_config    the builder config of byte_dataset: 'tiny' or 'full', and per builder others
                 (cpu_states 'short_300', 'short_3k', 'short_30k', '1k', '10k', '100k';
                 abc_midi 'short'; digits_bmp '8x8' and its labelled subsets; wav_tones
                 'short' and its subsets): byte_datasets.py says what each holds.
  byte_dir       the folder of source='bytes', byte_dataset='files'.
  preference_dataset  source='preferences': 'cpu_states' (pairs built here from the CPU
                 simulator, generated on the fly) | 'jsonl' (preference_file).
  preference_file  a JSONL file of pairs, one {"prompt", "chosen", "rejected"} object a line
                 (preference_dataset='jsonl'); train/validation split by a hash of the prompt.
  shuffle_seed   meant as the `seed` the training loop passes to `make_train_iterator`.
  shuffle_tokens how many tokens training shuffles together: windows of shuffle_tokens /
                 seq_len chunks (at least MIN_SHUFFLE_CHUNKS). A long document fills a run of
                 consecutive batches unless its chunks are a small part of a window (in the
                 stdlib corpus 42% of the bytes are in files of over 64 KB: at seq_len 64 a
                 window of 2 ** 22 tokens makes batches 300 steps apart as alike as neighbours,
                 one of 2 ** 16 does not); a larger window costs memory and start-up time.

A document becomes tokens [bos] + encode(text) + [eos], cut into chunks of at most seq_len + 1
tokens that overlap by one; a chunk gives `inputs = chunk[:-1]`, `targets = chunk[1:]`. Chunks
are packed first-fit into rows of seq_len, so every target token appears exactly once per epoch
and none is predicted across documents. Batches are dicts of int32 [local_batch, seq_len]:
`inputs`, `targets`, `segment_ids` (1, 2, ... per chunk in a row, 0 = padding) and `positions`
(0-based within a segment, 0 at padding).

source='bytes' (bGPT) packs nothing: a row is one example's bytes, laid out in patches of
`patch_size` (model.patch_size) as byte_rows.py documents: the file (or a conversion's input,
a separator patch and its output), padded with 256 to whole patches, then an end patch of 256s,
then 256 up to seq_len; inputs == targets, segment_ids 1 through the end patch and 0 after,
positions 0..seq_len - 1; labelled datasets (digits_bmp, wav_tones) add `label` [local_batch].
Examples longer than seq_len - patch_size are cropped (a warning says how many, once per split);
an empty file, a byte outside 0..255, a seq_len patch_size does not divide, a byte_dir split
with no file, or an unlabelled dataset for a classifier (`num_classes`, model.num_classes) is
a ConfigError.

Each process reads only records
`process_index::process_count`. Everything runs in-process, so an iterator's `get_state()` /
`set_state()` restores its exact position.
"""
import os
import pathlib
import re
import warnings
import zlib

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from llm_research.data import byte_datasets, byte_rows, preferences, stdlib_corpus
from llm_research.data.tokenizers import (ByteTokenizer, RawByteTokenizer, SentencePieceTokenizer,
                                          Tokenizer, tokenizer_from_file, train_sentencepiece)
from llm_research.errors import ConfigError

# The values of data.source: the sources `load_source` reads.
SOURCES = ("stdlib", "tfds", "text_dir", "bytes", "preferences")
# The fewest chunks training shuffles together (data.shuffle_tokens sets more), so that a row's
# neighbours come from other documents.
MIN_SHUFFLE_CHUNKS = 1024
# Rows filled at once by first-fit packing (more rows: less padding, independent of batch size).
PACKING_ROWS = 64
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


class TextDirSource:
  """Random access to the files of one split of a folder: {'text': str, 'path': str}."""

  def __init__(self, directory: str, split: str):
    root = pathlib.Path(directory)
    self._paths = [
        path for path in sorted(root.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and stdlib_corpus.split_of(path.relative_to(root).as_posix()) == split]
    self._root = root

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, str]:
    path = self._paths[index]
    return {"text": path.read_text(encoding="utf-8", errors="replace"),
            "path": path.relative_to(self._root).as_posix()}


class ByteDirSource(TextDirSource):
  """One split of a folder's files as bytes: {'parts': [file bytes], 'path': str}."""

  def __init__(self, directory: str, split: str):
    super().__init__(directory, split)
    for path in self._paths:
      if path.stat().st_size == 0:
        raise ConfigError(f"{path} in data.byte_dir {directory!r} is an empty file: nothing to "
                          "learn from (remove it)")

  def __getitem__(self, index: int) -> dict:
    path = self._paths[index]
    return {"parts": [path.read_bytes()], "path": path.relative_to(self._root).as_posix()}


class _ByteExamples:
  """A byte dataset's TFDS records as examples: {'parts': [...], 'label': int (if labelled)}."""

  def __init__(self, source, example):
    self._source, self._example = source, example

  def __len__(self) -> int:
    return len(self._source)

  def _as_example(self, record: dict) -> dict:
    parts, label = self._example(record)
    return {"parts": parts} if label is None else {"parts": parts, "label": label}

  def __getitem__(self, index: int) -> dict:
    return self._as_example(self._source[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._as_example(record) for record in self._source.__getitems__(indices)]


def document_text(record: dict) -> str:
  text = record["text"]
  return text.decode("utf-8") if isinstance(text, bytes) else text


def _prepared_tfds(builder, name: str, data_dir: str, split: str):
  if split not in builder.info.splits:
    raise ConfigError(f"TFDS dataset {name!r} in {data_dir!r} has no split {split!r} "
                      f"(it has {sorted(builder.info.splits)})")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(f"TFDS dataset {name!r} in {data_dir!r} is stored as "
                      f"{builder.info.file_format.value}; grain needs it prepared with "
                      "file_format='array_record'")
  return builder.as_data_source(split)


def _stdlib_source(data_config: ml_collections.ConfigDict, split: str):
  builder = stdlib_corpus.StdlibSource(config=data_config.stdlib_config,
                                       data_dir=data_config.data_dir, file_format="array_record")
  builder.download_and_prepare()  # Builds locally on first use; a no-op afterwards.
  return _prepared_tfds(builder, "stdlib_source", data_config.data_dir, split)


def check_byte_config(data_config: ml_collections.ConfigDict, patch_size: int,
                      num_classes: int = 0) -> None:
  """Refuses, naming the key, a source='bytes' setting no run can use: rows of `patch_size`
  (labelled, for a classifier of `num_classes`) it cannot give, or a data.byte_dir that leaves
  the train or the eval split without a file (cheap: builds no dataset)."""
  _check_byte_rows(data_config, patch_size, num_classes)
  if data_config.byte_dataset == "files":
    for split in ("train", data_config.eval_split):  # the splits a run reads
      if not len(ByteDirSource(data_config.byte_dir, split)):
        raise ConfigError(
            f"data.byte_dir {data_config.byte_dir!r} has no files in split {split!r}: a file "
            "goes to 'train' or 'validation' (about 5%) by a hash of its path; add files")


def _check_byte_rows(data_config: ml_collections.ConfigDict, patch_size: int,
                     num_classes: int) -> None:
  """Refuses rows of `patch_size` (labelled if `num_classes`) the byte data cannot give."""
  byte_rows.check_lengths(data_config.seq_len, patch_size)
  _check_byte_dataset(data_config)
  labelled = [name for name, dataset in byte_datasets.BYTE_DATASETS.items()
              if dataset.num_classes]  # 'files' has no labels
  if num_classes and data_config.byte_dataset not in labelled:
    raise ConfigError(f"model.num_classes={num_classes} is a classifier, but "
                      f"data.byte_dataset={data_config.byte_dataset!r} has no labels: use one "
                      f"that has ({', '.join(map(repr, labelled))}) or model.num_classes=0")


def _check_byte_dataset(data_config: ml_collections.ConfigDict) -> None:
  name, config_name = data_config.byte_dataset, data_config.byte_config
  if name == "files":
    if not os.path.isdir(data_config.byte_dir):
      problem = "is not a directory" if os.path.exists(data_config.byte_dir) else "does not exist"
      raise ConfigError(f"data.byte_dir {data_config.byte_dir!r} {problem}")
    return
  if name not in byte_datasets.BYTE_DATASETS:
    raise ConfigError(f"unknown data.byte_dataset {name!r}: use one of "
                      f"{[*byte_datasets.BYTE_DATASETS, 'files']}")
  configs = [config.name for config in byte_datasets.BYTE_DATASETS[name].builder.BUILDER_CONFIGS]
  if config_name not in configs:
    raise ConfigError(f"data.byte_config={config_name!r} is not a config of data.byte_dataset="
                      f"{name!r}: use one of {configs}")


def _byte_dataset_source(data_config: ml_collections.ConfigDict, split: str):
  dataset = byte_datasets.BYTE_DATASETS[data_config.byte_dataset]
  builder = dataset.builder(config=data_config.byte_config, data_dir=data_config.data_dir,
                            file_format="array_record")
  builder.download_and_prepare()  # Builds locally on first use; a no-op afterwards.
  source = _prepared_tfds(builder, dataset.builder.name, data_config.data_dir, split)
  return _ByteExamples(source, dataset.example)


def _byte_source(data_config: ml_collections.ConfigDict, split: str):
  """(source, its description) of source='bytes'."""
  _check_byte_dataset(data_config)
  if data_config.byte_dataset == "files":
    return ByteDirSource(data_config.byte_dir, split), f"byte_dir {data_config.byte_dir!r}"
  return (_byte_dataset_source(data_config, split),
          f"{data_config.byte_dataset}/{data_config.byte_config}")


def _tfds_source(data_config: ml_collections.ConfigDict, split: str):
  name, data_dir = data_config.tfds_name, data_config.data_dir
  where = f"TFDS dataset {name!r} (split {split!r}) in data_dir {data_dir!r}"
  if not os.path.isdir(data_dir):
    raise ConfigError(f"{where}: data_dir does not exist")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"{where}: no such dataset") from None
  if not builder.is_prepared():
    raise ConfigError(f"{where}: not prepared there (this pipeline never downloads)")
  key = data_config.text_key
  if key not in builder.info.features:
    raise ConfigError(f"{where}: no text feature {key!r} (data.text_key); it has "
                      f"{sorted(builder.info.features)}")
  source = _prepared_tfds(builder, name, data_dir, split)
  return source if key == "text" else _TextFeature(source, key)


class _TextFeature:
  """Exposes one text feature of a TFDS source as {'text': ...}."""

  def __init__(self, source, key: str):
    self._source, self._key = source, key

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return {"text": self._source[index][self._key]}


def load_source(data_config: ml_collections.ConfigDict, split: str):
  """A random-access source of {'text': str or bytes, ...} records for one split; for
  source='bytes', of examples {'parts': [bytes or uint8 arrays], 'label': int (if labelled)};
  for source='preferences', of pairs {'prompt', 'chosen', 'rejected', 'text'}."""
  if data_config.source == "stdlib":
    source, what = _stdlib_source(data_config, split), f"stdlib_source/{data_config.stdlib_config}"
  elif data_config.source == "tfds":
    source, what = _tfds_source(data_config, split), f"TFDS dataset {data_config.tfds_name!r}"
  elif data_config.source == "text_dir":
    if not os.path.isdir(data_config.text_dir):
      raise ConfigError(f"data.text_dir {data_config.text_dir!r} does not exist")
    source, what = TextDirSource(data_config.text_dir, split), f"text_dir {data_config.text_dir!r}"
  elif data_config.source == "bytes":
    source, what = _byte_source(data_config, split)
  elif data_config.source == "preferences":
    source, what = preferences.load(data_config, split)
  else:
    raise ConfigError(f"data.source={data_config.source!r} is not one of {SOURCES}")
  if len(source) == 0:
    raise ConfigError(f"{what} has no records in split {split!r}")
  return source


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} does not divide evenly over "
                      f"{process_count} processes")
  return global_batch_size // process_count


def _chunks(record: dict, tokenizer: Tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
  """One document's training examples: overlapping chunks of at most seq_len + 1 tokens."""
  tokens = np.array([tokenizer.bos_id, *tokenizer.encode(document_text(record)),
                     tokenizer.eos_id], np.int32)
  chunks = [tokens[start:start + seq_len + 1] for start in range(0, len(tokens) - 1, seq_len)]
  return [{"inputs": chunk[:-1], "targets": chunk[1:]} for chunk in chunks]


class _Flatten(grain.experimental.FlatMapTransform):
  """A list of chunks -> the chunks, one by one."""

  def flat_map(self, chunks):
    return chunks


def _packed_rows(documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int,
                 shuffle_seed: int | None, shuffle_tokens: int = 0) -> grain.IterDataset:
  """Documents -> packed rows {inputs, targets, segment_ids, positions}, each [seq_len]; with a
  shuffle seed, the chunks shuffled in windows of `shuffle_tokens` (data.shuffle_tokens)."""
  chunks = documents.map(lambda record: _chunks(record, tokenizer, seq_len))
  chunks = grain.experimental.FlatMapIterDataset(chunks.to_iter_dataset(_READ_OPTIONS), _Flatten())
  if shuffle_seed is not None:
    chunks = grain.experimental.WindowShuffleIterDataset(
        chunks, window_size=max(MIN_SHUFFLE_CHUNKS, shuffle_tokens // seq_len), seed=shuffle_seed)
  packed = grain.experimental.FirstFitPackIterDataset(
      chunks, length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=PACKING_ROWS, shuffle_bins=False)
  # inputs_* and targets_* segment ids/positions are equal: chunks have equal-length halves.
  return packed.map(lambda row: {
      "inputs": row["inputs"], "targets": row["targets"],
      "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]})


def _process_documents(data_config: ml_collections.ConfigDict, split: str, process_index: int,
                       process_count: int, source=None) -> grain.MapDataset:
  """This process's slice of a split's records (of `source`, if given, else the configured
  one); it reads no other records."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  source = load_source(data_config, split) if source is None else source
  documents = grain.MapDataset.source(source)
  shard = documents[process_index::process_count]
  if len(shard) == 0:
    raise ConfigError(f"split {split!r} has {len(documents)} records: too few for "
                      f"{process_count} processes")
  return shard


# Cropped examples per (corpus, split, process slice, seq_len, patch_size): counted and
# warned about once per process.
_CROPPED_EXAMPLES: dict[tuple, int] = {}


def _warn_cropped(data_config: ml_collections.ConfigDict, source, split: str, patch_size: int,
                  process: tuple[int, int]) -> None:
  """Warns (once) how many of this process's examples of `split` a row cannot hold whole."""
  seq_len = data_config.seq_len
  what = (f"byte_dir {data_config.byte_dir!r}" if data_config.byte_dataset == "files" else
          f"{data_config.byte_dataset}/{data_config.byte_config} in {data_config.data_dir!r}")
  key = (what, split, process, seq_len, patch_size)
  if key in _CROPPED_EXAMPLES:
    return
  indices = range(process[0], len(source), process[1])
  read = getattr(source, "__getitems__", lambda chunk: [source[i] for i in chunk])
  cropped = sum(
      byte_rows.laid_out_length([len(part) for part in example["parts"]], patch_size)
      > seq_len - patch_size
      for start in range(0, len(indices), 4096) for example in read(indices[start:start + 4096]))
  _CROPPED_EXAMPLES[key] = cropped
  if cropped:
    warnings.warn(f"{cropped} of {len(indices)} examples of split {split!r} of {what} are "
                  f"cropped: a row of data.seq_len={seq_len} holds {seq_len - patch_size} "
                  f"bytes before its end patch (model.patch_size={patch_size})", stacklevel=4)


def _byte_rows(data_config: ml_collections.ConfigDict, split: str, patch_size: int,
               num_classes: int, shuffle_seed: int | None,
               process: tuple[int, int]) -> grain.IterDataset:
  """This process's examples of `split` -> rows {inputs, targets, segment_ids, positions[,
  label]} (byte_rows.py); with a shuffle seed, endless and reshuffled every epoch."""
  _check_byte_rows(data_config, patch_size, num_classes)
  source = load_source(data_config, split)
  examples = _process_documents(data_config, split, *process, source=source)
  _warn_cropped(data_config, source, split, patch_size, process)
  if shuffle_seed is not None:
    examples = examples.shuffle(shuffle_seed).repeat()
  seq_len = data_config.seq_len
  rows = examples.map(lambda example: byte_rows.make_row(
      example["parts"], seq_len, patch_size, example.get("label"),
      where=f"an example of split {split!r}"))
  return rows.to_iter_dataset(_READ_OPTIONS)


def _text_rows(data_config: ml_collections.ConfigDict, documents: grain.MapDataset,
               tokenizer: Tokenizer, shuffle_seed: int | None) -> grain.IterDataset:
  """Records -> packed rows: of documents' chunks, or of preference pairs (preferences.py)."""
  if data_config.source == "preferences":  # pairs, one a record: shuffled with the records
    return preferences.packed_pairs(documents.to_iter_dataset(_READ_OPTIONS), tokenizer,
                                    data_config.seq_len, num_bins=PACKING_ROWS)
  if data_config.shuffle_tokens < 0:
    raise ConfigError(f"data.shuffle_tokens={data_config.shuffle_tokens} must not be negative")
  return _packed_rows(documents, tokenizer, data_config.seq_len, shuffle_seed=shuffle_seed,
                      shuffle_tokens=data_config.shuffle_tokens)


def make_train_iterator(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                        global_batch_size: int, seed: int, process_index: int,
                        process_count: int, patch_size: int = byte_rows.DEFAULT_PATCH_SIZE,
                        num_classes: int = 0) -> grain.DatasetIterator:
  """Endless training batches for this process: reshuffles its documents every epoch.

  `seed` (normally data.shuffle_seed) drives the document order and the shuffle of chunks
  within windows of data.shuffle_tokens; those windows blur epoch boundaries a little.
  source='bytes': one example a row, in patches of `patch_size` (model.patch_size), labelled
  if `num_classes` (a classifier's model.num_classes) is not 0; the tokenizer is not used.
  """
  local_batch = _local_batch_size(global_batch_size, process_count)
  if data_config.source == "bytes":
    rows = _byte_rows(data_config, "train", patch_size, num_classes, shuffle_seed=seed,
                      process=(process_index, process_count))
  else:
    documents = _process_documents(data_config, "train", process_index, process_count)
    documents = documents.shuffle(seed).repeat()  # A different order each epoch.
    rows = _text_rows(data_config, documents, tokenizer, shuffle_seed=seed)
  return iter(rows.batch(local_batch))


def make_eval_iterator(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       global_batch_size: int, process_index: int, process_count: int,
                       split: str = "validation", patch_size: int = byte_rows.DEFAULT_PATCH_SIZE,
                       num_classes: int = 0) -> grain.DatasetIterator:
  """One deterministic pass over this process's records of `split`.

  The last batch is padded to full size with all-zero rows (segment_ids 0: count no loss there;
  label 0 for labelled bytes), so every target token is seen exactly once. Processes may get
  different numbers of batches. source='bytes': as make_train_iterator.
  """
  local_batch = _local_batch_size(global_batch_size, process_count)
  if data_config.source == "bytes":
    rows = _byte_rows(data_config, split, patch_size, num_classes, shuffle_seed=None,
                      process=(process_index, process_count))
  else:
    documents = _process_documents(data_config, split, process_index, process_count)
    rows = _text_rows(data_config, documents, tokenizer, shuffle_seed=None)
  return iter(rows.batch(local_batch).map(lambda batch: _pad_rows(batch, local_batch)))


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads every array's first axis (rows) to `rows` with zeros."""
  return {key: np.pad(value, [(0, rows - len(value))] + [(0, 0)] * (value.ndim - 1))
          for key, value in batch.items()}


def _source_name(data_config: ml_collections.ConfigDict) -> str:
  """A file-name-safe name of the configured corpus."""
  if data_config.source == "stdlib":
    return f"stdlib_{data_config.stdlib_config}"
  if data_config.source == "tfds":
    return "tfds_" + data_config.tfds_name.replace("/", "_").replace(":", "_")
  if data_config.source == "text_dir":
    path = os.path.abspath(data_config.text_dir)
    return f"text_dir_{os.path.basename(path)}_{zlib.crc32(path.encode()):08x}"
  if data_config.source == "preferences":
    return preferences.source_name(data_config)
  raise ConfigError(f"unknown data.source {data_config.source!r}")


def vocab_size(data_config: ml_collections.ConfigDict) -> int:
  """The configured tokenizer's vocabulary size, known without building the tokenizer."""
  if data_config.source == "bytes":
    return RawByteTokenizer.vocab_size
  return ByteTokenizer.vocab_size if data_config.tokenizer == "byte" else data_config.vocab_size


def get_tokenizer(data_config: ml_collections.ConfigDict) -> Tokenizer:
  """The configured tokenizer; a SentencePiece model is trained on first use, then cached.
  source='bytes' always has raw bytes (RawByteTokenizer), whatever data.tokenizer says."""
  if data_config.source == "bytes":
    return RawByteTokenizer()
  if data_config.tokenizer == "byte":
    return ByteTokenizer()
  if data_config.tokenizer != "sentencepiece":
    raise ConfigError(
        f"unknown data.tokenizer {data_config.tokenizer!r}: use 'byte' or 'sentencepiece'")
  if data_config.get("tokenizer_file"):
    return tokenizer_from_file(data_config.tokenizer_file, data_config.vocab_size)
  model_path = os.path.join(data_config.cache_dir, "tokenizers",
                            f"{_source_name(data_config)}_{data_config.vocab_size}.model")
  if os.path.exists(model_path):
    return SentencePieceTokenizer(model_path)
  source = load_source(data_config, "train")
  texts = (document_text(source[index]) for index in range(len(source)))
  try:
    return train_sentencepiece(texts, data_config.vocab_size, model_path)
  except RuntimeError as error:  # more distinct characters in the corpus than pieces
    needed = re.search(r"required_chars\. (\d+) vs (\d+)", str(error))
    if not needed:
      raise
    raise ConfigError(f"data.vocab_size={data_config.vocab_size} is too small for this corpus: "
                      f"SentencePiece needs at least {needed.group(2)} pieces (256 bytes, 4 "
                      "special pieces and one per distinct character)") from None

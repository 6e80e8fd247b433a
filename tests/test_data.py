"""Tests of llm_research.data: the stdlib corpus, tokenizers, and packed grain pipelines."""
import collections
import copy
import json
import os

import numpy as np
import pytest

from llm_research import config
from llm_research.data import pipeline, stdlib_corpus, tokenizers

UNICODE_TEXT = "héllo wörld\n\t日本語のテキスト 🙂🚀\r\n  ﬁ ① Å\u00a0\u200b  \n"


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  """The tiny stdlib corpus with the byte tokenizer, built into a temporary data_dir."""
  c = config.base_config().data
  c.update(dict(
      source="stdlib", stdlib_config="tiny", tokenizer="byte", vocab_size=512, seq_len=32,
      data_dir=str(tmp_path_factory.mktemp("tensorflow_datasets")),
      cache_dir=str(tmp_path_factory.mktemp("cache"))))
  return c


def with_fields(data_config, **fields):
  c = copy.deepcopy(data_config)
  c.update(fields)
  return c


@pytest.fixture(scope="module")
def sentencepiece(data_config):
  return pipeline.get_tokenizer(with_fields(data_config, tokenizer="sentencepiece"))


def documents(data_config, split):
  source = pipeline.load_source(data_config, split)
  return [pipeline.document_text(source[i]) for i in range(len(source))]


def test_stdlib_source_has_both_splits_of_real_python(data_config):
  train, validation = documents(data_config, "train"), documents(data_config, "validation")
  assert (len(train), len(validation)) == (60, 10)
  assert set(train).isdisjoint(validation)
  assert sum("\n    def " in text for text in train) > 10  # Indented Python source.


def test_byte_tokenizer_round_trips(data_config):
  tokenizer = tokenizers.ByteTokenizer()
  for text in documents(data_config, "validation") + [UNICODE_TEXT, ""]:
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == text


def test_sentencepiece_round_trips_source_and_unicode(data_config, sentencepiece):
  assert sentencepiece.vocab_size == 512
  assert (sentencepiece.pad_id, sentencepiece.bos_id, sentencepiece.eos_id) == (0, 1, 2)
  texts = documents(data_config, "validation") + [UNICODE_TEXT, "\tif x:\n\t\treturn  1\n", "  "]
  for text in texts:
    ids = sentencepiece.encode(text)
    assert sentencepiece.decode([sentencepiece.bos_id, *ids, sentencepiece.eos_id]) == text
  source = "\n".join(texts[:-3])
  assert len(sentencepiece.encode(source)) < len(source.encode("utf-8")) / 1.5  # It compresses.
  assert len(sentencepiece.encode("        ")) <= 2  # Indentation has whitespace-only pieces.


def test_sentencepiece_is_cached_after_first_use(data_config, sentencepiece):
  sp_config = with_fields(data_config, tokenizer="sentencepiece")
  model_path = os.path.join(data_config.cache_dir, "tokenizers", "stdlib_tiny_512.model")
  modified = os.path.getmtime(model_path)
  reloaded = pipeline.get_tokenizer(sp_config)
  assert os.path.getmtime(model_path) == modified
  assert reloaded.encode(UNICODE_TEXT) == sentencepiece.encode(UNICODE_TEXT)


def test_failed_sentencepiece_training_leaves_no_model(tmp_path, monkeypatch):
  def crash_while_writing(model_prefix, **options):
    with open(model_prefix + ".model", "wb") as half_written:
      half_written.write(b"half a model")
    raise RuntimeError("killed while writing")

  monkeypatch.setattr(tokenizers.spm.SentencePieceTrainer, "train", crash_while_writing)
  model_path = tmp_path / "tokenizers" / "crashed_512.model"
  with pytest.raises(RuntimeError, match="killed while writing"):
    tokenizers.train_sentencepiece(["def f(x):\n    return x\n"], 512, str(model_path))
  assert os.listdir(model_path.parent) == []


def eval_batches(data_config, tokenizer, **kwargs):
  kwargs = dict(global_batch_size=4, process_index=0, process_count=1) | kwargs
  return list(pipeline.make_eval_iterator(data_config, tokenizer, **kwargs))


def segments(batches):
  """Every packed segment of every row: (inputs, targets, positions) arrays."""
  for batch in batches:
    for row in range(len(batch["inputs"])):
      ids = batch["segment_ids"][row]
      for segment in np.unique(ids[ids > 0]):
        mask = ids == segment
        yield batch["inputs"][row][mask], batch["targets"][row][mask], batch["positions"][row][mask]


@pytest.mark.parametrize("tokenizer_name", ["byte", "sentencepiece"])
def test_eval_pass_has_every_target_token_once(data_config, sentencepiece, tokenizer_name):
  tokenizer = {"byte": tokenizers.ByteTokenizer(), "sentencepiece": sentencepiece}[tokenizer_name]
  batches = eval_batches(data_config, tokenizer)
  expected = collections.Counter()
  for text in documents(data_config, "validation"):
    expected.update(tokenizer.encode(text) + [tokenizer.eos_id])  # tokens[1:]
  seen = collections.Counter()
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((4, 32), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    seen.update(batch["targets"][batch["segment_ids"] > 0].tolist())
  assert seen == expected
  for inputs, targets, _ in segments(batches):
    # A segment is one contiguous piece of one document: nothing is predicted across documents.
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    assert tokenizer.bos_id not in inputs[1:] and tokenizer.bos_id not in targets
    assert tokenizer.eos_id not in inputs and tokenizer.eos_id not in targets[:-1]


def test_rows_are_packed_segments_then_padding(data_config, tmp_path):
  rng = np.random.default_rng(0)
  for i in range(100):  # Documents of 0 to 3 chunks.
    (tmp_path / f"doc{i:03d}.txt").write_text("x" * rng.integers(0, 100))
  text_config = with_fields(data_config, source="text_dir", text_dir=str(tmp_path))
  tokenizer = tokenizers.ByteTokenizer()
  train = pipeline.make_train_iterator(text_config, tokenizer, global_batch_size=4, seed=1,
                                       process_index=0, process_count=1)
  batches = eval_batches(text_config, tokenizer, split="train") + [next(train) for _ in range(50)]
  rows_with_several_segments = 0
  for batch in batches:
    for row in range(len(batch["inputs"])):
      ids, positions = batch["segment_ids"][row], batch["positions"][row]
      used = np.count_nonzero(ids)
      assert np.all(ids[:used] > 0)
      for key in ("inputs", "targets", "segment_ids", "positions"):
        assert np.all(batch[key][row][used:] == 0)
      # Segment ids count up from 1; positions restart at 0 exactly where the id changes.
      starts = np.flatnonzero(np.diff(ids[:used], prepend=0))
      np.testing.assert_array_equal(ids[starts], np.arange(1, len(starts) + 1))
      expected_positions = np.arange(used) - np.repeat(starts, np.diff([*starts, used]))
      np.testing.assert_array_equal(positions[:used], expected_positions)
      rows_with_several_segments += len(starts) > 1
  assert rows_with_several_segments > 0


def test_train_iterator_resumes_exactly_from_its_state(data_config):
  def make():
    return pipeline.make_train_iterator(data_config, tokenizers.ByteTokenizer(),
                                        global_batch_size=4, seed=3, process_index=0,
                                        process_count=1)
  iterator = make()
  for _ in range(7):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # Checkpoints store it as JSON.
  expected = [next(iterator) for _ in range(10)]
  resumed = make()
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(10)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  fresh = next(make())
  assert not np.array_equal(fresh["inputs"], expected[0]["inputs"])


def test_processes_read_disjoint_records_that_cover_the_split(data_config, tmp_path,
                                                              monkeypatch):
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n")
  text_config = with_fields(data_config, source="text_dir", text_dir=str(tmp_path))
  all_documents = set(documents(text_config, "train"))
  read = collections.defaultdict(set)
  current_process = None
  get_record = pipeline.TextDirSource.__getitem__

  def recording_get_record(self, index):
    record = get_record(self, index)
    read[current_process].add(record["text"])
    return record

  monkeypatch.setattr(pipeline.TextDirSource, "__getitem__", recording_get_record)
  tokenizer = tokenizers.ByteTokenizer()
  seen = {}
  for current_process in (0, 1):
    batches = eval_batches(text_config, tokenizer, split="train", process_index=current_process,
                           process_count=2, global_batch_size=4)
    seen[current_process] = {tokenizer.decode(inputs) for inputs, _, _ in segments(batches)}
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == all_documents
  assert read[0] == seen[0] and read[1] == seen[1]


def test_tfds_source_reads_a_prepared_dataset_and_its_text_key(data_config):
  tfds_config = with_fields(data_config, source="tfds", tfds_name="stdlib_source/tiny")
  assert documents(tfds_config, "validation") == documents(data_config, "validation")
  paths = documents(with_fields(tfds_config, text_key="path"), "validation")
  assert all(path.endswith(".py") for path in paths)


def test_missing_tfds_dataset_is_a_clear_error(data_config, tmp_path):
  tfds_config = with_fields(data_config, source="tfds", tfds_name="no_such_dataset",
                            data_dir=str(tmp_path))
  with pytest.raises(config.ConfigError, match="'no_such_dataset'.*no such dataset"):
    pipeline.load_source(tfds_config, "train")
  with pytest.raises(config.ConfigError, match="'lm1b'.*not prepared"):
    pipeline.load_source(with_fields(tfds_config, tfds_name="lm1b"), "train")
  with pytest.raises(config.ConfigError, match="data_dir does not exist"):
    pipeline.load_source(with_fields(tfds_config, data_dir=str(tmp_path / "nope")), "train")
  with pytest.raises(ValueError, match="no split 'test'"):
    pipeline.load_source(data_config, "test")


def test_empty_text_dir_is_a_clear_error(data_config, tmp_path):
  text_config = with_fields(data_config, source="text_dir", text_dir=str(tmp_path))
  with pytest.raises(ValueError, match=f"text_dir '{tmp_path}' has no records in split 'train'"):
    pipeline.make_train_iterator(text_config, tokenizers.ByteTokenizer(), global_batch_size=4,
                                 seed=0, process_index=0, process_count=1)


def test_batch_not_divisible_by_processes_is_a_clear_error(data_config):
  with pytest.raises(ValueError, match="global batch size 5 does not divide evenly over 2"):
    eval_batches(data_config, tokenizers.ByteTokenizer(), global_batch_size=5, process_count=2)


def test_training_shuffles_shuffle_tokens_together(data_config, tmp_path):
  """Four documents of 2000 rows each, one letter each: a window of the fewest chunks holds
  only the first document's, so the first batch is all one letter; windows of
  `data.shuffle_tokens` covering the four mix them from the first batch on."""
  letters = "abcd"
  for letter in letters:
    (tmp_path / f"{letter}.txt").write_text(letter * 2000 * 32)
  text_config = with_fields(data_config, source="text_dir", text_dir=str(tmp_path))
  assert all(stdlib_corpus.split_of(f"{letter}.txt") == "train" for letter in letters)
  tokenizer = tokenizers.ByteTokenizer()

  def letters_in_first_batch(shuffle_tokens: int) -> set[str]:
    iterator = pipeline.make_train_iterator(
        with_fields(text_config, shuffle_tokens=shuffle_tokens), tokenizer,
        global_batch_size=16, seed=0, process_index=0, process_count=1)
    return set(tokenizer.decode(next(iterator)["targets"].ravel().tolist())) & set(letters)

  assert len(letters_in_first_batch(0)) == 1
  assert letters_in_first_batch(4 * 2000 * 32) == set(letters)


def test_negative_shuffle_tokens_is_a_clear_error(data_config):
  with pytest.raises(ValueError, match="data.shuffle_tokens=-1 must not be negative"):
    pipeline.make_train_iterator(with_fields(data_config, shuffle_tokens=-1),
                                 tokenizers.ByteTokenizer(), global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)

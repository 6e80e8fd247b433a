"""Tests of bGPT's data: the CPU simulator and evaluator, the media and ABC/MIDI datasets, the
byte row layout, and the byte pipeline's iterators and errors (tiny builds, seconds)."""
import collections
import io
import json
import struct
import wave

import numpy as np
import pytest

from llm_research import config
from llm_research.data import abc_midi, byte_datasets, byte_rows, cpu_states, media, pipeline
from llm_research.data.stdlib_corpus import split_of
from llm_research.data.tokenizers import RawByteTokenizer

PAD = byte_rows.PAD
OP = cpu_states.OPCODE
HALTED = (0, 0, 0, 0)  # the zero instruction after a program


def state(pc, accumulator, instruction, registers=None):
  values = [0] * 10
  for index, value in (registers or {}).items():
    values[index] = value
  return bytes([pc, accumulator, *instruction, *values])


def program(*instructions, memory_size=64):
  memory = b"".join(bytes([OP[name], *operands, *[0] * (3 - len(operands))])
                    for name, *operands in instructions)
  return memory + bytes(memory_size - len(memory))


# One program per instruction type: (instructions, its states worked out by hand as
# (pc after, accumulator, index of the executed instruction or None for the HALT after the
# program, registers)).
HAND_WORKED = {
    "HALT": ([("HALT",)], [(1, 0, 0, {})]),
    "LOADI": ([("LOADI", 3, 200)], [(1, 0, 0, {3: 200}), (2, 0, None, {3: 200})]),
    "MOV": ([("LOADI", 1, 7), ("MOV", 4, 1)],
            [(1, 0, 0, {1: 7}), (2, 0, 1, {1: 7, 4: 7}), (3, 0, None, {1: 7, 4: 7})]),
    "LDA": ([("LOADI", 2, 9), ("LDA", 2)],
            [(1, 0, 0, {2: 9}), (2, 9, 1, {2: 9}), (3, 9, None, {2: 9})]),
    "STA": ([("LDAI", 5), ("STA", 7)], [(1, 5, 0, {}), (2, 5, 1, {7: 5}), (3, 5, None, {7: 5})]),
    "LDAI": ([("LDAI", 255)], [(1, 255, 0, {}), (2, 255, None, {})]),
    "SWAP": ([("LOADI", 0, 1), ("LOADI", 9, 2), ("SWAP", 0, 9)],
             [(1, 0, 0, {0: 1}), (2, 0, 1, {0: 1, 9: 2}), (3, 0, 2, {0: 2, 9: 1}),
              (4, 0, None, {0: 2, 9: 1})]),
    "NOT": ([("LOADI", 1, 0x0F), ("NOT", 2, 1)],
            [(1, 0, 0, {1: 15}), (2, 0, 1, {1: 15, 2: 240}), (3, 0, None, {1: 15, 2: 240})]),
    "SHL": ([("LOADI", 1, 0x81), ("SHL", 2, 1, 1)],  # the top bit falls off
            [(1, 0, 0, {1: 129}), (2, 0, 1, {1: 129, 2: 2}), (3, 0, None, {1: 129, 2: 2})]),
    "SHR": ([("LOADI", 1, 0x81), ("SHR", 2, 1, 9)],  # 9 mod 8 = 1
            [(1, 0, 0, {1: 129}), (2, 0, 1, {1: 129, 2: 64}), (3, 0, None, {1: 129, 2: 64})]),
    "INC": ([("LOADI", 1, 255), ("INC", 1)],
            [(1, 0, 0, {1: 255}), (2, 0, 1, {1: 0}), (3, 0, None, {1: 0})]),
    "DEC": ([("DEC", 11)], [(1, 0, 0, {1: 255}), (2, 0, None, {1: 255})]),  # 11 mod 10 = 1
    "JMP": ([("JMP", 2), ("LOADI", 1, 1), ("LOADI", 2, 2)],
            [(2, 0, 0, {}), (3, 0, 2, {2: 2}), (4, 0, None, {2: 2})]),
    "JZ": ([("JZ", 1, 2), ("LOADI", 3, 3), ("LOADI", 1, 1), ("JZ", 1, 0)],  # taken, then not
           [(2, 0, 0, {}), (3, 0, 2, {1: 1}), (4, 0, 3, {1: 1}), (5, 0, None, {1: 1})]),
    "JNZ": ([("LOADI", 1, 1), ("JNZ", 1, 3), ("LOADI", 2, 2), ("JNZ", 2, 0)],
            [(1, 0, 0, {1: 1}), (3, 0, 1, {1: 1}), (4, 0, 3, {1: 1}), (5, 0, None, {1: 1})]),
}
# The two-operand arithmetic and logic: R3 = R1 op R2 with R1 = 200 (0b11001000), R2 = 100
# (0b01100100), worked out by hand.
for _name, _result in {"AND": 64, "OR": 236, "XOR": 172, "ADD": 44, "SUB": 100,
                       "MUL": 32}.items():
  HAND_WORKED[_name] = (
      [("LOADI", 1, 200), ("LOADI", 2, 100), (_name, 3, 1, 2)],
      [(1, 0, 0, {1: 200}), (2, 0, 1, {1: 200, 2: 100}), (3, 0, 2, {1: 200, 2: 100, 3: _result}),
       (4, 0, None, {1: 200, 2: 100, 3: _result})])


def test_hand_worked_programs_cover_every_instruction_type():
  assert set(HAND_WORKED) == set(cpu_states.OPCODES) and len(cpu_states.OPCODES) == 21


@pytest.mark.parametrize("name", cpu_states.OPCODES)
def test_simulator_matches_hand_worked_program(name):
  instructions, expected = HAND_WORKED[name]
  memory = program(*instructions)
  want = b"".join(
      state(pc, accumulator, HALTED if index is None else memory[4 * index:4 * index + 4],
            registers) for pc, accumulator, index, registers in expected)
  got = cpu_states.simulate(memory)
  assert [got[i:i + 16] for i in range(0, len(got), 16)] == [
      want[i:i + 16] for i in range(0, len(want), 16)]


def test_simulator_stops_at_the_step_cap_the_memory_end_and_unknown_opcodes():
  loop = program(("INC", 0), ("JMP", 0))
  states = cpu_states.simulate(loop, max_steps=7)
  assert len(states) == 7 * 16 and states[-16 + 6] == 4  # INC ran 4 times in 7 steps
  assert len(cpu_states.simulate(loop)) == cpu_states.default_max_steps(64) * 16
  full = program(*[("INC", 0)] * 16)
  states = cpu_states.simulate(full)
  assert len(states) == 16 * 16 and states[-16] == 16 and states[-16 + 6] == 16
  halt = cpu_states.simulate(program(("INC", 0), ("HALT",)))
  unknown = cpu_states.simulate(program(("INC", 0))[:4] + bytes([99, 0, 0, 0]) + bytes(56))
  assert len(unknown) == len(halt) == 32
  assert unknown[:18] == halt[:18] and unknown[22:] == halt[22:]
  assert unknown[18:22] == bytes([99, 0, 0, 0])  # the IR holds the unknown instruction


def test_the_machine_starts_from_the_initial_states_registers():
  initial = cpu_states.initial_state(7, [0, 200, 100, *range(3, 10)])
  assert initial == bytes([0, 7, 0, 0, 0, 0, 0, 200, 100, *range(3, 10)])
  memory = program(("ADD", 3, 1, 2), ("LDA", 9), ("STA", 0))
  got = cpu_states.simulate(memory, initial=initial)
  registers = [0, 200, 100, 44, *range(4, 10)]  # 200 + 100 wraps to 44
  want = [bytes([1, 7, *memory[:4], *registers]), bytes([2, 9, *memory[4:8], *registers]),
          bytes([3, 9, *memory[8:12], 9, *registers[1:]]),
          bytes([4, 9, *HALTED, 9, *registers[1:]])]
  assert [got[i:i + 16] for i in range(0, len(got), 16)] == want
  assert cpu_states.simulate(memory) == cpu_states.simulate(memory, initial=bytes(16))
  with pytest.raises(ValueError, match="initial state of 10 bytes"):
    cpu_states.simulate(memory, initial=bytes(10))


def test_programs_without_jumps_run_every_instruction_once_in_order():
  rng = np.random.default_rng(0)
  for _ in range(100):
    memory = cpu_states.random_program(rng, 8, 32, jumps=False)
    codes = memory[::4]
    count = next((i for i, code in enumerate(codes) if code == 0), len(codes))
    assert not {OP["JMP"], OP["JZ"], OP["JNZ"]} & set(codes[:count])
    initial = cpu_states.random_initial_state(rng)
    states = cpu_states.simulate(memory, initial=initial)
    pcs = list(states[::16])
    assert pcs == list(range(1, min(count + 1, 8) + 1))  # then the HALT, unless memory ends


def test_random_programs_are_deterministic_bounded_and_never_loop():
  def programs(seed, n=200, max_instructions=16, memory_size=64):
    rng = np.random.default_rng(seed)
    return [cpu_states.random_program(rng, max_instructions, memory_size) for _ in range(n)]

  first = programs(1)
  assert first == programs(1) and first != programs(2)
  lengths = collections.Counter()
  for memory in first + programs(3, n=20, max_instructions=256, memory_size=1024):
    instructions = [memory[i:i + 4] for i in range(0, len(memory), 4)]
    count = next((i for i, ins in enumerate(instructions) if ins[0] == 0), len(instructions))
    assert all(ins == bytes(4) for ins in instructions[count:])  # zeros after the program
    lengths[count] += 1
    for index, ins in enumerate(instructions[:count]):
      if ins[0] in (OP["JMP"], OP["JZ"], OP["JNZ"]):
        target = ins[1] if ins[0] == OP["JMP"] else ins[2]
        assert index < target <= count  # forward only
    states = cpu_states.simulate(memory)
    assert 1 <= len(states) // 16 <= count + 1  # each instruction at most once, then HALT
  assert min(lengths) == 1 and max(lengths) > 16


def test_evaluator_scores_perfect_and_corrupted_predictions():
  rng = np.random.default_rng(0)
  memories = [cpu_states.random_program(rng, 16, 64) for _ in range(20)]
  truths = [cpu_states.simulate(memory) for memory in memories]
  assert set(cpu_states.score_all(memories, truths).values()) == {1.0}
  memory, truth = memories[0], list(truths[0])
  corrupted = truth.copy()
  corrupted[-3] = (corrupted[-3] + 1) % 256  # a register of the last state
  corrupted[2] = (corrupted[2] + 1) % 256  # the IR of the first
  scores = cpu_states.score(memory, corrupted)
  states = len(truth) // 16
  assert scores["byte_accuracy"] == pytest.approx(1 - 2 / len(truth))
  assert scores["state_accuracy"] == pytest.approx(1 - min(2, states) / states)
  assert scores["PC_accuracy"] == scores["A_accuracy"] == 1.0
  assert scores["IR_accuracy"] == scores["registers_accuracy"] == pytest.approx(1 - 1 / states)
  initial = cpu_states.random_initial_state(rng)  # scored against the run from it
  from_initial = cpu_states.simulate(memory, initial=initial)
  assert cpu_states.score_all([memory], [from_initial], initials=[initial])["state_accuracy"] == 1
  assert cpu_states.score(memory, from_initial)["registers_accuracy"] < 1
  assert cpu_states.score(memory, truth[:16] + [PAD] * 4)["state_accuracy"] == pytest.approx(
      1 / states)
  pooled = cpu_states.score_all(memories[:2], [corrupted, truths[1]])
  assert 1 - 2 / (len(truth) + len(truths[1])) == pytest.approx(pooled["byte_accuracy"])


def test_row_layout_of_a_conversion_pair_by_hand():
  row = byte_rows.make_row([b"abcde", [120, 121]], seq_len=28, patch_size=4, label=3)
  a, b, c, d, e = b"abcde"
  expected = [a, b, c, d, e, PAD, PAD, PAD,  # input, padded to a patch
              PAD, PAD, PAD, PAD,  # separator
              120, 121, PAD, PAD,  # output, padded
              PAD, PAD, PAD, PAD]  # end patch
  expected += [PAD] * 8  # then padding to seq_len
  np.testing.assert_array_equal(row["inputs"], expected)
  np.testing.assert_array_equal(row["targets"], row["inputs"])
  np.testing.assert_array_equal(row["segment_ids"], [1] * 20 + [0] * 8)
  np.testing.assert_array_equal(row["positions"], np.arange(28))
  assert row["label"] == 3 and all(v.dtype == np.int32 for v in row.values())
  single = byte_rows.make_row([b"abcd"], seq_len=12, patch_size=4)
  np.testing.assert_array_equal(single["inputs"], [a, b, c, d] + [PAD] * 8)
  np.testing.assert_array_equal(single["segment_ids"], [1] * 8 + [0] * 4)
  assert "label" not in single
  cropped = byte_rows.make_row([b"abcdefghi", b"xy"], seq_len=16, patch_size=4)
  np.testing.assert_array_equal(cropped["inputs"], list(b"abcdefghi") + [PAD] * 7)  # no output
  np.testing.assert_array_equal(cropped["segment_ids"], [1] * 16)


def test_bad_bytes_are_clear_errors():
  for part, message in [([1, 300], "value 300 at byte 1"), (np.array([-1]), "value -1"),
                        ([0.5], "not bytes or a 1-D sequence of ints"), (b"", "empty")]:
    with pytest.raises(config.ConfigError, match=message):
      byte_rows.make_row([part], seq_len=32, patch_size=16)
  with pytest.raises(config.ConfigError, match=r"data.seq_len=100 .*model.patch_size=16"):
    byte_rows.check_lengths(100, 16)
  with pytest.raises(config.ConfigError, match=r"data.seq_len=16 leaves no room"):
    byte_rows.check_lengths(16, 16)


def test_raw_byte_tokenizer():
  tokenizer = RawByteTokenizer()
  text = "héllo 🙂\n"
  ids = tokenizer.encode(text)
  assert ids == list(text.encode("utf-8")) and tokenizer.vocab_size == 257
  assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.pad_id]) == text
  assert tokenizer.decode_bytes([0, 256, 255]) == bytes([0, 255])
  bytes_config = byte_config("cpu_states", "/nowhere", tokenizer="sentencepiece")
  assert isinstance(pipeline.get_tokenizer(bytes_config), RawByteTokenizer)
  assert pipeline.vocab_size(bytes_config) == 257


def byte_config(byte_dataset, data_dir, **fields):
  c = config.base_config().data
  c.update(dict(source="bytes", byte_dataset=byte_dataset, byte_config="tiny",
                data_dir=str(data_dir), seq_len=320) | fields)
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tensorflow_datasets")


def records(data_config, split):
  source = pipeline.load_source(data_config, split)
  return [source[i] for i in range(len(source))]


def batches(data_config, split="validation", **kwargs):
  kwargs = dict(global_batch_size=4, process_index=0, process_count=1) | kwargs
  return list(pipeline.make_eval_iterator(data_config, None, split=split, **kwargs))


def test_cpu_states_dataset_holds_programs_their_random_initial_state_and_their_states(data_dir):
  c = byte_config("cpu_states", data_dir)
  memories, initials = {}, set()
  for split in ("train", "validation", "test"):
    memories[split] = set()
    for example in records(c, split):
      (data,) = example["parts"]  # the prompt (memory, initial state), then the states
      memory, initial, states = bytes(data[:32]), bytes(data[32:48]), bytes(data[48:])
      assert initial[0] == 0 and initial[2:6] == bytes(4)  # PC 0, IR 0; A, R0..R9 random
      assert states == cpu_states.simulate(memory, initial=initial) and len(states) % 16 == 0
      assert not {OP["JMP"], OP["JZ"], OP["JNZ"]} & set(memory[::4])
      memories[split].add(memory)
      initials.add(initial)
  assert [len(memories[s]) for s in ("train", "validation", "test")] == [64, 16, 16]
  assert len(initials) == 96  # random: no two programs start from the same registers
  assert not (memories["train"] & memories["validation"] or memories["train"] & memories["test"]
              or memories["validation"] & memories["test"])


def test_train_iterator_yields_the_contracts_batches_and_resumes(data_dir):
  c = byte_config("cpu_states", data_dir)

  def make():
    return pipeline.make_train_iterator(c, None, global_batch_size=4, seed=3, process_index=0,
                                        process_count=1, patch_size=16)
  iterator = make()
  batch = next(iterator)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((4, 320), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  for row in range(4):
    used = int(batch["segment_ids"][row].sum())
    assert used % 16 == 0 and np.all(batch["segment_ids"][row][:used] == 1)
    np.testing.assert_array_equal(batch["inputs"][row][used - 16:], PAD)  # end patch, padding
    assert np.all(batch["inputs"][row][:48] < 256)  # the memory block and initial state
  for _ in range(20):  # past an epoch (64 examples)
    next(iterator)
  state_ = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  resumed = make()
  resumed.set_state(state_)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def test_eval_pass_has_every_example_once_and_padded_rows(data_dir):
  c = byte_config("digits_bmp", data_dir, seq_len=3200)
  examples = records(c, "validation")
  rows = batches(c, global_batch_size=6)
  assert all(batch["label"].shape == (6,) for batch in rows)
  labels = np.concatenate([batch["label"] for batch in rows])
  used = np.concatenate([batch["segment_ids"].any(axis=1) for batch in rows])
  assert used.sum() == len(examples) == 16 and not used[len(examples):].any()
  assert collections.Counter(labels[used].tolist()) == collections.Counter(
      e["label"] for e in examples)
  assert labels.max() < byte_datasets.BYTE_DATASETS["digits_bmp"].num_classes == 10


def test_digit_bmps_parse_back_to_the_digits(data_dir):
  c = byte_config("digits_bmp", data_dir, seq_len=3200)
  examples = records(c, "train")
  assert len({e["label"] for e in examples}) == 10
  from sklearn.datasets import load_digits
  digits = load_digits()
  for example in examples[:8]:
    data = bytes(example["parts"][0])
    magic, size, _, _, offset = struct.unpack("<2sIHHI", data[:14])
    header_size, width, height, planes, bits = struct.unpack("<IiiHH", data[14:30])
    assert (magic, size, offset, header_size) == (b"BM", len(data), 54, 40)
    assert (width, height, planes, bits) == (32, 32, 1, 24)
    pixels = np.frombuffer(data[54:], np.uint8).reshape(32, 32, 3)[::-1, :, 0]  # top-down
    small = pixels[::4, ::4]
    assert np.all(pixels == np.kron(small, np.ones((4, 4), np.uint8)))
    ink = np.round(16 - small / 255 * 16)
    matches = [i for i in np.flatnonzero(digits.target == example["label"])
               if np.array_equal(digits.images[i], ink)]
    assert matches  # it is one of the digits of its label
  image = pytest.importorskip("PIL.Image").open(io.BytesIO(bytes(examples[0]["parts"][0])))
  assert image.size == (32, 32) and image.mode == "RGB"


def test_wav_clips_parse_with_wave_and_their_labels_mean_waveforms(data_dir):
  c = byte_config("wav_tones", data_dir, seq_len=2064)
  examples = records(c, "train")
  assert {e["label"] for e in examples} == set(range(len(media.WAVEFORMS)))
  for example in examples:
    with wave.open(io.BytesIO(bytes(example["parts"][0]))) as clip:
      assert (clip.getnchannels(), clip.getsampwidth(), clip.getframerate()) == (1, 1, 8000)
      assert 800 <= clip.getnframes() <= 2000
      levels = len(set(clip.readframes(clip.getnframes())))
    assert (levels <= 2) == (media.WAVEFORMS[example["label"]] == "square")
  assert next(iter(batches(c, split="train")))["label"].dtype == np.int32


def test_small_builds_hold_8x8_digits_and_short_clips(data_dir):
  from sklearn.datasets import load_digits
  digits = load_digits()
  for example in records(byte_config("digits_bmp", data_dir, byte_config="8x8"), "train")[:8]:
    data = bytes(example["parts"][0])
    assert len(data) == 246 and struct.unpack("<ii", data[18:26]) == (8, 8)
    ink = np.round(16 - np.frombuffer(data[54:], np.uint8).reshape(8, 8, 3)[::-1, :, 0] / 255 * 16)
    assert any(np.array_equal(digits.images[i], ink)
               for i in np.flatnonzero(digits.target == example["label"]))
  for example in records(byte_config("wav_tones", data_dir, byte_config="short"), "validation"):
    with wave.open(io.BytesIO(bytes(example["parts"][0]))) as clip:
      assert 160 <= clip.getnframes() <= 240  # 20-30 ms at 8 kHz


@pytest.mark.parametrize("dataset,base", [("digits_bmp", "8x8"), ("wav_tones", "short")])
def test_labelled_subsets_draw_n_of_each_class_from_their_base(data_dir, dataset, base):
  def split(config, name):
    return [(bytes(e["parts"][0]), e["label"])
            for e in records(byte_config(dataset, data_dir, byte_config=config), name)]
  train = set(split(base, "train"))
  draws = [split(f"{base}_10_s{seed}", "train") for seed in (0, 1)]
  classes = byte_datasets.BYTE_DATASETS[dataset].num_classes
  for draw in draws:
    assert collections.Counter(label for _, label in draw) == {c: 10 for c in range(classes)}
    assert set(draw) <= train
  assert set(draws[0]) != set(draws[1])  # the seed draws
  assert split(f"{base}_10_s0", "validation") == split(base, "validation")


def test_abc_midi_pairs_in_both_directions(data_dir):
  c = byte_config("abc_to_midi", data_dir, seq_len=8192)
  tunes = dict(abc_midi.corpus_tunes())
  pairs = records(c, "train")
  assert len(pairs) >= 12
  for pair in pairs:
    abc, midi = (bytes(part) for part in pair["parts"])
    assert midi.startswith(b"MThd") and abc.startswith(b"X:")
    assert abc.decode("utf-8") in tunes.values()
  reverse = records(byte_config("midi_to_abc", data_dir, seq_len=8192), "train")
  assert [[bytes(p) for p in r["parts"]] for r in reverse] == [
      [bytes(p) for p in pair["parts"]][::-1] for pair in pairs]
  batch = next(iter(batches(c, split="train")))
  abc, midi = (bytes(part) for part in pairs[0]["parts"])
  row = batch["inputs"][0]
  start = -(-len(abc) // 16) * 16 + 16  # after the ABC patches and the separator
  assert bytes(row[:len(abc)].tolist()) == abc and np.all(row[len(abc):start] == PAD)
  assert bytes(row[start:start + 4].tolist()) == b"MThd"


def write_files(directory, lengths):
  """Files of the given lengths, named so that each falls in the train split."""
  names = (f"file{i}.bin" for i in range(1000))
  for length in lengths:
    name = next(n for n in names if split_of(n) == "train")
    (directory / name).write_bytes((np.arange(length) % 251).astype(np.uint8).tobytes())


def test_long_files_are_cropped_with_a_warning_that_counts_them(tmp_path):
  write_files(tmp_path, [10, 48, 49, 100, 3])
  c = byte_config("files", "/unused", byte_dir=str(tmp_path), seq_len=64)
  with pytest.warns(UserWarning, match=r"2 of 5 examples of split 'train'.* are cropped"):
    rows = batches(c, split="train", global_batch_size=5, patch_size=16)
  (batch,) = rows
  lengths = batch["segment_ids"].sum(axis=1)
  assert sorted(lengths.tolist()) == [32, 32, 64, 64, 64]
  for row in batch["inputs"][lengths == 64]:  # 48 bytes (whole or cropped), the end patch
    np.testing.assert_array_equal(row[:48], np.arange(48) % 251)
    np.testing.assert_array_equal(row[48:], PAD)


def test_bad_byte_inputs_are_clear_errors(tmp_path, monkeypatch):
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  c = byte_config("files", "/unused", byte_dir=str(empty_dir), seq_len=64)
  with pytest.raises(config.ConfigError, match="byte_dir .* has no records in split 'train'"):
    batches(c, split="train")
  write_files(empty_dir, [10, 0])
  with pytest.raises(config.ConfigError, match=r"file\d+.bin in data.byte_dir .* empty file"):
    batches(c, split="train")
  with pytest.raises(config.ConfigError, match=r"data.seq_len=100 .*model.patch_size=16"):
    pipeline.make_train_iterator(byte_config("files", "/unused", byte_dir=str(empty_dir),
                                             seq_len=100), None, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1, patch_size=16)
  with pytest.raises(config.ConfigError, match="unknown data.byte_dataset 'nope'"):
    batches(byte_config("nope", tmp_path))
  with pytest.raises(config.ConfigError, match="data.byte_config='huge'"):
    batches(byte_config("cpu_states", tmp_path, byte_config="huge"))
  custom = [{"parts": [[1, 2, 3]]}, {"parts": [[1, 256]]}]
  monkeypatch.setattr(pipeline, "load_source", lambda *_: custom)
  with pytest.raises(config.ConfigError, match="value 256 at byte 1"):
    batches(byte_config("cpu_states", tmp_path), split="train", global_batch_size=2)


def test_short_tunes_keep_their_first_bars_and_midi_fields():
  abc = ("X:7\nT:A title\nM:3/4\nL:1/8\n% a comment\nK:G\nD2|G2 B2 d2|c2 A2 F2 % end\n"
         "w: words\nG6|]\n")
  assert abc_midi.short_tune(abc, 2) == "X:1\nM:3/4\nL:1/8\nK:G\nD2|G2 B2 d2|\n"
  assert abc_midi.short_tune(abc, 9) == "X:1\nM:3/4\nL:1/8\nK:G\nD2|G2 B2 d2|c2 A2 F2\nG6|]\n"
  assert abc_midi.to_midi(abc_midi.short_tune(abc, 2)).startswith(b"MThd")


def test_abc_and_midi_alone_are_the_conversions_parts(data_dir):
  pairs = records(byte_config("abc_to_midi", data_dir, seq_len=8192), "train")
  for alone, index in (("abc", 0), ("midi", 1)):
    examples = records(byte_config(alone, data_dir, seq_len=8192), "train")
    assert [[bytes(p) for p in e["parts"]] for e in examples] == [
        [bytes(pair["parts"][index])] for pair in pairs]

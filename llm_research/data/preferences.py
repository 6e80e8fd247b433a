"""Preference pairs for DPO (`data.source='preferences'`): (prompt, chosen, rejected) records,
their sources, and rows that pack a pair's two sequences side by side.

Sources (`data.preference_dataset`):
  cpu_states  pairs built here, on the fly from their index (no files), with bGPT's CPU
              simulator (cpu_states.py): the prompt is a program of 1 to MAX_INSTRUCTIONS
              instructions and the states it has run through so far, as hex text
              (`format_program`, `format_state`); "chosen" is the next state as the simulator
              computes it; "rejected" is that state with the values the instruction changed
              (the accumulator, registers) wrong: left at their previous values (the
              instruction not applied) or, for every other pair, replaced by random ones; where
              the instruction changes none, one random register is wrong. Chosen is right and
              rejected wrong by construction. Train and validation draw from different seeds.
  jsonl       a user's pairs: the file `data.preference_file`, one JSON object a line with
              string fields "prompt", "chosen" and "rejected" (others are ignored); a pair goes
              to 'train' or 'validation' (about 5%) by a hash of its prompt, as text_dir splits
              files by path, so a prompt is never in both.
A record is {"prompt", "chosen", "rejected", "text"}: `text`, the prompt and the chosen
response, is what a SentencePiece tokenizer trains on and what the model's own objective reads.

Rows. A pair becomes two sequences, [bos] + prompt + response + [eos] for each response (prompt
and responses tokenized apart), cut into inputs (all but the last token) and targets (all but
the first), as the pipeline's chunks. `response` is 1 at the targets that are the response's
tokens (its eos included) and 0 at the prompt's: the prompt is masked out of the loss. A pair
longer than a row keeps bos and the end of its prompt, and a response longer than a row keeps
its start; both sequences see the same prompt. Pairs are packed first-fit into rows of seq_len
with both sequences side by side: pair j of row i is segment j of row i in the chosen arrays
and in the rejected ones. A batch is int32 [local_batch, seq_len]:

  inputs, targets, segment_ids, positions   the chosen sequences: the model's own objective (a
                                            `standard` run, evaluation) reads the chosen texts,
                                            prompt included
  response                                  1 at the chosen response's targets
  rejected_inputs, rejected_targets, rejected_segment_ids, rejected_positions,
  rejected_response                         the rejected sequences, likewise

A pair lies within one row, so a micro-batch of rows (train.grad_accum) and a device's shard of
them (the batch axes) hold whole pairs.
"""
import json
import zlib

import grain
import numpy as np

from llm_research.data import cpu_states, stdlib_corpus
from llm_research.data.tokenizers import Tokenizer
from llm_research.errors import ConfigError

DATASETS = ("cpu_states", "jsonl")
# The cpu_states pairs: programs of 1 to MAX_INSTRUCTIONS instructions in a memory that holds
# just them; pairs per split (generated from their index, so any number costs nothing).
MAX_INSTRUCTIONS = 4
MEMORY_BYTES = MAX_INSTRUCTIONS * cpu_states.INSTRUCTION_BYTES
CPU_STATE_PAIRS = {"train": 200_000, "validation": 1_000}
_SPLIT_SEEDS = {"train": 0, "validation": 1}
# The state bytes an instruction may change besides the PC: A and R0..R9 (IR is the program's).
_VALUE_BYTES = (1, *range(6, cpu_states.STATE_BYTES))
KEYS = ("inputs", "targets", "segment_ids", "positions", "response")
REJECTED = "rejected_"


def format_program(memory: bytes) -> str:
  """The memory block as hex, one 8-digit group per instruction: '0d010203 10050000'."""
  step = cpu_states.INSTRUCTION_BYTES
  return " ".join(memory[i:i + step].hex() for i in range(0, len(memory), step))


def format_state(state: bytes) -> str:
  """A 16-byte state as 'PC A IR R0..R9' in hex, then a newline: '01 00 0d010203 0000...\\n'."""
  return f"{state[0:1].hex()} {state[1:2].hex()} {state[2:6].hex()} {state[6:].hex()}\n"


def parse_state(text: str) -> bytes | None:
  """The state `format_state` wrote at the start of `text`, or None if it is not one."""
  try:
    state = bytes.fromhex(text.split("\n", 1)[0].replace(" ", ""))
  except ValueError:
    return None
  return state if len(state) == cpu_states.STATE_BYTES else None


class CpuStatePairs:
  """The cpu_states pairs of one split, by index (the module docstring)."""

  def __init__(self, split: str):
    self._seed = _SPLIT_SEEDS[split]
    self._size = CPU_STATE_PAIRS[split]

  def __len__(self) -> int:
    return self._size

  def case(self, index: int) -> tuple[bytes, list[bytes], int]:
    """(memory, its states, the step k of the pair): the prompt shows states[:k], chosen is
    states[k]."""
    rng = np.random.default_rng([self._seed, index])
    memory = cpu_states.random_program(rng, MAX_INSTRUCTIONS, MEMORY_BYTES)
    trace = cpu_states.simulate(memory)
    size = cpu_states.STATE_BYTES
    states = [trace[i:i + size] for i in range(0, len(trace), size)]
    return memory, states, int(rng.integers(len(states)))

  def __getitem__(self, index: int) -> dict:
    memory, states, k = self.case(index)
    rng = np.random.default_rng([self._seed, index, 1])
    chosen = states[k]
    before = states[k - 1] if k else bytes(cpu_states.STATE_BYTES)  # all 0 at the start
    changed = [i for i in _VALUE_BYTES if chosen[i] != before[i]]
    rejected = bytearray(chosen)
    if changed and index % 2 == 0:  # the instruction not applied
      for i in changed:
        rejected[i] = before[i]
    else:  # random wrong values where it changed something, else in one random register
      for i in changed or [int(rng.choice(_VALUE_BYTES))]:
        rejected[i] = (chosen[i] + int(rng.integers(1, 256))) % 256
    prompt = format_program(memory) + "\n" + "".join(map(format_state, states[:k]))
    return _record(prompt, format_state(chosen), format_state(bytes(rejected)))


class JsonlPairs:
  """One split of a JSONL file of pairs (the module docstring)."""

  def __init__(self, path: str, split: str):
    try:
      with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    except OSError as error:
      raise ConfigError(f"data.preference_file {path!r} cannot be read: "
                        f"{error.strerror or error}") from None
    self._records = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      where = f"data.preference_file {path!r}, line {number}"
      try:
        pair = json.loads(line)
      except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not JSON: {error.msg}") from None
      if not (isinstance(pair, dict) and all(
          isinstance(pair.get(k), str) for k in ("prompt", "chosen", "rejected"))):
        raise ConfigError(f'{where} is not an object with string fields "prompt", "chosen" '
                          'and "rejected"')
      if stdlib_corpus.split_of(pair["prompt"]) == split:
        self._records.append(_record(pair["prompt"], pair["chosen"], pair["rejected"]))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._records[index]


def _record(prompt: str, chosen: str, rejected: str) -> dict:
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "text": prompt + chosen}


def load(data_config, split: str):
  """(the split's random-access source of records, its description)."""
  name = data_config.preference_dataset
  if name == "cpu_states":
    return CpuStatePairs(split), "preference_dataset 'cpu_states'"
  if name == "jsonl":
    path = data_config.preference_file
    return JsonlPairs(path, split), f"data.preference_file {path!r}"
  raise ConfigError(f"data.preference_dataset={name!r} is not one of {DATASETS}")


def source_name(data_config) -> str:
  """A file-name-safe name of the configured pairs (for a tokenizer's cache)."""
  if data_config.preference_dataset == "jsonl":
    path = data_config.preference_file
    return f"preferences_jsonl_{zlib.crc32(path.encode()):08x}"
  return f"preferences_{data_config.preference_dataset}"


def pair_example(record: dict, tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """A record -> the unpacked arrays of both its sequences (KEYS but segment_ids and
  positions, the rejected ones prefixed REJECTED), cropped to seq_len as the docstring says."""
  responses = [[*tokenizer.encode(record[k]), tokenizer.eos_id][:seq_len]
               for k in ("chosen", "rejected")]
  prompt = tokenizer.encode(record["prompt"])
  prompt = [tokenizer.bos_id, *prompt[max(0, len(prompt) + max(map(len, responses)) - seq_len):]]
  example = {}
  for prefix, response in zip(("", REJECTED), responses):
    sequence = np.array([*prompt, *response], np.int32)
    mask = np.zeros(len(sequence) - 1, np.int32)
    mask[len(prompt) - 1:] = 1
    example.update({prefix + "inputs": sequence[:-1], prefix + "targets": sequence[1:],
                    prefix + "response": mask})
  return example


def packed_pairs(records: grain.IterDataset, tokenizer: Tokenizer, seq_len: int, *,
                 num_bins: int) -> grain.IterDataset:
  """Records -> rows of packed pairs (the module docstring), first-fit over `num_bins` rows."""
  examples = records.map(lambda record: pair_example(record, tokenizer, seq_len))
  lengths = {prefix + k: seq_len for prefix in ("", REJECTED)
             for k in ("inputs", "targets", "response")}
  packed = grain.experimental.FirstFitPackIterDataset(
      examples, length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False)
  # A pair's two sequences have a segment in the same bin, so the same segment id; positions
  # and segment ids of inputs, targets and response are equal (equal lengths).
  return packed.map(lambda row: {
      prefix + k: row[prefix + (k if k in ("inputs", "targets", "response") else "inputs_" + k)]
      for prefix in ("", REJECTED) for k in KEYS})

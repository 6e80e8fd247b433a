"""bGPT's simplified CPU: simulator, random program generator and the state evaluator.

A program lives in a memory block of `memory_size` bytes (the paper: 1 KB, the most a one-byte
PC can address) as 4-byte
instructions `[opcode, a, b, c]`, instruction i at bytes 4i..4i+3; the bytes after the program
are 0 (HALT). The machine has a program counter (PC, an instruction index), an accumulator (A)
and 10 general registers R0..R9, all 8-bit; arithmetic wraps mod 256. A and R0..R9 start at the
values of an initial state (`initial_state`: 0 by default; `random_initial_state` draws them, as
the paper's programs start from random registers, which a model is then given in its prompt).

Execution starts at PC 0. Each step fetches the instruction at PC into the instruction register
(IR), executes it and records a 16-byte state (the initial state has the same layout: PC 0, its
A, IR 0 0 0 0, its registers):

  byte 0      PC after the step: the next instruction's index, mod 256 (after a HALT at i: i + 1)
  byte 1      A
  bytes 2-5   IR: the executed instruction's 4 bytes
  bytes 6-15  R0..R9

It stops after recording the state of a HALT, when PC leaves the memory (a jump past it, or the
step after its last instruction), or after `max_steps` states (default: one per instruction slot
of the memory plus one). The 21 instruction types (operands a, b, c; register operands, R[.],
are taken mod 10, shift counts mod 8; unused operands are ignored; an opcode above 20 halts like
HALT):

  0  HALT               stop (the memory's zero bytes after a program halt it)
  data movement:  1 LOADI  R[a] = b        2 MOV   R[a] = R[b]     3 LDA  A = R[a]
                  4 STA    R[a] = A        5 LDAI  A = a           6 SWAP R[a] <-> R[b]
  logic:          7 AND    R[a] = R[b] & R[c]    8 OR  R[a] = R[b] | R[c]
                  9 XOR    R[a] = R[b] ^ R[c]   10 NOT R[a] = ~R[b]
                 11 SHL    R[a] = R[b] << c     12 SHR R[a] = R[b] >> c
  arithmetic:    13 ADD    R[a] = R[b] + R[c]   14 SUB R[a] = R[b] - R[c]
                 15 MUL    R[a] = R[b] * R[c]   16 INC R[a] += 1    17 DEC R[a] -= 1
  jumps:         18 JMP    PC = a               19 JZ  PC = b if R[a] == 0
                 20 JNZ    PC = b if R[a] != 0

A training example (byte_datasets.py, `cpu_states`) is the memory block, the initial state, then
the states. `random_program` draws 1 to `max_instructions` instructions of uniformly random types
other than HALT (the zeros after the program halt it, so most of a program runs), with valid
operands; its jumps go forward only (to a later instruction or just past the program), so a
generated program never loops: at most one step per instruction, then the HALT after it. With
`jumps=False` it draws no jump at all (straight-line programs): every instruction
then runs exactly once, in order.
`score` re-simulates a program and compares a model's predicted states with the true ones, whole
states, bytes, and each field (`FIELDS`: PC, A, IR, registers) state by state.
"""
import dataclasses
import operator
from typing import Sequence

import numpy as np

NUM_REGISTERS = 10
STATE_BYTES = 16
INSTRUCTION_BYTES = 4
OPCODES = ("HALT", "LOADI", "MOV", "LDA", "STA", "LDAI", "SWAP", "AND", "OR", "XOR", "NOT", "SHL",
           "SHR", "ADD", "SUB", "MUL", "INC", "DEC", "JMP", "JZ", "JNZ")
OPCODE = {name: code for code, name in enumerate(OPCODES)}
MAX_MEMORY_BYTES = 256 * INSTRUCTION_BYTES  # a PC is one byte
# A state's fields (byte ranges), each scored on its own: is the whole field right.
FIELDS = {"PC": slice(0, 1), "A": slice(1, 2), "IR": slice(2, 6),
          "registers": slice(6, STATE_BYTES)}
# Operand positions of each opcode by kind (the generator draws each kind from its range).
_REGISTER_OPERANDS = {
    "LOADI": (0,), "MOV": (0, 1), "LDA": (0,), "STA": (0,), "SWAP": (0, 1), "AND": (0, 1, 2),
    "OR": (0, 1, 2), "XOR": (0, 1, 2), "NOT": (0, 1), "SHL": (0, 1), "SHR": (0, 1),
    "ADD": (0, 1, 2), "SUB": (0, 1, 2), "MUL": (0, 1, 2), "INC": (0,), "DEC": (0,), "JZ": (0,),
    "JNZ": (0,)}
_IMMEDIATE_OPERANDS = {"LOADI": (1,), "LDAI": (0,)}
_SHIFT_OPERANDS = {"SHL": (2,), "SHR": (2,)}
_TARGET_OPERAND = {"JMP": 0, "JZ": 1, "JNZ": 1}
_BINARY = {"AND": operator.and_, "OR": operator.or_, "XOR": operator.xor, "ADD": operator.add,
           "SUB": operator.sub, "MUL": operator.mul}


def default_max_steps(memory_size: int) -> int:
  """One step per instruction slot of the memory, plus one."""
  return memory_size // INSTRUCTION_BYTES + 1


def initial_state(accumulator: int = 0,
                  registers: Sequence[int] = (0,) * NUM_REGISTERS) -> bytes:
  """The state before the first step (PC 0, IR 0 0 0 0), in the states' layout: a model reads
  it in its prompt as it reads every state after it."""
  return bytes([0, accumulator, 0, 0, 0, 0, *registers])


def random_initial_state(rng: np.random.Generator) -> bytes:
  """An initial state with A and R0..R9 uniformly random (the paper's random registers)."""
  return initial_state(int(rng.integers(256)), rng.integers(256, size=NUM_REGISTERS).tolist())


def simulate(memory: bytes, max_steps: int | None = None, initial: bytes | None = None) -> bytes:
  """The states (STATE_BYTES each, concatenated) of running the program in `memory` from the
  A and registers of `initial` (an `initial_state`; default: all 0)."""
  if len(memory) % INSTRUCTION_BYTES or not 0 < len(memory) <= MAX_MEMORY_BYTES:
    raise ValueError(f"memory of {len(memory)} bytes is not 1 to 256 instructions of "
                     f"{INSTRUCTION_BYTES} bytes")
  initial = initial_state() if initial is None else initial
  if len(initial) != STATE_BYTES:
    raise ValueError(f"an initial state of {len(initial)} bytes, not {STATE_BYTES}")
  slots = len(memory) // INSTRUCTION_BYTES
  max_steps = default_max_steps(len(memory)) if max_steps is None else max_steps
  pc, accumulator, registers = 0, initial[FIELDS["A"]][0], list(initial[FIELDS["registers"]])
  states = bytearray()
  while len(states) < max_steps * STATE_BYTES and pc < slots:
    instruction = memory[pc * INSTRUCTION_BYTES:(pc + 1) * INSTRUCTION_BYTES]
    code, a, b, c = instruction
    name = OPCODES[code] if code < len(OPCODES) else "HALT"
    ra, rb, rc = a % NUM_REGISTERS, b % NUM_REGISTERS, c % NUM_REGISTERS
    pc += 1
    if name == "LOADI":
      registers[ra] = b
    elif name == "MOV":
      registers[ra] = registers[rb]
    elif name == "LDA":
      accumulator = registers[ra]
    elif name == "STA":
      registers[ra] = accumulator
    elif name == "LDAI":
      accumulator = a
    elif name == "SWAP":
      registers[ra], registers[rb] = registers[rb], registers[ra]
    elif name in _BINARY:
      registers[ra] = _BINARY[name](registers[rb], registers[rc]) % 256
    elif name == "NOT":
      registers[ra] = 255 - registers[rb]
    elif name == "SHL":
      registers[ra] = (registers[rb] << (c % 8)) % 256
    elif name == "SHR":
      registers[ra] = registers[rb] >> (c % 8)
    elif name == "INC":
      registers[ra] = (registers[ra] + 1) % 256
    elif name == "DEC":
      registers[ra] = (registers[ra] - 1) % 256
    elif name == "JMP":
      pc = a
    elif (name == "JZ" and registers[ra] == 0) or (name == "JNZ" and registers[ra] != 0):
      pc = b
    states += bytes([pc % 256, accumulator, *instruction, *registers])
    if name == "HALT":
      break
  return bytes(states)


def random_program(rng: np.random.Generator, max_instructions: int, memory_size: int,
                   jumps: bool = True) -> bytes:
  """A memory block holding 1 to `max_instructions` random instructions, then zeros (HALT);
  forward jumps among them unless `jumps` is False."""
  slots = memory_size // INSTRUCTION_BYTES
  if (memory_size % INSTRUCTION_BYTES or memory_size > MAX_MEMORY_BYTES
      or not 1 <= max_instructions <= slots):
    raise ValueError(f"{max_instructions} instructions do not fit a {memory_size}-byte memory "
                     f"(at most {MAX_MEMORY_BYTES} bytes, a multiple of {INSTRUCTION_BYTES})")
  count = int(rng.integers(1, max_instructions + 1))
  memory = bytearray(memory_size)
  last_target = min(count, 255)  # Just past the program at most (a PC is one byte).
  for index in range(count):
    # Not HALT; no jump where no later instruction index fits a byte (the 256th of 256).
    names = OPCODES[1:] if jumps and index < last_target else OPCODES[1:OPCODE["JMP"]]
    name = names[rng.integers(len(names))]
    operands = [0, 0, 0]
    for position in _REGISTER_OPERANDS.get(name, ()):
      operands[position] = int(rng.integers(NUM_REGISTERS))
    for position in _IMMEDIATE_OPERANDS.get(name, ()):
      operands[position] = int(rng.integers(256))
    for position in _SHIFT_OPERANDS.get(name, ()):
      operands[position] = int(rng.integers(8))
    if name in _TARGET_OPERAND:  # forward only: programs never loop
      operands[_TARGET_OPERAND[name]] = int(rng.integers(index + 1, last_target + 1))
    start = index * INSTRUCTION_BYTES
    memory[start:start + INSTRUCTION_BYTES] = bytes([OPCODE[name], *operands])
  return bytes(memory)


@dataclasses.dataclass
class Score:
  """Matches of predicted states against the true ones: bytes, whole states, and per field
  (`FIELDS`) the states whose field is wholly right."""

  correct_bytes: int = 0
  total_bytes: int = 0
  correct_states: int = 0
  total_states: int = 0
  correct_fields: dict[str, int] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(FIELDS, 0))

  def add(self, other: "Score") -> "Score":
    return Score(self.correct_bytes + other.correct_bytes, self.total_bytes + other.total_bytes,
                 self.correct_states + other.correct_states,
                 self.total_states + other.total_states,
                 {name: self.correct_fields[name] + other.correct_fields[name] for name in FIELDS})

  def as_dict(self) -> dict[str, float]:
    """{'byte_accuracy', 'state_accuracy', '<field>_accuracy' for each of FIELDS}."""
    states = max(self.total_states, 1)
    return {"byte_accuracy": self.correct_bytes / max(self.total_bytes, 1),
            "state_accuracy": self.correct_states / states,
            **{f"{name}_accuracy": count / states for name, count in self.correct_fields.items()}}


def count_matches(memory: bytes, predicted_states: Sequence[int], max_steps: int | None = None,
                  initial: bytes | None = None) -> Score:
  """How many bytes, states and fields of `predicted_states` equal the program's true states
  (run from `initial`, as `simulate`).

  Predicted values are ints (a model's 256, or anything outside 0..255, never matches); a
  prediction shorter than the truth misses the rest, bytes past the truth's end are ignored.
  """
  truth = np.frombuffer(simulate(memory, max_steps, initial), np.uint8).astype(np.int64)
  predicted = np.full(len(truth), -1, np.int64)
  given = np.asarray(list(predicted_states)[:len(truth)], np.int64)
  predicted[:len(given)] = given
  same = (predicted == truth).reshape(-1, STATE_BYTES)  # [states, STATE_BYTES]
  return Score(int(same.sum()), same.size, int(same.all(axis=1).sum()), len(same),
               {name: int(same[:, span].all(axis=1).sum()) for name, span in FIELDS.items()})


def score(memory: bytes, predicted_states: Sequence[int], max_steps: int | None = None,
          initial: bytes | None = None) -> dict[str, float]:
  """`Score.as_dict` of one program's predicted states, each accuracy in [0, 1]."""
  return count_matches(memory, predicted_states, max_steps, initial).as_dict()


def score_all(memories: Sequence[bytes], predictions: Sequence[Sequence[int]],
              max_steps: int | None = None,
              initials: Sequence[bytes] | None = None) -> dict[str, float]:
  """Accuracies over many programs (each run from its `initials` entry; default all 0), pooled
  over all their bytes and states."""
  initials = [None] * len(memories) if initials is None else initials
  total = Score()
  for memory, predicted, initial in zip(memories, predictions, initials, strict=True):
    total = total.add(count_matches(memory, predicted, max_steps, initial))
  return total.as_dict()

"""TFDS builders of bGPT's byte datasets, generated locally (nothing is downloaded).

Each is built into `data.data_dir` on first use by the pipeline (`data.source="bytes"`,
`data.byte_dataset`, `data.byte_config`; see pipeline.py), deterministically: the same config
gives the same bytes on every machine (music21's MIDI writer aside, for ABC/MIDI). Byte fields
are uint8 vectors. `BYTE_DATASETS` maps each `data.byte_dataset` to its builder and to how a
record becomes an example: a list of parts (one file, or a conversion's input and output) and,
for labelled data, a label.

| builder (configs)                           | splits                  | record                  |
|---------------------------------------------|-------------------------|-------------------------|
| `cpu_states` (tiny, short_*, 1k-100k, full) | train, validation, test | memory, initial, states |
| `abc_midi` (tiny, full, short)              | train, validation       | abc, midi, id           |
| `digits_bmp` (tiny, full, 8x8, 8x8_*)       | train, validation       | bytes, label            |
| `wav_tones` (tiny, full, short, short_*)    | train, validation       | bytes, label            |

- cpu_states (cpu_states.py): random programs, their initial states and their states; an
  example is the memory block, the initial state (the prompt), then the states. Configs of one
  family share one validation and test set, with no program (memory block) in two splits, and
  are nested (a smaller one holds the first programs a larger one draws).
  `short_300`, `short_3k`, `short_30k`: random registers given in the prompt and
  straight-line programs, at a size a small model can learn: 300, 3000, 30000 train programs
  of 1 to 8 instructions in a 32-byte memory, no jumps, A and R0..R9 starting random (given in
  the initial state); 200 validation, 500 test programs; an example of at most
  32 + 16 + 8 * 16 = 176 bytes (a program of 8 instructions runs off the memory's end: no HALT
  state). `tiny`: the same programs, 64 / 16 / 16 of them, for tests. `full` is the paper's
  size: 1 KB memory, 1 to 256 instructions, no jumps, random registers, 10^4 programs
  (examples up to 1024 + 16 + 256 * 16 bytes).
  `1k`, `10k`, `100k` (the first experiment's) are 10^3, 10^4, 10^5 train programs of 1 to 16
  instructions in a 64-byte memory, forward jumps, registers starting at 0 (an example of at
  most 64 + 16 + 16 * 16 = 336 bytes); 200 validation, 1000 test programs.
  Builds in under a second (tiny, short_300, short_3k, 1k), 2-3 s (10k, short_30k), 13 s
  (100k) on one core; `full` (its programs run every instruction: no jumps) took 76 s on a
  2-core machine under a load of 9.
- abc_midi (abc_midi.py): tunes of music21's corpus in a fixed pseudo-random order (by a hash of
  their id), split about 5% validation by that hash; tunes music21 cannot convert (about 8%) are
  skipped (189 of 2189 in `full`), and the build says how many. `full`: 2000 train and 100
  validation tunes (about 3 minutes on an idle core: music21 converts about 15 tunes a second;
  8 on a busy 2-core machine); `tiny`: 16 and 4 (seconds). An example (ABC and MIDI) is a median
  of 950 bytes; rows of 4096 bytes hold 98% of them whole (2048: 79%). `short`: each tune's first
  2 bars and the header fields its MIDI depends on (`abc_midi.short_tune`), 8000 train and 200
  validation tunes; an example is a median of 165 bytes (ABC 40, MIDI 125), rows of 288 bytes
  hold about 95% whole. A tune whose ABC repeats an earlier one's is skipped (all configs).
- digits_bmp (media.py): scikit-learn's 1797 digits as 32 x 32 BMPs; a seeded permutation puts
  180 in validation. `tiny`: 64 train, 16 validation. `8x8`: the same split, the digits at their
  own 8 x 8 pixels (246-byte BMPs). Seconds.
- wav_tones (media.py): `full`: 2000 train and 400 validation clips; `tiny`: 64 and 16; `short`:
  2000 and 400 clips of 20-30 ms (204-284 bytes). Seconds.
- Labelled subsets, for classifiers trained on few labels: `8x8_<n>_s<d>` and `short_<n>_s<d>`
  hold n in SUBSET_LABELS_PER_CLASS (10, 50) training examples of each class, draw d in
  SUBSET_SEEDS (0-4) from their base's training split, and its whole validation split.
"""
import dataclasses
import zlib
from typing import Callable, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from llm_research.data import abc_midi, cpu_states, media
from llm_research.data.stdlib_corpus import split_of

SEED = 0  # every builder's generator seed


def _byte_vector(data: bytes) -> np.ndarray:
  return np.frombuffer(data, np.uint8)


def _byte_feature():
  return tfds.features.Tensor(shape=(None,), dtype=np.uint8)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose data is generated here: no downloads, no checksums file to look up."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  url_infos = None

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(examples)
            for split, examples in self._splits().items()}

  def _generate_examples(self, examples):
    yield from examples


@dataclasses.dataclass
class CpuStatesConfig(tfds.core.BuilderConfig):
  """Sizes and conventions of a cpu_states build; others: `CpuStates(config=CpuStatesConfig(
  name=..., ...), data_dir=...)`. `random_registers`: A and R0..R9 start random (else 0);
  `jumps`: programs may hold forward jumps."""

  train_programs: int = 0
  validation_programs: int = 200
  test_programs: int = 1000
  max_instructions: int = 16
  memory_size: int = 64
  random_registers: bool = False
  jumps: bool = True
  seed: int = SEED


# The short programs' conventions (`tiny`, `short_*`): the paper's, in a memory a small model
# learns.
SHORT_PROGRAMS = dict(max_instructions=8, memory_size=32, random_registers=True, jumps=False,
                      test_programs=500)


class CpuStates(_LocalBuilder):
  """Random programs of bGPT's simplified CPU and the states of running them."""

  name = "cpu_states"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "The initial state; random registers, no jumps, the short configs."}
  BUILDER_CONFIGS = [
      CpuStatesConfig(name="tiny", **dict(SHORT_PROGRAMS, test_programs=16), train_programs=64,
                      validation_programs=16),
      *(CpuStatesConfig(name=f"short_{name}", train_programs=size, **SHORT_PROGRAMS)
        for name, size in (("300", 300), ("3k", 3000), ("30k", 30000))),
      CpuStatesConfig(name="1k", train_programs=10**3),
      CpuStatesConfig(name="10k", train_programs=10**4),
      CpuStatesConfig(name="100k", train_programs=10**5),
      CpuStatesConfig(name="full", train_programs=10**4, max_instructions=256, memory_size=1024,
                      random_registers=True, jumps=False),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"memory": _byte_feature(),
                                             "initial": _byte_feature(),
                                             "states": _byte_feature()}),
        description="Programs (memory blocks) of bGPT's simplified CPU, the initial state they "
                    "run from and their states.")

  def _splits(self):
    config = self.builder_config
    # Held-out programs first; a later split skips any program an earlier one holds.
    sizes = {"test": config.test_programs, "validation": config.validation_programs,
             "train": config.train_programs}
    taken, splits = set(), {}
    for index, (split, size) in enumerate(sizes.items()):
      rng = np.random.default_rng([config.seed, index])
      programs = []
      while len(programs) < size:
        memory = cpu_states.random_program(rng, config.max_instructions, config.memory_size,
                                           config.jumps)
        initial = (cpu_states.random_initial_state(rng) if config.random_registers
                   else cpu_states.initial_state())
        if memory not in taken:
          taken.add(memory)
          programs.append((memory, initial))
      splits[split] = programs
    return {split: ((i, {"memory": _byte_vector(memory), "initial": _byte_vector(initial),
                         "states": _byte_vector(cpu_states.simulate(memory, initial=initial))})
                    for i, (memory, initial) in enumerate(programs))
            for split, programs in splits.items()}


@dataclasses.dataclass
class SplitSizesConfig(tfds.core.BuilderConfig):
  train_examples: int = 0
  validation_examples: int = 0


@dataclasses.dataclass
class AbcMidiConfig(SplitSizesConfig):
  bars: int = 0  # > 0: each tune cut to its first bars (abc_midi.short_tune)


class AbcMidi(_LocalBuilder):
  """Tunes of music21's ABC corpus, each with the MIDI file music21 makes of it."""

  name = "abc_midi"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Repeated tunes skipped; the short config."}
  BUILDER_CONFIGS = [
      AbcMidiConfig(name="tiny", train_examples=16, validation_examples=4),
      AbcMidiConfig(name="full", train_examples=2000, validation_examples=100),
      AbcMidiConfig(name="short", train_examples=8000, validation_examples=200, bars=2),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"abc": _byte_feature(), "midi": _byte_feature(),
                                             "id": tfds.features.Text()}),
        description="ABC tunes from music21's corpus and their MIDI files.")

  def _splits(self):
    limits = {"train": self.builder_config.train_examples,
              "validation": self.builder_config.validation_examples}
    bars = self.builder_config.bars
    tunes, seen = {split: [] for split in limits}, set()
    for tune_id, abc in sorted(abc_midi.corpus_tunes(), key=lambda t: zlib.crc32(t[0].encode())):
      abc = abc_midi.short_tune(abc, bars) if bars else abc
      split = split_of(tune_id)
      if abc not in seen and len(tunes[split]) < limits[split] * 1.2:  # room for the failures
        seen.add(abc)
        tunes[split].append((tune_id, abc))
    return {split: self._converted(tunes[split], limits[split], split) for split in limits}

  def _converted(self, tunes, limit: int, split: str):
    count = skipped = 0
    for tune_id, abc in tunes:
      if count == limit:
        break
      midi = abc_midi.to_midi(abc)
      if midi is None:
        skipped += 1
        continue
      count += 1
      yield tune_id, {"abc": _byte_vector(abc.encode("utf-8")), "midi": _byte_vector(midi),
                      "id": tune_id}
    print(f"abc_midi/{self.builder_config.name} {split}: {count} tunes converted, {skipped} "
          "skipped (music21 could not convert them)")


@dataclasses.dataclass
class LabelledConfig(SplitSizesConfig):
  """A labelled build's sizes; `labels_per_class` > 0 keeps only that many training examples of
  each class, drawn (by `subset_seed`) from the `train_examples` the build holds otherwise."""

  labels_per_class: int = 0
  subset_seed: int = 0


@dataclasses.dataclass
class DigitsConfig(LabelledConfig):
  side: int = media.BMP_SIDE  # the images' width and height, in pixels


@dataclasses.dataclass
class ClipsConfig(LabelledConfig):
  duration_s: tuple[float, float] = media.DURATION_S  # the clips' shortest and longest


# The labelled subsets' draws: `<base>_<labels per class>_s<draw>` configs for each.
SUBSET_SEEDS = range(5)
SUBSET_LABELS_PER_CLASS = (10, 50)


def _subsets(config: LabelledConfig) -> list[LabelledConfig]:
  """`config` with `labels_per_class` of each of SUBSET_LABELS_PER_CLASS, for each draw."""
  return [dataclasses.replace(config, name=f"{config.name}_{count}_s{seed}",
                              labels_per_class=count, subset_seed=seed)
          for count in SUBSET_LABELS_PER_CLASS for seed in SUBSET_SEEDS]


def _train_subset(indices, labels: list[int], config: LabelledConfig) -> list[int]:
  """The `indices` a build's train split holds: the first `train_examples`, then, if
  `labels_per_class`, that many of each class among them (a seeded draw, in their order)."""
  indices = list(indices)[:config.train_examples]
  if not config.labels_per_class:
    return indices
  rng = np.random.default_rng([SEED, config.subset_seed])
  kept = set()
  for label in sorted({labels[i] for i in indices}):
    of_label = [i for i in indices if labels[i] == label]
    kept.update(rng.choice(of_label, config.labels_per_class, replace=False).tolist())
  return [i for i in indices if i in kept]


# The builds of small files, and their labelled subsets (experiments/bgpt_media.py): digits at
# their own 8 x 8 pixels (246 bytes), clips of 20-30 ms (204-284 bytes).
DIGITS_8X8 = DigitsConfig(name="8x8", train_examples=1617, validation_examples=180, side=8)
SHORT_CLIPS = ClipsConfig(name="short", train_examples=2000, validation_examples=400,
                          duration_s=(0.02, 0.03))


class DigitsBmp(_LocalBuilder):
  """scikit-learn's handwritten digits as 24-bit BMP files (32 x 32, or 8 x 8), labelled."""

  name = "digits_bmp"
  VALIDATION_DIGITS = 180
  BUILDER_CONFIGS = [
      DigitsConfig(name="tiny", train_examples=64, validation_examples=16),
      DigitsConfig(name="full", train_examples=1797 - VALIDATION_DIGITS,
                   validation_examples=VALIDATION_DIGITS),
      DIGITS_8X8,
      *_subsets(DIGITS_8X8),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "bytes": _byte_feature(), "label": tfds.features.ClassLabel(num_classes=10)}),
        description="Handwritten digits (scikit-learn) as BMP files.")

  def _splits(self):
    config = self.builder_config
    digits = media.digit_bmps(config.side)
    order = np.random.default_rng(SEED).permutation(len(digits))
    held_out, kept = order[:self.VALIDATION_DIGITS], order[self.VALIDATION_DIGITS:]
    labels = [label for _, label in digits]
    return {"train": _labelled(digits, _train_subset(kept, labels, config)),
            "validation": _labelled(digits, held_out[:config.validation_examples])}


def _labelled(examples: list[tuple[bytes, int]], indices):
  for index in indices:
    data, label = examples[index]
    yield int(index), {"bytes": _byte_vector(data), "label": label}


class WavTones(_LocalBuilder):
  """Generated 8 kHz 8-bit mono WAV clips of four waveforms, labelled by waveform."""

  name = "wav_tones"
  BUILDER_CONFIGS = [
      ClipsConfig(name="tiny", train_examples=64, validation_examples=16),
      ClipsConfig(name="full", train_examples=2000, validation_examples=400),
      SHORT_CLIPS,
      *_subsets(SHORT_CLIPS),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "bytes": _byte_feature(), "label": tfds.features.ClassLabel(names=media.WAVEFORMS)}),
        description="WAV clips of sine, square, sawtooth and noise tones.")

  def _splits(self):
    config = self.builder_config
    train, validation = (
        media.sound_clips(size, seed=[SEED, index], duration_s=config.duration_s)
        for index, size in enumerate((config.train_examples, config.validation_examples)))
    labels = [label for _, label in train]
    return {"train": _labelled(train, _train_subset(range(len(train)), labels, config)),
            "validation": _labelled(validation, range(len(validation)))}


class ByteDataset(NamedTuple):
  """A `data.byte_dataset`: its builder, a record's example (parts, and a label or None) and
  its number of classes (0: no labels)."""

  builder: type[_LocalBuilder]
  example: Callable[[dict], tuple[list[np.ndarray], int | None]]
  num_classes: int = 0


BYTE_DATASETS = {
    "cpu_states": ByteDataset(
        CpuStates, lambda r: ([np.concatenate([r["memory"], r["initial"], r["states"]])], None)),
    "abc_to_midi": ByteDataset(AbcMidi, lambda r: ([r["abc"], r["midi"]], None)),
    "midi_to_abc": ByteDataset(AbcMidi, lambda r: ([r["midi"], r["abc"]], None)),
    "abc": ByteDataset(AbcMidi, lambda r: ([r["abc"]], None)),  # each format alone
    "midi": ByteDataset(AbcMidi, lambda r: ([r["midi"]], None)),
    "digits_bmp": ByteDataset(DigitsBmp, lambda r: ([r["bytes"]], int(r["label"])), 10),
    "wav_tones": ByteDataset(WavTones, lambda r: ([r["bytes"]], int(r["label"])),
                             len(media.WAVEFORMS)),
}

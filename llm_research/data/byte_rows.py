"""bGPT's rows: one example's bytes laid out in patches, in a row of `data.seq_len` values.

An example is a list of parts: one file's bytes, or a conversion's input and output files.
Values are bytes 0..255 and PAD = 256 (bGPT's end-of-patch / padding symbol). With patch size
S (`model.patch_size`), a row is

  part 1, padded with 256 to a whole patch
  [for a conversion: a separator patch of S x 256, then part 2 padded to a whole patch]
  the end patch: S x 256
  256 up to seq_len

`inputs` and `targets` are that row (the model shifts: byte t is predicted from bytes < t),
`segment_ids` are 1 up to and including the end patch and 0 after it, `positions` are
0..seq_len - 1; all int32 [seq_len]. Labelled examples add `label`, an int32 scalar.

Cropping: laid-out parts longer than seq_len - S are cut there (the end of the last part goes
first; a part that alone is that long loses its end and any part after it), and the end patch
still follows; the pipeline warns once how many examples of a split were cropped.
"""
from typing import Sequence

import numpy as np

from llm_research.errors import ConfigError

PAD = 256
DEFAULT_PATCH_SIZE = 16  # bGPT's (model.patch_size)


def check_lengths(seq_len: int, patch_size: int) -> None:
  """Refuses a row length the patches do not tile, or with no room for a byte and the end."""
  if patch_size < 1:
    raise ConfigError(f"model.patch_size={patch_size} must be at least 1")
  if seq_len % patch_size:
    raise ConfigError(f"data.seq_len={seq_len} is not a multiple of model.patch_size="
                      f"{patch_size}: a row is a whole number of patches")
  if seq_len < 2 * patch_size:
    raise ConfigError(f"data.seq_len={seq_len} leaves no room for a byte before the end patch "
                      f"(model.patch_size={patch_size}): use at least {2 * patch_size}")


def byte_values(part, where: str) -> np.ndarray:
  """A part (bytes, or a sequence of ints) as int32 values, each checked to be in 0..255."""
  if isinstance(part, (bytes, bytearray, memoryview)):
    values = np.frombuffer(part, np.uint8)
  else:
    values = np.asarray(part)
    if values.ndim != 1 or not (values.size == 0 or np.issubdtype(values.dtype, np.integer)):
      raise ConfigError(f"{where} is not bytes or a 1-D sequence of ints "
                        f"(got {values.dtype} of shape {values.shape})")
    outside = np.flatnonzero((values < 0) | (values > 255))
    if outside.size:
      raise ConfigError(f"{where} holds the value {values[outside[0]]} at byte {outside[0]}: "
                        "bytes are 0..255")
  if values.size == 0:
    raise ConfigError(f"{where} is empty (0 bytes): nothing to learn from")
  return values.astype(np.int32)


def laid_out_length(part_lengths: Sequence[int], patch_size: int) -> int:
  """Values before the end patch, uncropped: patch-padded parts and the separators."""
  patches = sum(-(-length // patch_size) for length in part_lengths) + len(part_lengths) - 1
  return patches * patch_size


def make_row(parts: Sequence, seq_len: int, patch_size: int, label: int | None = None,
             where: str = "an example") -> dict[str, np.ndarray]:
  """The row of one example (module docstring), cropped to fit seq_len."""
  pieces = []
  for index, part in enumerate(parts):
    values = byte_values(part, f"part {index} of {where}")
    if index:
      pieces.append(np.full(patch_size, PAD, np.int32))  # the separator patch
    pieces += [values, np.full(-len(values) % patch_size, PAD, np.int32)]
  content = np.concatenate(pieces)[:seq_len - patch_size]
  row = np.full(seq_len, PAD, np.int32)
  row[:len(content)] = content
  segment_ids = (np.arange(seq_len) < len(content) + patch_size).astype(np.int32)
  example = {"inputs": row, "targets": row.copy(), "segment_ids": segment_ids,
             "positions": np.arange(seq_len, dtype=np.int32)}
  if label is not None:
    example["label"] = np.int32(label)
  return example

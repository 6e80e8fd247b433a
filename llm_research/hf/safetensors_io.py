"""Hugging Face safetensors checkpoints, read and written with numpy (no torch).

A checkpoint folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}). `Reader` reads every shard's header up front (the
format: an 8-byte little-endian header size, a JSON header giving each tensor's dtype, shape and
byte range, then the data), so a missing or truncated shard is refused before any tensor is
read; then it reads one tensor at a time with a plain file read into one new array. Not
memory-mapped (as safetensors' own `safe_open` is): a mapped file's pages, once read, count in
the process's resident memory until the file is closed, which over a conversion would add the
whole checkpoint's size to the host's peak. bfloat16 tensors come back as ml_dtypes' bfloat16
numpy arrays. Written with safetensors' `save_file`.
"""
import json
import math
import os
from typing import Iterable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from llm_research.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}


class Reader:
  """The tensors of a checkpoint folder, by name; `names` lists them all."""

  def __init__(self, folder: str):
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError) as error:
        raise ConfigError(f"{index_path}: not a safetensors index ({error!r})") from None
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
      weight_map = None
    else:
      raise ConfigError(f"{folder!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    self._tensors = {}  # tensor name -> (shard path, dtype, shape, first byte, byte count)
    for shard in sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]:
      path = os.path.join(folder, shard)
      if not os.path.isfile(path):
        raise ConfigError(f"{path}: the shard is missing (listed in {INDEX_FILE})")
      for name, (dtype, shape, start, size) in _header(path).items():
        self._tensors[name] = (path, dtype, shape, start, size)
    for name, shard in (weight_map or {}).items():
      if name not in self._tensors or os.path.basename(self._tensors[name][0]) != shard:
        raise ConfigError(f"{os.path.join(folder, shard)}: no tensor {name!r} (the index lists "
                          "it there)")
    self.folder = folder

  @property
  def names(self) -> set[str]:
    return set(self._tensors)

  def get(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise ConfigError(f"{self.folder}: the checkpoint has no tensor {name!r}")
    path, dtype, shape, start, size = self._tensors[name]
    with open(path, "rb") as f:
      f.seek(start)
      data = f.read(size)
    return np.frombuffer(data, dtype).reshape(shape)  # a view of `data`: one copy in all


def _header(path: str) -> dict:
  """{tensor name: (dtype, shape, first byte, byte count)} of the safetensors file `path`,
  checked: every tensor's bytes lie inside the file and fit its dtype and shape."""
  def refuse(why: str):
    raise ConfigError(f"{path}: {why}")
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 0 < header_size <= file_size - 8:
      refuse(f"not a complete safetensors file (a header of {header_size} bytes in a file of "
             f"{file_size})")
    try:
      header = json.loads(f.read(header_size))
    except ValueError as error:
      refuse(f"not a safetensors file (the header is not JSON: {error})")
  if not isinstance(header, dict):
    refuse("not a safetensors file (the header is not a JSON object)")
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name = info["dtype"]
      shape = tuple(int(n) for n in info["shape"])
      begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      refuse(f"not a safetensors file (tensor {name!r} has no dtype, shape and data_offsets)")
    if dtype_name not in DTYPES:
      refuse(f"tensor {name!r} has dtype {dtype_name!r}, which this reader does not read "
             f"({', '.join(DTYPES)})")
    dtype, start = np.dtype(DTYPES[dtype_name]), 8 + header_size + begin
    if (begin < 0 or end - begin != math.prod(shape) * dtype.itemsize
        or start + end - begin > file_size):
      refuse(f"not a complete safetensors file (tensor {name!r}: bytes {begin}..{end} of the "
             f"data do not hold {dtype.name} {shape} inside the file's {file_size} bytes)")
    tensors[name] = (dtype, shape, start, end - begin)
  return tensors


def shard_name(index: int, count: int) -> str:
  return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_sharded(folder: str, tensors: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int) -> list[str]:
  """Writes `tensors` (name, array: taken one at a time, in order) as shards of at most
  `max_shard_bytes` (a larger tensor gets a shard of its own) plus the index; returns the
  shard file names. Holds one shard in memory at a time."""
  pending, size, written, weight_map, total = {}, 0, [], {}, 0

  def flush():
    temporary = f"shard-{len(written):05d}.safetensors.partial"
    save_file(pending, os.path.join(folder, temporary), metadata={"format": "pt"})
    written.append((temporary, list(pending)))
    pending.clear()

  for name, array in tensors:
    if pending and size + array.nbytes > max_shard_bytes:
      flush()
      size = 0
    pending[name] = np.ascontiguousarray(array)
    size += array.nbytes
    total += array.nbytes
  if pending or not written:
    flush()
  names = []
  for i, (temporary, tensor_names) in enumerate(written):
    name = shard_name(i + 1, len(written))
    os.replace(os.path.join(folder, temporary), os.path.join(folder, name))
    weight_map.update({tensor: name for tensor in tensor_names})
    names.append(name)
  with open(os.path.join(folder, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names

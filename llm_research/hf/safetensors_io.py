"""Hugging Face safetensors checkpoints, read and written with numpy (no torch).

A checkpoint folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}). `Reader` opens every shard's header up front, so a
missing or truncated shard is refused before any tensor is read, and then reads one tensor at a
time (memory-mapped): a conversion holds the source's tensors one at a time, never the whole
model. bfloat16 tensors come back as ml_dtypes' bfloat16 numpy arrays.
"""
import json
import os
from typing import Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llm_research.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
    self._files = {}  # shard file name -> open safetensors handle
    self._shard_of = {}  # tensor name -> shard file name
    for shard in sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]:
      path = os.path.join(folder, shard)
      if not os.path.isfile(path):
        raise ConfigError(f"{path}: the shard is missing (listed in {INDEX_FILE})")
      try:  # the header's offsets must fit the file: a truncated one fails here
        self._files[shard] = safe_open(path, framework="np")
      except Exception as error:  # safetensors raises its own error types
        raise ConfigError(f"{path}: not a complete safetensors file ({error})") from None
      for name in self._files[shard].keys():
        self._shard_of[name] = shard
    for name, shard in (weight_map or {}).items():
      if self._shard_of.get(name) != shard:
        raise ConfigError(f"{os.path.join(folder, shard)}: no tensor {name!r} (the index lists "
                          "it there)")
    self.folder = folder

  @property
  def names(self) -> set[str]:
    return set(self._shard_of)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._files[self._shard_of[name]].get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    if name not in self._shard_of:
      raise ConfigError(f"{self.folder}: the checkpoint has no tensor {name!r}")
    return self._files[self._shard_of[name]].get_tensor(name)


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

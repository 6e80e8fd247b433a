"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 (refused: biases), Mixtral.

    python -m llm_research.convert from-hf <hf_dir> <workdir> [--looped]
    python -m llm_research.convert to-hf <workdir> <hf_dir> [--dtype bfloat16]

from-hf writes an inference run, as `llm_research.pack` does: `config.json` (the base config
with the model's section, `data.tokenizer_file` naming the tokenizer copied into
`<workdir>/tokenizer/`, `data.vocab_size` the model's) and `checkpoints/0/params` (orbax,
float32, params alone: no optimizer state). `llm_research.sample` generates from it,
`--config.train.init_from=<workdir>` starts a training run from it (through a surgery: upcycled
into an MoE, depth up-scaled), and to-hf exports it (or any run's newest params) back as
sharded safetensors with an index, config.json and the tokenizer files.

From Python: `from_hf(path) -> (TransformerConfig, params)` and `to_hf(config, params, path)`.
The checkpoint is read one tensor at a time (memory-mapped safetensors, bf16 or f32, numpy: no
torch), each param put on the device as soon as its tensors are read: the host holds the
params plus one param's tensors (experiments/benchmarks/convert_memory.py measures it). Input
the converter cannot use (a missing or truncated shard, an unsupported architecture or config
field, a tensor that does not fit, a workdir or hf_dir that is not new) is one `error:` line
naming the file, field or tensor, with nothing written. The tensor map and the tied-embedding
rescale: llm_research/hf/weights.py; what is refused: llm_research/hf/architectures.py.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np

from llm_research import checkpoints, sample
from llm_research.config import base_config
from llm_research.errors import ConfigError
from llm_research.hf import architectures, safetensors_io, weights
from llm_research.methods.layer_list import abstract_params
from llm_research.models.transformer import TransformerConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # tried in this order
# Copied along with the tokenizer: its special tokens (tokenizer_config.json names bos / eos).
TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json")
MAX_SHARD_BYTES = 2 * 1024**3


def read_hf_config(path: str) -> TransformerConfig:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise ConfigError(f"{path!r} holds no Hugging Face model: {config_path} does not exist")
  with open(config_path) as f:
    return architectures.from_hf_config(json.load(f), config_path)


def from_hf(path: str, *, scan_layers: bool = True):
  """(config, params) of the Hugging Face checkpoint in folder `path`; params are float32
  arrays, laid out scanned or looped as `scan_layers` says."""
  config, reader = open_checkpoint(path, scan_layers=scan_layers)
  return config, read_params(config, reader)


def open_checkpoint(path: str, *, scan_layers: bool = True):
  """(config, safetensors reader) of the checkpoint in `path`, its config and tensor names
  checked (the shapes are checked as each tensor is read)."""
  config = dataclasses.replace(read_hf_config(path), scan_layers=scan_layers)
  reader = safetensors_io.Reader(path)
  weights.check_names(config, reader.names, path)
  return config, reader


def read_params(config: TransformerConfig, reader: safetensors_io.Reader):
  """The params of model `config` from the checkpoint `reader` reads, one param at a time:
  a scanned param is stacked from its layers' tensors and placed on the device before the next
  param is read (not joined from a full list of layers, which would hold the model twice)."""
  fused = weights.uses_fused_experts(config, reader.names)
  expected = abstract_params(dataclasses.replace(config, scan_layers=False))
  params = {}
  for entry in weights.outer_entries(config):
    _put(params, entry.path, jax.device_put(_read(reader, entry, _at(expected, entry.path))))
  layers = range(config.num_layers)
  entries = [weights.layer_entries(config, i, fused_experts=fused) for i in layers]
  for k, path in enumerate(entry.path for entry in entries[0]):
    values = [_read(reader, entries[i][k], _at(expected[f"layers_{i}"], path)) for i in layers]
    if config.scan_layers:
      _put(params, ("layers", *path), jax.device_put(np.stack(values)))
    else:
      for i, value in zip(layers, values):
        _put(params, (f"layers_{i}", *path), jax.device_put(value))
  return params


def _read(reader, entry, expected) -> np.ndarray:
  """The param of `entry` from its tensors (float32), checked against the model's shape."""
  tensors = [reader.get(name) for name in entry.names]
  try:
    param = entry.to_core(*tensors)
  except ValueError:  # a reshape the tensor's size does not fit
    param = None
  if param is None or param.shape != expected.shape:
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(entry.names, tensors))
    raise ConfigError(f"{reader.folder}: tensor {shapes} does not fit the config.json "
                      f"({'/'.join(entry.path)} must be {tuple(expected.shape)})")
  return np.asarray(param, np.float32)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _put(tree: dict, path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def hf_tensors(config: TransformerConfig, params, dtype: str = "float32"):
  """(Hugging Face name, numpy array) of every tensor of the checkpoint, one param at a time."""
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  def layer_param(i, path):
    if config.scan_layers:
      return np.asarray(_at(params["layers"], path)[i])
    return np.asarray(_at(params[f"layers_{i}"], path))
  for entry in weights.outer_entries(config):
    yield from zip(entry.names, (t.astype(np_dtype)
                                 for t in entry.to_hf(np.asarray(_at(params, entry.path)))))
  for i in range(config.num_layers):
    for entry in weights.layer_entries(config, i):
      yield from zip(entry.names, (t.astype(np_dtype)
                                   for t in entry.to_hf(layer_param(i, entry.path))))


def to_hf(config: TransformerConfig, params, path: str, *, dtype: str = "float32",
          max_position_embeddings: int = 4096, bos_token_id: int | None = None,
          eos_token_id: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Writes `params` of model `config` as a Hugging Face checkpoint (config.json, safetensors
  shards of at most `max_shard_bytes` and their index) into the new or empty folder `path`."""
  hf_config = architectures.to_hf_config(
      config, max_position_embeddings=max_position_embeddings, bos_token_id=bos_token_id,
      eos_token_id=eos_token_id, dtype=dtype)
  if config.layer_group != 1:
    raise ConfigError(f"model.moe.every={config.moe.every} must be 1 to export")
  _check_new(path, "hf_dir")
  os.makedirs(path, exist_ok=True)
  safetensors_io.write_sharded(path, hf_tensors(config, params, dtype),
                               max_shard_bytes=max_shard_bytes)
  with open(os.path.join(path, "config.json"), "w") as f:  # last: complete once it is there
    json.dump(hf_config, f, indent=2)


def _check_new(path: str, what: str) -> None:
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConfigError(f"{what} {path!r} is not a new or empty directory: nothing was written")


def _tokenizer_file(hf_dir: str) -> str:
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      return name
  raise ConfigError(f"{hf_dir!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)})")


def convert_from_hf(hf_dir: str, workdir: str, *, scan_layers: bool = True):
  """The from-hf command: `hf_dir`'s checkpoint and tokenizer into a new inference run
  `workdir` (the module docstring). Returns (config, params)."""
  _check_new(workdir, "workdir")
  model_config, reader = open_checkpoint(hf_dir, scan_layers=scan_layers)
  tokenizer_name = _tokenizer_file(hf_dir)
  params = read_params(model_config, reader)  # every tensor checked before anything is written
  tokenizer_dir = os.path.join(os.path.abspath(workdir), "tokenizer")
  os.makedirs(tokenizer_dir, exist_ok=True)
  for name in (tokenizer_name, *TOKENIZER_EXTRAS):
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), tokenizer_dir)
  config = base_config()
  fields = dataclasses.asdict(model_config)
  vocab_size = fields.pop("vocab_size")
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"name": "transformer", **fields})
    config.data.update(tokenizer="sentencepiece", vocab_size=vocab_size,
                       tokenizer_file=os.path.join(tokenizer_dir, tokenizer_name))
  config.lock()
  checkpoints.save_params(workdir, 0, params)
  with open(os.path.join(workdir, "config.json"), "w") as f:  # last: a run once complete
    f.write(config.to_json_best_effort(indent=2))
  return model_config, params


def convert_to_hf(workdir: str, hf_dir: str, *, dtype: str = "float32") -> int:
  """The to-hf command: the newest params of the run `workdir` (a training run's or an
  inference run's) into the new Hugging Face folder `hf_dir`; returns the step exported."""
  _check_new(hf_dir, "hf_dir")
  config, tokenizer, model_config, params, step = sample.load_run(workdir, to="export")
  if config.model.get("name") != "transformer":
    raise ConfigError(f"{workdir!r}: model.name={config.model.get('name')!r} has no Hugging "
                      "Face equivalent (only 'transformer' exports)")
  to_hf(model_config, jax.device_get(params), hf_dir, dtype=dtype,
        max_position_embeddings=max(config.data.seq_len, 4096),
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  tokenizer_file = config.data.get("tokenizer_file")
  if tokenizer_file:  # the files from-hf copied (or the ones the run names)
    folder = os.path.dirname(tokenizer_file)
    for name in (os.path.basename(tokenizer_file), *TOKENIZER_EXTRAS):
      if os.path.isfile(os.path.join(folder, name)):
        shutil.copy(os.path.join(folder, name), hf_dir)
  return step


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m llm_research.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  read = commands.add_parser("from-hf", help="a Hugging Face folder -> a new workdir")
  read.add_argument("hf_dir")
  read.add_argument("workdir")
  read.add_argument("--looped", action="store_true",
                    help="lay the layers out looped (model.scan_layers=False)")
  write = commands.add_parser("to-hf", help="a workdir's newest params -> a new HF folder")
  write.add_argument("workdir")
  write.add_argument("hf_dir")
  write.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args(argv)
  try:
    if args.command == "from-hf":
      config, _ = convert_from_hf(args.hf_dir, args.workdir, scan_layers=not args.looped)
      print(f"wrote {args.workdir}: {config.num_layers} layers, "
            f"{config.num_params():,} params")
    else:
      step = convert_to_hf(args.workdir, args.hf_dir, dtype=args.dtype)
      print(f"wrote {args.hf_dir} from step {step} of {args.workdir}")
  except ConfigError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()

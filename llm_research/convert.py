"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2 (refused: biases), Mixtral.

    python -m llm_research.convert from-hf <hf_dir> <workdir> [--looped]
        [--config.mesh.fsdp=-1 --config.mesh.data=1 ...]
    python -m llm_research.convert to-hf <workdir> <hf_dir> [--dtype bfloat16]

from-hf writes an inference run, as `llm_research.pack` does: `config.json` (the base config
with the model's section, `data.tokenizer_file` naming the tokenizer copied into
`<workdir>/tokenizer/`, `data.vocab_size` the model's, `mesh` as given) and
`checkpoints/0/params` (orbax, float32, params alone: no optimizer state). `llm_research.sample`
generates from it, `--config.train.init_from=<workdir>` starts a training run from it (through
a surgery: upcycled into an MoE, depth up-scaled), and to-hf exports it (or any run's newest
params) back as sharded safetensors with an index, config.json and the tokenizer files.

From Python: `from_hf(path, mesh=None, rules=None) -> (TransformerConfig, params)` and
`to_hf(config, params, path)`. The checkpoint is read one tensor at a time (safetensors, bf16 or
f32, plain reads into numpy: no torch, no memory map), and each param is placed on the mesh with
the sharding training gives it (its logical axes under the rules) as soon as its tensors are
read; a scanned param is filled on its devices one layer at a time. The host holds the placed
params (on CPU, the devices are the host) plus one tensor: no full copy of the model
(experiments/benchmarks/convert_memory.py measures it). Input the converter cannot use (a
missing or truncated shard, an unsupported architecture or config field, a tensor that does not
fit, a workdir or hf_dir that is not new) is one `error:` line naming the file, field or tensor,
with nothing written. The tensor map and the tied-embedding rescale: llm_research/hf/weights.py;
what is refused: llm_research/hf/architectures.py.
"""
import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_research import checkpoints, sample, sharding
from llm_research.config import base_config, with_overrides
from llm_research.errors import ConfigError
from llm_research.hf import architectures, safetensors_io, weights
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


def from_hf(path: str, *, scan_layers: bool = True, mesh: Mesh | None = None, rules=None):
  """(config, params) of the Hugging Face checkpoint in folder `path`; params are float32
  arrays, laid out scanned or looped as `scan_layers` says, each placed as it is read with the
  sharding training gives it on `mesh` under the logical-axis `rules` (`param_targets`)."""
  config, reader = open_checkpoint(path, scan_layers=scan_layers)
  return config, read_params(config, reader, param_targets(config, mesh, rules))


def open_checkpoint(path: str, *, scan_layers: bool = True):
  """(config, safetensors reader) of the checkpoint in `path`, its config and tensor names
  checked (the shapes are checked as each tensor is read)."""
  config = dataclasses.replace(read_hf_config(path), scan_layers=scan_layers)
  reader = safetensors_io.Reader(path)
  weights.check_names(config, reader.names, path)
  return config, reader


def param_targets(config: TransformerConfig, mesh: Mesh | None = None, rules=None):
  """Each param of model `config` as a jax.ShapeDtypeStruct: its shape, and the sharding
  training gives it (`sharding.logical_shardings` of its logical axes) on `mesh` (default: the
  first device alone) under `rules` (default: the base config's), so that a converted model
  is never resharded before use."""
  if mesh is None:
    mesh = sharding.make_mesh(dict.fromkeys(sharding.MESH_AXES, 1), jax.devices()[:1])
  if rules is None:
    rules = sharding.rules_from_config(base_config())
  boxed = jax.eval_shape(config.make_model().init, jax.random.key(0),
                         jnp.zeros((1, 1), jnp.int32))["params"]
  return jax.tree.map(lambda x, target: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target),
                      nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules))


def read_params(config: TransformerConfig, reader: safetensors_io.Reader, targets):
  """The params of model `config` from the checkpoint `reader` reads, each put on its devices
  with its sharding in `targets` (`param_targets`) as soon as its tensors are read: beyond the
  placed params, the host holds one tensor (converted) at a time. A scanned param
  [layers, ...] is allocated on its devices and filled one layer at a time (`_stacked`), never
  stacked on the host."""
  fused = weights.uses_fused_experts(config, reader.names)
  params = {}
  for entry in weights.outer_entries(config):
    target = _at(targets, entry.path)
    _put(params, entry.path, _placed(_read(reader, entry, target.shape), target.sharding))
  layers = range(config.num_layers)
  entries = [weights.layer_entries(config, i, fused_experts=fused) for i in layers]
  for k, path in enumerate(entry.path for entry in entries[0]):
    if config.scan_layers:
      target = _at(targets["layers"], path)
      _put(params, ("layers", *path), _stacked(
          lambda i: _read(reader, entries[i][k], target.shape[1:]), target))
    else:
      for i in layers:
        target = _at(targets[f"layers_{i}"], path)
        _put(params, (f"layers_{i}", *path),
             _placed(_read(reader, entries[i][k], target.shape), target.sharding))
  return params


def _placed(value: np.ndarray, target: NamedSharding) -> jax.Array:
  """`value` (host numpy) as a global array with sharding `target`; each device is given only
  its slice, and in a run of several processes each process places only its own devices'."""
  return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def _stacked(read_layer, target: jax.ShapeDtypeStruct) -> jax.Array:
  """The scanned param `target` [layers, ...] from `read_layer(i)` (host numpy, one layer):
  zeros allocated on the devices, then each layer, placed with the sharding of one slice
  (`target`'s less its layer axis), written in place (`_layer_writer` donates the stacked
  array). Peak: the stacked param plus one layer, on host and devices."""
  layer_sharding = NamedSharding(target.sharding.mesh, PartitionSpec(*target.sharding.spec[1:]))
  stacked = jnp.zeros(target.shape, jnp.float32, device=target.sharding)
  write = _layer_writer(target.sharding)
  for i in range(target.shape[0]):
    stacked = write(stacked, _placed(read_layer(i), layer_sharding), i)
  return stacked


@functools.cache
def _layer_writer(target: NamedSharding):
  """`(stacked, layer, i) -> stacked with layer at index i of its first axis`, compiled to
  write into `stacked`'s own buffer (donated) and to keep its sharding `target`."""
  return jax.jit(lambda stacked, layer, i: jax.lax.dynamic_update_index_in_dim(
      stacked, layer, i, 0), out_shardings=target, donate_argnums=0)


def _read(reader, entry, shape: tuple[int, ...]) -> np.ndarray:
  """The param of `entry` from its tensors (float32), checked against the model's `shape`."""
  tensors = [reader.get(name) for name in entry.names]
  try:
    param = entry.to_core(*tensors)
  except ValueError:  # a reshape the tensor's size does not fit
    param = None
  if param is None or param.shape != shape:
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(entry.names, tensors))
    raise ConfigError(f"{reader.folder}: tensor {shapes} does not fit the config.json "
                      f"({'/'.join(entry.path)} must be {shape})")
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
  """(Hugging Face name, numpy array) of every tensor of the checkpoint, one param at a time:
  `params` may stay on their devices (a scanned param is fetched one layer at a time), so the
  host holds one tensor beside the shard being written, never the model."""
  np_dtype = np.dtype(jnp.dtype(dtype))
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


def convert_from_hf(hf_dir: str, workdir: str, *, scan_layers: bool = True,
                    mesh_overrides=()):
  """The from-hf command: `hf_dir`'s checkpoint and tokenizer into a new inference run
  `workdir` (the module docstring). `mesh_overrides` ("fsdp=-1", ...) set the run's `mesh`
  section: the mesh its params are placed on as they are read, under the run's
  logical-axis rules. Returns (config, params)."""
  _check_new(workdir, "workdir")
  config = with_overrides(base_config(), [f"mesh.{item}" for item in mesh_overrides])
  mesh = sharding.make_mesh(config.mesh)
  model_config, reader = open_checkpoint(hf_dir, scan_layers=scan_layers)
  tokenizer_name = _tokenizer_file(hf_dir)
  # Every tensor is checked (as it is read) before anything is written.
  params = read_params(model_config, reader, param_targets(
      model_config, mesh, sharding.rules_from_config(config)))
  tokenizer_dir = os.path.join(os.path.abspath(workdir), "tokenizer")
  os.makedirs(tokenizer_dir, exist_ok=True)
  for name in (tokenizer_name, *TOKENIZER_EXTRAS):
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), tokenizer_dir)
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
  to_hf(model_config, params, hf_dir, dtype=dtype,
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
  for axis in sharding.MESH_AXES:
    read.add_argument(f"--config.mesh.{axis}", dest=axis, metavar="SIZE",
                      help=f"the run's mesh.{axis} (base config's default if unset): the "
                      "params are placed on the mesh as they are read")
  write = commands.add_parser("to-hf", help="a workdir's newest params -> a new HF folder")
  write.add_argument("workdir")
  write.add_argument("hf_dir")
  write.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  args = parser.parse_args(argv)
  try:
    if args.command == "from-hf":
      config, _ = convert_from_hf(
          args.hf_dir, args.workdir, scan_layers=not args.looped,
          mesh_overrides=[f"{axis}={getattr(args, axis)}" for axis in sharding.MESH_AXES
                          if getattr(args, axis) is not None])
      print(f"wrote {args.workdir}: {config.num_layers} layers, "
            f"{config.num_params():,} params")
    else:
      step = convert_to_hf(args.workdir, args.hf_dir, dtype=args.dtype)
      print(f"wrote {args.hf_dir} from step {step} of {args.workdir}")
  except ConfigError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()

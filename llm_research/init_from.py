"""`--config.train.init_from=<workdir>`: start a run from another run's params.

A new run (its workdir holds no checkpoint yet) takes the params of the newest checkpoint in
`train.init_from`, converted to this run's model by the surgery the two model configs imply,
and starts at step 0 with a fresh optimizer state (as sparse upcycling and SOLAR do) and the
data from its start (data.shuffle_seed decides the order). A run that already has checkpoints
resumes from them and ignores the key. Either run may have any training method: the source's
model params are what its method hands to evaluation (an LTE run's main params, merged), and
this run's method builds its state from the converted params. The source may also be an
inference run of params alone (`llm_research.convert from-hf`'s, `llm_research.pack`'s).

The surgery, from what differs between the source run's config.json and this config:
  - model.num_layers n -> 2 (n - m): depth up-scaling with drop m (methods/depth_upscale.py);
  - a dense model -> model.mlp_impl='moe' (the model.moe group as this config says):
    upcycling (methods/upcycle.py; the
    routers drawn from train.seed); both together: up-scaled, then upcycled;
  - model.scan_layers: the layers are re-laid out;
  - a key of the model config's HEAD_KEYS (bGPT: model.num_classes, generative -> classifier):
    every param of the same path and shape is copied, the others (a new head) are initialised
    from train.seed, and params the target lacks (bGPT's byte decoder) are dropped;
  - nothing: the params are copied (continue a run with a fresh optimizer).
Every other shape key (model.embed_dim, ..., data.tokenizer, data.vocab_size) must be the
same: anything else is a ConfigError of one line naming what differs. The source run is only
read (its checkpoints are opened read-only).
"""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from llm_research import checkpoints, sharding
from llm_research.data import pipeline
from llm_research.errors import ConfigError
from llm_research.methods.depth_upscale import depth_upscale
from llm_research.methods.layer_list import join_layers, shape_difference, split_layers
from llm_research.methods.upcycle import upcycle
from llm_research.models import registry
from llm_research.models.transformer import TransformerConfig

# Model keys a surgery may change (the others must be the source's).
SURGERY_KEYS = ("num_layers", "mlp_impl", "moe.num_experts", "moe.every", "scan_layers")
_MOE_SHAPES = ("mlp_impl", "moe.num_experts", "moe.every")


@dataclasses.dataclass(frozen=True)
class Source:
  workdir: str
  config: ml_collections.ConfigDict  # the source run's config.json
  model_config: object  # the source run's registered model config
  step: int  # its newest checkpoint


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _vocab_size(config) -> int:
  return pipeline.vocab_size(config.data)


def convert(source, target, params, *, seed: int = 0):
  """Params of the model `source` (a registered model config) -> params of `target`, by the
  surgery the two configs imply (the module docstring); a pure function."""
  if type(source) is not type(target):
    raise ConfigError(f"the source is a {type(source).__name__}, this run a "
                      f"{type(target).__name__}")
  value = registry.field_value
  keys = [k for k in registry.shape_keys(registry_name(target))
          if value(source, k) != value(target, k)]
  if not isinstance(target, TransformerConfig):
    fixed = [k for k in keys if k not in getattr(target, "HEAD_KEYS", ())]
    if fixed:
      raise ConfigError(_differ(source, target, fixed) + ": these must be the same")
    return _with_fresh_head(target, params, seed=seed) if keys else params
  fixed = [k for k in keys if k not in SURGERY_KEYS]
  if fixed:
    raise ConfigError(_differ(source, target, fixed) + ": only model.num_layers (depth "
                      "up-scaling), model.scan_layers and the MoE keys (upcycling) may change")
  config = source
  if target.num_layers != source.num_layers:
    n = source.num_layers
    drop = n - target.num_layers // 2
    if target.num_layers % 2 or not 0 <= drop < n:
      raise ConfigError(f"model.num_layers={target.num_layers} cannot come from {n} layers: "
                        f"depth up-scaling makes 2 (n - drop) layers with 0 <= drop < n, an "
                        f"even number from 2 to {2 * n}")
    config, params = depth_upscale(config, params, drop=drop)
  if target.mlp_impl == "moe" and config.mlp_impl != "moe":
    config, params = upcycle(config, params, moe=target.moe, seed=seed)
  moe_keys = [k for k in _MOE_SHAPES if value(config, k) != value(target, k)]
  if moe_keys:
    raise ConfigError(_differ(config, target, moe_keys) + ": an MoE model converts to no other "
                      "MoE layout or to a dense model")
  return join_layers(target, *split_layers(config, params))


def _with_fresh_head(target, params, *, seed: int):
  """Params of the model `target`: those of `params` with the same path and shape, the others
  freshly initialised from `seed` (what `params` has beyond them is dropped)."""
  fresh = nn.meta.unbox(jax.jit(target.make_model().init)(
      jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])
  kept = dict(jax.tree_util.tree_leaves_with_path(params))
  return jax.tree_util.tree_map_with_path(
      lambda path, x: kept[path] if path in kept and kept[path].shape == x.shape else x, fresh)


def registry_name(model_config) -> str:
  return next(name for name, cls in registry.MODELS.items() if cls is type(model_config))


def _differ(source, target, keys) -> str:
  value = registry.field_value
  return ", ".join(f"model.{k} is {value(source, k)!r} there, {value(target, k)!r} here"
                   for k in keys)


def check(config) -> Source:
  """The source run of `config.train.init_from`, checked against `config` (its config.json,
  model, tokenizer, a checkpoint, and the surgery traced on abstract params) without reading
  any array; a ConfigError of one line otherwise."""
  workdir = config.train.init_from
  where = f"train.init_from={workdir!r}"
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{where} holds no run: {path} does not exist")
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  there, here = saved.model.get("name", registry.DEFAULT_MODEL), config.model.name
  if there != here:
    raise ConfigError(f"{where} is a model.name={there!r} run, this one model.name={here!r}: "
                      "init_from converts between runs of the same model")
  for key in ("tokenizer", "vocab_size"):
    there, here = saved.data.get(key), config.data[key]
    if there != here and (key == "tokenizer" or config.data.tokenizer != "byte"):
      raise ConfigError(f"{where}: data.{key} is {there!r} there, {here!r} here: the "
                        "tokenizer must be the same")
  try:
    source = registry.model_config(saved.model, _vocab_size(config))
    target = registry.model_config(config.model, _vocab_size(config))
    jax.eval_shape(lambda p: convert(source, target, p, seed=config.train.seed),
                   _abstract_params(source))
  except ConfigError as error:
    raise ConfigError(f"{where}: {error}") from None
  manager = _read_only_manager(workdir)
  step = manager.latest_step() if manager else None
  if step is None:
    raise ConfigError(f"{where} has no checkpoint to start from")
  manager.close()
  return Source(os.path.abspath(workdir), saved, source, step)


def _abstract_params(model_config, boxed: bool = False):
  params = jax.eval_shape(model_config.make_model().init, jax.random.key(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  return params if boxed else nn.meta.unbox(params)


def _read_only_manager(workdir: str):
  """A manager of the source's checkpoints that this module only restores from. Not orbax's
  read_only option, which logs two warnings per open that tell the user nothing: create=False
  and no save are all a reader needs (as checkpoints.Checkpointer's readers)."""
  directory = epath.Path(workdir).absolute() / "checkpoints"
  if not directory.is_dir():
    return None
  return ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(create=False))


def initial_params(source: Source, source_method, target, mesh, rules, *, seed: int):
  """The source's newest model params, converted to the model `target`: its state's params,
  read sharded over `mesh` as `rules` say, then the model params `source_method` (the source
  run's training method, a llm_research.training.TrainingMethod) hands to evaluation."""
  params_only = checkpoints.holds_params_only(source.workdir)  # convert's, pack's: no state
  boxed = _abstract_params(source.model_config, boxed=True)
  if not params_only:
    boxed = jax.eval_shape(lambda p: source_method.init(p, jax.random.key(0))[0], boxed)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.meta.unbox(boxed), shardings)
  if params_only:
    params, _ = checkpoints.restore_params(source.workdir, abstract)
  else:
    params = _restore_model_params(source, source_method, abstract, mesh, rules)
  params = convert(source.model_config, target, params, seed=seed)
  difference = shape_difference(params, target)
  if difference:  # convert promises the target's shapes: a bug if not
    raise AssertionError(f"init_from: converted params do not fit the model ({difference})")
  return params


def _restore_model_params(source: Source, source_method, abstract, mesh, rules):
  """The model params of the source's train state at its newest step (`abstract`: its
  state's params, sharded)."""
  manager = _read_only_manager(source.workdir)
  try:
    restored = manager.restore(source.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args=ocp.checkpoint_utils.construct_restore_args(
            {"params": abstract}), partial_restore=True)))
  except Exception as error:  # orbax raises many types for a damaged checkpoint
    lines = str(error).splitlines()
    raise ConfigError(f"train.init_from={source.workdir!r}: the checkpoint at step "
                      f"{source.step} cannot be restored ({type(error).__name__}: "
                      f"{lines[0][:200] if lines else ''})") from None
  finally:
    manager.close()
  with sharding.activate(mesh, rules):
    return jax.jit(source_method.model_params)(restored.state["params"])

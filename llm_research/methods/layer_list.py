"""A transformer's params as a list of per-layer params, whatever their layout.

The decoder stack stores layers scanned ("layers": every leaf [blocks, ...]) or looped
("layers_0", "layers_1", ...), and an MoE model with `moe.every=g > 1` stores blocks of g layers
("layer_0" ... "layer_<g-1>" inside each block). Surgeries that move, copy or convert layers
(depth up-scaling, upcycling) work on the plain list and let `join_layers` lay it out for the
target config, so they handle every layout, and converting between layouts is free.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.errors import ConfigError


def _is_layers_key(key: str) -> bool:
  return key == "layers" or (key.startswith("layers_") and key[len("layers_"):].isdigit())


def split_layers(config, params) -> tuple[list[dict], dict]:
  """(the params of layer 0, 1, ..., num_layers - 1; the params outside the layers)."""
  params = nn.meta.unbox(params)
  group, blocks = config.layer_group, config.num_layers // config.layer_group
  if config.scan_layers:
    stacked = params["layers"]
    block_params = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(blocks)]
  else:
    block_params = [params[f"layers_{i}"] for i in range(blocks)]
  if group == 1:
    layers = list(block_params)
  else:
    layers = [block[f"layer_{j}"] for block in block_params for j in range(group)]
  rest = {k: v for k, v in params.items() if not _is_layers_key(k)}
  return layers, rest


def join_layers(config, layers: list[dict], rest: dict) -> dict:
  """The params of `config`'s model with `layers` as its layers (the inverse of
  `split_layers`); `rest` holds the params outside the layers."""
  if len(layers) != config.num_layers:
    raise ConfigError(f"{len(layers)} layers do not make model.num_layers={config.num_layers}")
  group = config.layer_group
  blocks = [layers[i:i + group] if group > 1 else layers[i]
            for i in range(0, len(layers), group)]
  if group > 1:
    blocks = [{f"layer_{j}": layer for j, layer in enumerate(block)} for block in blocks]
  if config.scan_layers:
    try:
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    except ValueError as error:  # layers of different structure cannot be scanned together
      raise ConfigError(f"the layers do not form model.moe.every={config.moe.every} groups "
                        f"of one structure ({str(error).splitlines()[0]})") from None
    return {**rest, "layers": stacked}
  return {**rest, **{f"layers_{i}": block for i, block in enumerate(blocks)}}


def abstract_params(config) -> dict:
  """The params of `config`'s model as jax.ShapeDtypeStructs (nothing is allocated)."""
  return nn.meta.unbox(jax.eval_shape(
      config.make_model().init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def shape_difference(params, config, *, most: int = 4) -> str:
  """'' if `params` have the paths and shapes of `config`'s model, else what differs."""
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
                       for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  there, here = flat(params), flat(abstract_params(config))
  listed = lambda names: ", ".join(names[:most]) + (
      f" and {len(names) - most} more" if len(names) > most else "")
  parts = []
  if sorted(set(there) - set(here)):
    parts.append(f"not in the model: {listed(sorted(set(there) - set(here)))}")
  if sorted(set(here) - set(there)):
    parts.append(f"missing: {listed(sorted(set(here) - set(there)))}")
  shapes = [f"{n} {there[n]} vs {here[n]}" for n in sorted(set(there) & set(here))
            if there[n] != here[n]]
  if shapes:
    parts.append(f"shapes: {listed(shapes)}")
  return "; ".join(parts)

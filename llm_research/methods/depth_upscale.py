"""Depth up-scaling (SOLAR 10.7B, Kim et al. 2023): n layers -> 2 (n - drop) layers.

    depth_upscale(config, params, *, drop=m) -> (config, params)

The new stack is layers [0, n - m) followed by layers [m, n) of the old one (two copies of the
model, the last m layers cut from the first and the first m from the second, joined); the
embedding, final norm and head are copied. With m = 0 the model applies its layer stack twice.
Each new layer is an exact copy of an old one. An MoE model up-scales too when `moe.every` (g)
divides 2 (n - m): then every copied layer lands where the new config wants its kind (new layer
i >= n - m copies old layer i - (n - 2m), and g divides n - 2m = 2 (n - m) - n). Works on
scanned and looped layouts; training continues with a fresh optimizer
(`--config.train.init_from`).
"""
import dataclasses

from llm_research.errors import ConfigError
from llm_research.methods.layer_list import join_layers, shape_difference, split_layers


def source_layers(num_layers: int, drop: int) -> list[int]:
  """Which old layer each new layer copies: [0, n - drop) then [drop, n)."""
  return list(range(num_layers - drop)) + list(range(drop, num_layers))


def depth_upscale(config, params, *, drop: int):
  """(config with 2 (n - drop) layers, params whose layer i is old layer source_layers[i])."""
  n = config.num_layers
  if not 0 <= drop < n:
    raise ConfigError(f"depth_upscale: drop={drop} must be from 0 to num_layers - 1 = {n - 1}")
  difference = shape_difference(params, config)
  if difference:
    raise ConfigError(f"depth_upscale: the params do not fit the config ({difference})")
  new_config = dataclasses.replace(config, num_layers=2 * (n - drop))  # checks moe.every
  layers, rest = split_layers(config, params)
  order = source_layers(n, drop)
  assert all(new_config.is_moe_layer(i) == config.is_moe_layer(old)
             for i, old in enumerate(order))  # the docstring's argument
  return new_config, join_layers(new_config, [layers[i] for i in order], rest)

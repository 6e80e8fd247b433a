"""Sparse upcycling (Komatsuzaki et al. 2023): a dense transformer -> an MoE transformer.

    upcycle(dense_config, dense_params, *, moe=MoEConfig(num_experts=8, every=2), seed=0)
        -> (moe_config, moe_params)

Every `moe.every`-th layer (the last of each group, as the MoE model places them; 2 = every
other layer, as the paper) gets an MoE MLP whose `moe.num_experts` experts are each a copy of that
layer's dense MLP ("gate", "up", "down" kernels, broadcast over a leading expert axis), with a
fresh router (the MoE model's small init, from `seed`); every other param is copied. With top-k
routing for k >= 2, renormalised combine weights and no dropped token (dropless, or capacity
enough), the experts of a layer are identical and their weights sum to 1, so the upcycled model
computes the dense model's function at step 0. So does top-1 with `moe.top1_weight=
"straight_through"` (weight 1, the router learning through p's gradient); with the default
"probability" (Switch Transformer's convention) top-1 scales its expert by the router's
probability, about 1 / num_experts at step 0: the upcycled model starts from the dense MLP's
output scaled by that.

The optimizer state is not carried over: training continues with a fresh one (as the paper
does; `--config.train.init_from` starts at step 0). Works on scanned and looped layouts.
"""
import dataclasses

import jax
import jax.numpy as jnp

from llm_research.errors import ConfigError
from llm_research.methods.layer_list import join_layers, shape_difference, split_layers
from llm_research.models.moe import ROUTER_INIT_SCALE, MoEConfig

EXPERT_KERNELS = ("gate", "up", "down")


def upcycle(dense_config, dense_params, *, moe: MoEConfig, seed: int = 0):
  """(moe_config, moe_params) of the dense model (dense_config, dense_params): its config with
  mlp_impl='moe' and the MoE settings `moe`."""
  if dense_config.mlp_impl != "swiglu":
    raise ConfigError(f"upcycle: the source has model.mlp_impl={dense_config.mlp_impl!r}; "
                      "it must be a dense ('swiglu') model")
  if dense_config.lora_rank:
    raise ConfigError(f"upcycle: the source has LoRA adapters (model.lora_rank="
                      f"{dense_config.lora_rank}); experts have none: merge them first")
  difference = shape_difference(dense_params, dense_config)
  if difference:
    raise ConfigError(f"upcycle: the params do not fit the dense config ({difference})")
  moe_config = dataclasses.replace(dense_config, mlp_impl="moe", moe=moe)  # checks the values

  layers, rest = split_layers(dense_config, dense_params)
  keys = jax.random.split(jax.random.key(seed), len(layers))
  embed = dense_config.embed_dim
  for i, layer in enumerate(layers):
    if not moe_config.is_moe_layer(i):
      continue
    mlp = {name: {"kernel": jnp.broadcast_to(
        layer["mlp"][name]["kernel"], (moe.num_experts, *layer["mlp"][name]["kernel"].shape))}
           for name in EXPERT_KERNELS}
    mlp["router"] = {"kernel": ROUTER_INIT_SCALE * embed**-0.5
                     * jax.random.normal(keys[i], (embed, moe.num_experts), jnp.float32)}
    layers[i] = {**layer, "mlp": mlp}
  return moe_config, join_layers(moe_config, layers, rest)

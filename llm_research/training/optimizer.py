"""The optimizer (AdamW with clipping and a trainable-parameter mask) and its schedules."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm_research.errors import ConfigError


def learning_rate_schedule(tc) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine or linear decay to `final_lr_fraction` of it.

  "two_stage" (BitNet b1.58): the peak until half-way, then a drop to `final_lr_fraction` of
  it, cosine-decayed to zero by the end; weight decay stops at the drop (`weight_decay_schedule`).
  """
  decay_steps = max(tc.steps - tc.warmup_steps, 1)
  final = tc.learning_rate * tc.final_lr_fraction
  if tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tc.learning_rate, decay_steps, alpha=tc.final_lr_fraction)
  elif tc.schedule == "linear":
    decay = optax.linear_schedule(tc.learning_rate, final, decay_steps)
  elif tc.schedule == "two_stage":
    half = max(tc.steps // 2 - tc.warmup_steps, 0)
    decay = optax.join_schedules(
        [optax.constant_schedule(tc.learning_rate),
         optax.cosine_decay_schedule(final, max(tc.steps - tc.steps // 2, 1))], [half])
  else:
    raise ConfigError(f"train.schedule={tc.schedule!r} is not 'cosine', 'linear' or 'two_stage'")
  warmup = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
  return optax.join_schedules([warmup, decay], [tc.warmup_steps])


def weight_decay_schedule(tc):
  """`weight_decay` throughout, except zero from half-way under the two-stage schedule."""
  if tc.schedule != "two_stage":
    return tc.weight_decay
  return lambda step: jnp.where(step < tc.steps // 2, tc.weight_decay, 0.0)


def param_path(path) -> str:
  """'layers/attn/query/kernel' from a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params, pattern: str):
  """True for the params `train.trainable` selects: those whose path ('layers/mlp/up/lora_a')
  matches the regular expression `pattern` (re.search); every param when it is empty."""
  regex = re.compile(pattern) if pattern else None
  # A boxed param (nn.Partitioned, as the optimizer sees it at init) is one leaf: its path
  # is the param's own, not '.../value'.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: regex is None or bool(regex.search(param_path(path))), params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(tc) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices (kernels, embedding,
  adapters). Params outside `train.trainable` are frozen: no update, no optimizer state (and
  their gradients count in neither the clipping norm nor grad_norm)."""
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding", "lora_a",
                                                         "lora_b"), params)
  adamw = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                  weight_decay=weight_decay_schedule(tc), mask=decay_mask))
  if not tc.trainable:
    return adamw
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                       trainable_mask(params, tc.trainable))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)

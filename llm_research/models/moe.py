"""Mixture-of-experts MLP (`model.mlp_impl="moe"`): E SwiGLU experts and a router, set by the
model section's `moe` group (`MoEConfig`: `--config.model.moe.num_experts=8`, ...).

Params (under the layer's "mlp"): "router"/"kernel" [embed, E] (float32 math, small init:
normal with stddev ROUTER_INIT_SCALE / sqrt(embed), so fresh routers are near uniform) and per
projection "gate", "up" [expert, embed, mlp] and "down" [expert, mlp, embed] ("kernel"), whose
leading logical axis "expert" the rules map onto the `expert` mesh axis. Each expert is the
SwiGLU of mlp.py: down(silu(gate(x)) * up(x)).

Routers (`model.moe.router`), over router probabilities p = softmax(x W_router) [tokens, E]:
  "top_k"          each token goes to its `experts_per_token` (k) most probable experts, weighted
                   by their probabilities, renormalised over the chosen k if
                   `renormalize_combine` and k > 1 (top-1: `top1_weight`, by default its
                   probability p, as Switch Transformer; renormalised, p / p = 1 would leave the
                   router without a gradient from the task loss). Two paths:
                   - dropless (`capacity_factor=0`): the token copies sorted by expert and run
                     through grouped matmuls (`jax.lax.ragged_dot`); no token is ever dropped.
                   - capacity (`capacity_factor=c > 0`): each expert takes at most
                     C = ceil(c * k * S / E) token copies of a group of S tokens (one row of the
                     batch), the first C it is offered in `capacity_order`: by default every
                     first choice before any second choice (GShard), within a choice the tokens
                     of highest top-1 probability first (V-MoE's batch-prioritised routing);
                     CAPACITY_ORDERS names the others. The rest are dropped: they skip that
                     expert (the residual carries them), and a token's kept copies keep their
                     weights (which then sum to less than its k did) unless
                     `renormalize_kept` scales them back up to that sum. Computed with dispatch
                     [S, E, C] and combine tensors (GShard).
  "expert_choice"  each expert takes the C = ceil(c * S / E) tokens of the group it gives the
                   highest probability, weighted by it (Zhou et al. 2022): perfectly balanced,
                   a token may get any number of experts (zero included: "dropped").

Causality. Dropless top-k routes each token on its own: an MoE decoder stays causal and
KV-cache decoding computes the full forward pass. The capacity path and expert choice route a
whole row at once: a later token can take an expert's slot from an earlier one (and expert
choice ranks every token of the row), so they are causal only when no copy is dropped, and
decoding (one token per group: nothing is dropped, every expert takes the token under expert
choice) does not compute what training computed.

Padding. Given `segment_ids` ([batch, length], 0 = padding, as the transformer's), padding tokens
take no expert slot (capacity and expert choice: no expert is offered them; dropless: their
combine weights are 0), count in neither router loss nor the dropped count, and come out as 0.

Logged: the weighted load-balancing loss (top-k only; Switch/GShard form
E * sum_e f_e P_e, f_e the fraction of token copies routed to e, P_e its mean probability over
the tokens; 1 when uniform) and router z-loss (mean logsumexp(logits)^2), both over the
non-padding tokens, are sown with `sow_aux_loss`
("load_balance", "router_z_loss": added to the objective, logged as aux_loss/<name>), each only
when its weight is positive; the number of dropped token copies (top-k) or tokens no expert
took (expert choice) is sown with `sow_metric` as "moe_dropped_tokens": summed over MoE layers
and a step's micro-batches (0 for dropless). Router statistics, each logged as a mean over the
step's tokens and the MoE layers (sown as "mean/<name>" sums, see `MoE._sow_mean`):
"moe_dropped_fraction" (of the token copies, or tokens under expert choice), and for top-k
"moe_load/expert_<e>" (the fraction of token copies the router sends to expert e, before any
capacity drop) and "moe_load_cv" (those loads' coefficient of variation, std / mean, per layer
and micro-batch: 0 when balanced, sqrt(E - 1) when every token goes to one expert, top-1).

Sharding. The capacity path's dispatched tokens [expert, batch, capacity, embed] lie with the
experts over `expert` and the rows over the remaining batch axes; the rest of the model splits
rows over `expert` too, so XLA moves tokens to their experts' devices and back with all-to-alls.
The dropless path runs inside shard_map on each device's rows: the device sorts its token copies
by expert and, with the experts split over `expert`, sends each copy to the device holding its
expert (an all-to-all over `expert`, padded to the worst case, tokens x min(k, E / n) rows for
each of the n devices: XLA:CPU has no `ragged_all_to_all`, see `_on_expert_devices`), which runs
its experts' grouped matmuls and sends the outputs back; no expert weight is gathered over
`expert`. (On CPU, XLA computes `ragged_dot` as a masked dense matmul over every expert it holds;
GPU and TPU have grouped kernels.) Top-k runs on each device's rows (`top_k_by_row`).
"""
import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.models.layers import constrain, map_shards, partition_spec
from llm_research.models.registry import shape_field
from llm_research.models.stack import sow_aux_loss, sow_metric

MOE_ROUTERS = ("top_k", "expert_choice")
# The order in which the capacity path serves token copies (each expert keeps the first C it is
# offered): all first choices before any second choice (GShard, V-MoE), within a choice by the
# token's top-1 probability (V-MoE's batch-prioritised routing) or by position (GShard, V-MoE's
# "vanilla" routing); or "score": every copy by its own probability, so another token's second
# choice can take a slot from a first choice.
CAPACITY_ORDERS = ("choice_then_score", "choice_then_position", "score")
# A top-1 token's combine weight: "probability" p (Switch Transformer), or "straight_through"
# p / stop_gradient(p): 1 in the forward pass (an upcycled top-1 model then computes the dense
# model's function at step 0), while the router's gradient is p's, scaled by 1 / p.
TOP1_WEIGHTS = ("probability", "straight_through")
ROUTER_INIT_SCALE = 0.1  # router stddev ROUTER_INIT_SCALE / sqrt(embed): logits ~ 0.1


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """A model's mixture-of-experts settings, its config section's `moe` group (used when
  `mlp_impl="moe"`): `num_experts` SwiGLU experts in every `every`-th layer (1: all; 2: every
  other, the last of each pair). `router` "top_k": `experts_per_token` (k) per token,
  `capacity_factor` 0 = dropless, c > 0 = each expert takes at most ceil(c * k * length / E)
  tokens of a row, served in `capacity_order` (CAPACITY_ORDERS); "expert_choice": each expert
  takes ceil(c * length / E) tokens of a row (c > 0). `renormalize_combine`: a token's top-k
  weights sum to 1 (k >= 2; top-1 is weighted by its probability, as Switch Transformer, since
  p / p = 1 would give the router no gradient from the task loss; `top1_weight`
  "straight_through" weighs it 1 with p's gradient, TOP1_WEIGHTS). After a capacity drop a
  kept copy keeps its weight (the token's weights then sum to less than before: the residual
  carries the rest), unless `renormalize_kept`, which scales the kept copies' weights up to
  the sum the token's k copies had. The router losses' weights: load balancing (top_k) and
  router z-loss."""

  num_experts: int = shape_field(0)
  experts_per_token: int = 2
  router: str = "top_k"
  capacity_factor: float = 0.0
  capacity_order: str = "choice_then_score"
  every: int = shape_field(1)
  renormalize_combine: bool = True
  renormalize_kept: bool = False
  top1_weight: str = "probability"
  load_balance_weight: float = 0.01
  router_z_loss_weight: float = 0.001

  def problems(self, num_layers: int) -> list[str]:
    """What this group gets wrong for an MoE model of `num_layers` layers: "<field>=<value>
    <why>" each, the field relative to the group."""
    found = []

    def need(ok: bool, field: str, why: str) -> None:
      if not ok:
        found.append(f"{field}={getattr(self, field)!r} {why}")
    need(self.num_experts >= 1, "num_experts", "must be at least 1 with mlp_impl='moe'")
    need(self.router in MOE_ROUTERS, "router", f"is not one of {sorted(MOE_ROUTERS)}")
    need(1 <= self.experts_per_token <= max(self.num_experts, 1), "experts_per_token",
         f"must be from 1 to num_experts={self.num_experts}")
    need(self.capacity_factor >= 0, "capacity_factor", "must not be negative (0: dropless top_k)")
    need(self.router != "expert_choice" or self.capacity_factor > 0, "capacity_factor",
         "cannot hold a token: router='expert_choice' needs a positive capacity factor")
    need(self.capacity_order in CAPACITY_ORDERS, "capacity_order",
         f"is not one of {list(CAPACITY_ORDERS)}")
    need(self.top1_weight in TOP1_WEIGHTS, "top1_weight", f"is not one of {list(TOP1_WEIGHTS)}")
    need(self.every >= 1 and num_layers % self.every == 0, "every",
         f"must divide num_layers={num_layers}")
    for field in ("load_balance_weight", "router_z_loss_weight"):
      need(getattr(self, field) >= 0, field, "must not be negative")
    return found


def expert_capacity(group_size: int, num_experts: int, factor: float, k: int = 1) -> int:
  """Slots per expert per group: ceil(factor * k * group_size / num_experts), at least 1 and
  at most group_size (an expert can take each token once)."""
  return max(1, min(group_size, math.ceil(factor * k * group_size / num_experts)))


def top_k_by_row(x: jax.Array, k: int):
  """`jax.lax.top_k` over the last axis of x [rows, ...] (rows: split as "batch" is), on each
  device's rows under a mesh: XLA lowers top_k to a custom call it cannot partition, so outside
  shard_map every device would gather every row (the whole batch's router probabilities)."""
  rows = partition_spec(("batch",) + (None,) * (x.ndim - 1), x.shape)
  return map_shards(lambda part: tuple(jax.lax.top_k(part, k)), (rows,), (rows, rows))(x)


def top_k_gates(probs: jax.Array, k: int, renormalize: bool, top1_weight: str = "probability"):
  """(combine weights [..., k], experts [..., k] int32, scores [..., k]): the k most probable
  experts per token, their probabilities as scores, renormalised to sum to 1 if asked and
  k > 1. Top-1 is weighted per `top1_weight` (TOP1_WEIGHTS): its probability, Switch
  Transformer's weight (renormalised it would be 1, a constant, and the router would learn
  nothing from the task loss), or 1 with the probability's gradient ("straight_through")."""
  scores, experts = top_k_by_row(probs, k)
  if k == 1 and top1_weight == "straight_through":
    gates = scores / jax.lax.stop_gradient(scores)
  elif renormalize and k > 1:
    gates = scores / jnp.sum(scores, axis=-1, keepdims=True)
  else:
    gates = scores
  return gates, experts.astype(jnp.int32), scores


class Routing(NamedTuple):
  """Dispatch [groups, S, E, C] (bool) and combine [groups, S, E, C] (float32) tensors, and
  the number of token copies (top-k) or tokens (expert choice) dropped."""

  dispatch: jax.Array
  combine: jax.Array
  dropped: jax.Array


def copy_priority(scores: jax.Array, order: str) -> jax.Array:
  """[groups, S * k] int32: each token copy's place in the order `order` (CAPACITY_ORDERS)
  serves them, 0 first, of the copies (token s's choice j at s * k + j) whose scores are
  `scores` [groups, S, k] (each token's chosen probabilities, highest first). Ties: the
  earlier copy."""
  groups, size, k = scores.shape
  choice = jnp.broadcast_to(jnp.arange(k), scores.shape)
  top_1 = jnp.broadcast_to(scores[..., :1], scores.shape)
  first, then = {"choice_then_score": (choice, -top_1),
                 "choice_then_position": (choice, jnp.zeros_like(scores)),
                 "score": (-scores, jnp.zeros_like(scores))}[order]
  flat = lambda key: key.reshape(groups, size * k)
  served = jnp.lexsort((flat(then), flat(first)), axis=-1)  # stable: ties keep copy order
  return jnp.argsort(served, axis=-1).astype(jnp.int32)


def top_k_capacity_routing(probs: jax.Array, k: int, capacity: int, renormalize: bool,
                           mask: jax.Array | None = None, *, order: str = "choice_then_score",
                           renormalize_kept: bool = False,
                           top1_weight: str = "probability") -> Routing:
  """Top-k routing of groups of tokens, probs [groups, S, E], each expert keeping the first
  `capacity` token copies it is offered in the order `order` (copy_priority); tokens where
  `mask` [groups, S] is False (padding) are offered to no expert and not counted as dropped.
  A kept copy keeps its weight (top_k_gates); with `renormalize_kept` a token's kept copies
  are scaled to sum to what all its k copies summed to (a token with none kept stays 0)."""
  groups, size, num_experts = probs.shape
  mask = jnp.ones((groups, size), jnp.bool_) if mask is None else mask
  gates, experts, scores = top_k_gates(probs, k, renormalize, top1_weight)  # [groups, S, k]
  chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.bool_)  # [groups, S, k, E]
  chosen &= mask[..., None, None]
  # Higher is served first; -1 marks a copy not routed to the expert.
  priority = size * k - copy_priority(scores, order).reshape(groups, size, k, 1)
  offered = jnp.where(chosen, priority, -1).reshape(groups, size * k, num_experts)
  kept_priority, copy = top_k_by_row(offered.swapaxes(1, 2), capacity)  # [groups, E, C]
  kept = kept_priority >= 0
  token = copy // k
  dispatch = jax.nn.one_hot(token, size, dtype=jnp.bool_) & kept[..., None]  # [g, E, C, S]
  weight = jnp.take_along_axis(gates.reshape(groups, 1, size * k), copy, axis=2)  # [g, E, C]
  dispatch = jnp.moveaxis(dispatch, 3, 1)  # [groups, S, E, C]
  combine = dispatch * jnp.where(kept, weight, 0.0)[:, None]
  if renormalize_kept:
    kept_sum = jnp.sum(combine, axis=(2, 3), keepdims=True)  # [groups, S, 1, 1]
    total = jnp.sum(gates, axis=-1)[..., None, None]
    combine *= jnp.where(kept_sum > 0, total / jnp.where(kept_sum > 0, kept_sum, 1.0), 0.0)
  return Routing(dispatch, combine, k * jnp.sum(mask) - jnp.sum(kept))


def expert_choice_routing(probs: jax.Array, capacity: int,
                          mask: jax.Array | None = None) -> Routing:
  """Each expert takes the `capacity` tokens of each group (probs [groups, S, E]) it gives the
  highest probability (ties: the earlier token), weighted by that probability; never a token
  where `mask` [groups, S] is False (padding: a slot left empty rather than given to it)."""
  groups, size, _ = probs.shape
  mask = jnp.ones((groups, size), jnp.bool_) if mask is None else mask
  # Probabilities are >= 0: -1 marks padding, which an expert takes only into an empty slot.
  offered = jnp.where(mask[..., None], probs, -1.0)
  weight, token = top_k_by_row(offered.swapaxes(1, 2), capacity)  # [groups, E, C]
  kept = weight >= 0
  dispatch = jax.nn.one_hot(token, size, dtype=jnp.bool_) & kept[..., None]  # [g, E, C, S]
  dispatch = jnp.moveaxis(dispatch, 3, 1)  # [groups, S, E, C]
  combine = dispatch * jnp.where(kept, weight, 0.0)[:, None]
  taken = jnp.any(dispatch, axis=(2, 3))  # [groups, S]
  return Routing(dispatch, combine, jnp.sum(mask & ~taken))


def dispatch_experts(x: jax.Array, routing: Routing, gate, up, down) -> jax.Array:
  """x [groups, S, embed] through the experts (weights [E, ...]) the routing dispatches it to:
  the capacity path (also expert choice's)."""
  dispatch = routing.dispatch.astype(x.dtype)
  # Each device gathers its own rows' tokens for every expert, then (under a mesh with an
  # `expert` axis) sends each expert's share to the devices holding it: an all-to-all.
  tokens = jnp.einsum("gsec,gsd->egcd", dispatch, x)  # [expert, groups, capacity, embed]
  tokens = constrain(tokens, (None, "batch", None, "embed"))
  tokens = constrain(tokens, ("expert", "batch", None, "embed"))
  hidden = nn.silu(jnp.einsum("egcd,edm->egcm", tokens, gate)) * jnp.einsum(
      "egcd,edm->egcm", tokens, up)
  hidden = constrain(hidden, ("expert", "batch", None, "mlp"))
  out = jnp.einsum("egcm,emd->egcd", hidden, down)
  out = constrain(out, ("expert", "batch", None, "embed"))
  out = constrain(out, (None, "batch", None, "embed"))  # back to the rows' devices
  return jnp.einsum("egcd,gsec->gsd", out, routing.combine.astype(x.dtype))


def grouped_swiglu(xs: jax.Array, sizes: jax.Array, gate, up, down) -> jax.Array:
  """xs [rows, embed], grouped by expert (the first sizes[0] rows expert 0's, ...; rows past
  sum(sizes) belong to none: padding, whose outputs are not to be used), through their
  experts (weights [E, ...]): grouped matmuls."""
  hidden = nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  return jax.lax.ragged_dot(hidden, down, sizes)


def _by_expert(experts: jax.Array, num_experts: int):
  """(order, sizes): the stable permutation that groups `experts` [n] (ids; >= num_experts:
  none, placed last) by expert, and each expert's count [num_experts] int32."""
  return (jnp.argsort(experts, stable=True),
          jnp.bincount(experts, length=num_experts).astype(jnp.int32))


def dropless_experts(x: jax.Array, gates: jax.Array, experts: jax.Array, gate, up, down,
                     expert_axes: tuple[str, ...] = ()) -> jax.Array:
  """x [tokens, embed] through its chosen experts (experts, gates [tokens, k]): the k copies of
  every token sorted by expert, grouped matmuls over the experts' contiguous runs.

  `expert_axes` (inside shard_map): the mesh axes the experts are split over, gate, up and
  down [E / n, ...] being this device's share (device i of n holds experts i E / n to
  (i + 1) E / n - 1 of the ids in `experts`): the copies go to their experts' devices and back
  (`_on_expert_devices`)."""
  tokens, k = experts.shape
  flat = experts.reshape(-1)  # [tokens * k]
  order, sizes = _by_expert(flat, gate.shape[0])
  xs = jnp.take(x, order // k, axis=0)  # [tokens * k, embed], grouped by expert
  if expert_axes:
    # A token's k experts differ: at most min(k, E / n) of its copies go to one device.
    out = _on_expert_devices(xs, flat[order], gate, up, down, expert_axes,
                             tokens * min(k, gate.shape[0]))
  else:
    out = grouped_swiglu(xs, sizes, gate, up, down)  # [tokens * k, embed]
  out = jnp.zeros_like(out).at[order].set(out).reshape(tokens, k, -1)
  return jnp.einsum("tkd,tk->td", out, gates.astype(out.dtype))


def _on_expert_devices(xs: jax.Array, experts: jax.Array, gate, up, down,
                       expert_axes: tuple[str, ...], per_device: int) -> jax.Array:
  """Token copies xs [copies, embed] of this device, sorted by their experts [copies] (global
  ids), through those experts on the n devices of `expert_axes` that hold them (E / n each:
  gate, up, down) and back, in xs's order; at most `per_device` copies want one device.

  XLA:CPU cannot run `jax.lax.ragged_all_to_all` (JAX 0.10: "not supported by XLA:CPU"), so
  the exchange is a padded `all_to_all`: each device sends every other one a buffer of
  `per_device` rows (dropless needs room for the worst case: tokens x min(k, E / n)), n times
  that in all, where a ragged exchange would move just the copies. The receiver groups what it
  got by its local expert (padding last) for the grouped matmuls."""
  embed = xs.shape[1]
  local = gate.shape[0]
  devices = jax.lax.axis_size(expert_axes)
  device = experts // local  # where each copy's expert lives
  sent = jnp.bincount(device, length=devices)
  slot = jnp.arange(xs.shape[0]) - (jnp.cumsum(sent) - sent)[device]  # in its device's run
  exchange = lambda a: jax.lax.all_to_all(a, expert_axes, 0, 0, tiled=True)
  received = exchange(
      jnp.zeros((devices, per_device, embed), xs.dtype).at[device, slot].set(xs))
  ids = exchange(jnp.full((devices, per_device), local, jnp.int32).at[device, slot].set(
      experts % local))  # [devices, per_device]: local expert ids, `local` for padding
  order, sizes = _by_expert(ids.reshape(-1), local)
  out = grouped_swiglu(received.reshape(-1, embed)[order], sizes, gate, up, down)
  out = jnp.zeros_like(out).at[order].set(out).reshape(devices, per_device, embed)
  return exchange(out)[device, slot]


class _Kernel(nn.Module):
  """A float32 "kernel" param of `shape` with logical `axes`, normal(stddev / sqrt(fan in))."""

  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  fan_in_axis: int
  stddev: float = 1.0

  @nn.compact
  def __call__(self) -> jax.Array:
    init = nn.initializers.normal(self.stddev * self.shape[self.fan_in_axis]**-0.5)
    return self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                      jnp.float32)


class MoE(nn.Module):
  """[batch, length, embed] -> [batch, length, embed] through `config.moe.num_experts` experts;
  `segment_ids` [batch, length] (optional) mark padding (0), which routing leaves out."""

  config: "TransformerConfig"  # noqa: F821 (transformer.py)

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    cfg, moe = self.config, self.config.moe
    batch, length, embed = x.shape
    real = (jnp.ones((batch, length), jnp.bool_) if segment_ids is None
            else segment_ids > 0)  # [batch, length]: not padding
    real_mean = lambda v: (jnp.sum(v * real[..., None], axis=(0, 1))
                           / jnp.maximum(jnp.sum(real), 1))  # [batch, length, n] -> [n]
    num_experts, k = moe.num_experts, moe.experts_per_token
    router = _Kernel((embed, num_experts), ("embed", None), 0, ROUTER_INIT_SCALE,
                     name="router")()
    weights = [
        _Kernel((num_experts, embed, cfg.mlp_dim), ("expert", "embed", "mlp"), 1, name=name)()
        .astype(cfg.compute_dtype) for name in ("gate", "up")]
    weights.append(_Kernel((num_experts, cfg.mlp_dim, embed), ("expert", "mlp", "embed"), 1,
                           name="down")().astype(cfg.compute_dtype))

    logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), router)  # float32
    probs = jax.nn.softmax(logits, axis=-1)
    if moe.router_z_loss_weight > 0:
      z = real_mean(jnp.square(jax.nn.logsumexp(logits, axis=-1, keepdims=True)))[0]
      sow_aux_loss(self, "router_z_loss", moe.router_z_loss_weight * z)

    load = None  # top-k: the fraction of token copies routed to each expert [E]
    if moe.router == "expert_choice":
      routing = expert_choice_routing(
          probs, expert_capacity(length, num_experts, moe.capacity_factor), real)
      y = dispatch_experts(x, routing, *weights)
      dropped, copies = routing.dropped, 1
    else:
      gates, experts, _ = top_k_gates(probs, k, moe.renormalize_combine, moe.top1_weight)
      gates *= real[..., None]  # padding: no expert's output
      load = real_mean(jnp.sum(jax.nn.one_hot(experts, num_experts), axis=2)) / k
      if moe.load_balance_weight > 0:
        balance = num_experts * jnp.sum(load * real_mean(probs))
        sow_aux_loss(self, "load_balance", moe.load_balance_weight * balance)
      if moe.capacity_factor > 0:
        routing = top_k_capacity_routing(
            probs, k, expert_capacity(length, num_experts, moe.capacity_factor, k),
            moe.renormalize_combine, real, order=moe.capacity_order,
            renormalize_kept=moe.renormalize_kept, top1_weight=moe.top1_weight)
        y = dispatch_experts(x, routing, *weights)
        dropped = routing.dropped
      else:
        y = _dropless_sharded(x, gates, experts, weights)
        dropped = jnp.zeros((), jnp.int32)
      copies = k
    sow_metric(self, "moe_dropped_tokens", dropped)
    self._sow_mean("moe_dropped_fraction", dropped / copies)
    if load is not None:
      tokens = jnp.sum(real)
      for expert in range(num_experts):
        self._sow_mean(f"moe_load/expert_{expert}", load[expert] * tokens)
      # The loads sum to 1: their mean is 1 / E, their coefficient of variation E * std.
      self._sow_mean("moe_load_cv", num_experts * jnp.std(load) * tokens)
    return constrain(y.astype(x.dtype), ("batch", "length", "embed"))

  def _sow_mean(self, name: str, total: jax.Array) -> None:
    """Logs `name` as a mean over a step's tokens and the model's MoE layers: `total`, this
    layer's sum over its (non-padding) tokens, is sown over the number of MoE layers as
    "mean/<name>" (training/objective.py's MEAN: summed over layers and micro-batches, then
    divided by the step's token count when logged)."""
    cfg = self.config
    sow_metric(self, "mean/" + name, total / (cfg.num_layers // cfg.moe.every))


def _dropless_sharded(x, gates, experts, weights):
  """The dropless path inside shard_map under a mesh (a global sort would gather every token
  onto every device): each device sorts its own rows' token copies; with the experts split
  over the `expert` mesh axis the copies travel to their experts' devices and back
  (`dropless_experts`' expert_axes), so no expert weight is gathered over it. The experts'
  other dims are gathered whole (FSDP's gather of `embed`, and `mlp` under tensor parallelism:
  the grouped matmuls run on whole experts)."""
  rows = partition_spec(("batch", None, None), x.shape)
  held = partition_spec(("expert", None, None), weights[0].shape)
  expert_axes = held[0] or ()
  expert_axes = (expert_axes,) if isinstance(expert_axes, str) else tuple(expert_axes)

  def per_shard(x, gates, experts, gate, up, down):
    batch, length, embed = x.shape
    y = dropless_experts(x.reshape(-1, embed), gates.reshape(batch * length, -1),
                         experts.reshape(batch * length, -1), gate, up, down, expert_axes)
    return y.reshape(batch, length, embed)

  return map_shards(per_shard, (rows, rows, rows, held, held, held), rows)(
      x, gates, experts, *weights)

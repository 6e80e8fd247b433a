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
                   `renormalize_combine`. Two paths:
                   - dropless (`capacity_factor=0`): the token copies sorted by expert and run
                     through grouped matmuls (`jax.lax.ragged_dot`); no token is ever dropped.
                   - capacity (`capacity_factor=c > 0`): each expert takes at most
                     C = ceil(c * k * S / E) token copies of a group of S tokens (one row of the
                     batch); an expert offered more keeps those of highest router probability
                     (batch-prioritised routing) and drops the rest, which then skip that
                     expert (the residual carries them). Computed with dispatch [S, E, C] and
                     combine tensors (GShard).
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
and a step's micro-batches (0 for dropless).

Sharding. The capacity path's dispatched tokens [expert, batch, capacity, embed] lie with the
experts over `expert` and the rows over the remaining batch axes; the rest of the model splits
rows over `expert` too, so XLA moves tokens to their experts' devices and back with all-to-alls.
The dropless path runs inside shard_map on each device's rows with every expert's weights
(gathered): expert parallelism is the capacity path's. (On CPU, XLA computes `ragged_dot` as a
masked dense matmul over every expert; GPU and TPU have grouped kernels.)
"""
import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llm_research.models.layers import constrain, map_shards, partition_spec
from llm_research.models.registry import shape_field
from llm_research.models.stack import sow_aux_loss, sow_metric

MOE_ROUTERS = ("top_k", "expert_choice")
ROUTER_INIT_SCALE = 0.1  # router stddev ROUTER_INIT_SCALE / sqrt(embed): logits ~ 0.1


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """A model's mixture-of-experts settings, its config section's `moe` group (used when
  `mlp_impl="moe"`): `num_experts` SwiGLU experts in every `every`-th layer (1: all; 2: every
  other, the last of each pair). `router` "top_k": `experts_per_token` (k) per token,
  `capacity_factor` 0 = dropless, c > 0 = each expert takes at most ceil(c * k * length / E)
  tokens of a row; "expert_choice": each expert takes ceil(c * length / E) tokens of a row
  (c > 0). The router losses' weights: load balancing (top_k) and router z-loss."""

  num_experts: int = shape_field(0)
  experts_per_token: int = 2
  router: str = "top_k"
  capacity_factor: float = 0.0
  every: int = shape_field(1)
  renormalize_combine: bool = True
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
    need(self.every >= 1 and num_layers % self.every == 0, "every",
         f"must divide num_layers={num_layers}")
    for field in ("load_balance_weight", "router_z_loss_weight"):
      need(getattr(self, field) >= 0, field, "must not be negative")
    return found


def expert_capacity(group_size: int, num_experts: int, factor: float, k: int = 1) -> int:
  """Slots per expert per group: ceil(factor * k * group_size / num_experts), at least 1 and
  at most group_size (an expert can take each token once)."""
  return max(1, min(group_size, math.ceil(factor * k * group_size / num_experts)))


def top_k_gates(probs: jax.Array, k: int, renormalize: bool):
  """(combine weights [..., k], experts [..., k] int32, scores [..., k]): the k most probable
  experts per token, their probabilities as scores, renormalised to sum to 1 if asked."""
  scores, experts = jax.lax.top_k(probs, k)
  gates = scores / jnp.sum(scores, axis=-1, keepdims=True) if renormalize else scores
  return gates, experts.astype(jnp.int32), scores


class Routing(NamedTuple):
  """Dispatch [groups, S, E, C] (bool) and combine [groups, S, E, C] (float32) tensors, and
  the number of token copies (top-k) or tokens (expert choice) dropped."""

  dispatch: jax.Array
  combine: jax.Array
  dropped: jax.Array


def top_k_capacity_routing(probs: jax.Array, k: int, capacity: int, renormalize: bool,
                           mask: jax.Array | None = None) -> Routing:
  """Top-k routing of groups of tokens, probs [groups, S, E], each expert keeping its
  `capacity` highest-scored token copies (ties: the earlier token); tokens where `mask`
  [groups, S] is False (padding) are offered to no expert and not counted as dropped."""
  groups, size, num_experts = probs.shape
  mask = jnp.ones((groups, size), jnp.bool_) if mask is None else mask
  gates, experts, scores = top_k_gates(probs, k, renormalize)  # [groups, S, k]
  chosen = jax.nn.one_hot(experts, num_experts, dtype=jnp.bool_)  # [groups, S, k, E]
  chosen &= mask[..., None, None]
  # Probabilities are >= 0: -1 marks a copy not routed to the expert.
  offered = jnp.where(chosen, scores[..., None], -1.0).reshape(groups, size * k, num_experts)
  kept_scores, copy = jax.lax.top_k(offered.swapaxes(1, 2), capacity)  # [groups, E, C]
  kept = kept_scores >= 0
  token = copy // k
  dispatch = jax.nn.one_hot(token, size, dtype=jnp.bool_) & kept[..., None]  # [g, E, C, S]
  weight = jnp.take_along_axis(gates.reshape(groups, 1, size * k), copy, axis=2)  # [g, E, C]
  dispatch = jnp.moveaxis(dispatch, 3, 1)  # [groups, S, E, C]
  combine = dispatch * jnp.where(kept, weight, 0.0)[:, None]
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
  weight, token = jax.lax.top_k(offered.swapaxes(1, 2), capacity)  # [groups, E, C]
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


def dropless_experts(x: jax.Array, gates: jax.Array, experts: jax.Array, gate, up,
                     down) -> jax.Array:
  """x [tokens, embed] through its chosen experts (experts, gates [tokens, k]): the k copies of
  every token sorted by expert, grouped matmuls over the experts' contiguous runs."""
  tokens, k = experts.shape
  flat = experts.reshape(-1)  # [tokens * k]
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)  # [E]
  xs = jnp.take(x, order // k, axis=0)  # [tokens * k, embed], grouped by expert
  hidden = nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
  out = jax.lax.ragged_dot(hidden, down, sizes)  # [tokens * k, embed]
  out = jnp.zeros_like(out).at[order].set(out).reshape(tokens, k, -1)
  return jnp.einsum("tkd,tk->td", out, gates.astype(out.dtype))


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

    if moe.router == "expert_choice":
      routing = expert_choice_routing(
          probs, expert_capacity(length, num_experts, moe.capacity_factor), real)
      y = dispatch_experts(x, routing, *weights)
      dropped = routing.dropped
    else:
      gates, experts, _ = top_k_gates(probs, k, moe.renormalize_combine)
      gates *= real[..., None]  # padding: no expert's output
      if moe.load_balance_weight > 0:
        routed = real_mean(jnp.sum(jax.nn.one_hot(experts, num_experts), axis=2))  # [E]
        balance = num_experts * jnp.sum(routed / k * real_mean(probs))
        sow_aux_loss(self, "load_balance", moe.load_balance_weight * balance)
      if moe.capacity_factor > 0:
        routing = top_k_capacity_routing(
            probs, k, expert_capacity(length, num_experts, moe.capacity_factor, k),
            moe.renormalize_combine, real)
        y = dispatch_experts(x, routing, *weights)
        dropped = routing.dropped
      else:
        y = _dropless_per_device(x, gates, experts, weights)
        dropped = jnp.zeros((), jnp.int32)
    sow_metric(self, "moe_dropped_tokens", dropped)
    return constrain(y.astype(x.dtype), ("batch", "length", "embed"))


def _dropless_per_device(x, gates, experts, weights):
  """The dropless path on each device's rows (shard_map under a mesh: a global sort would
  gather every token onto every device), with every expert's weights."""
  rows = partition_spec(("batch", None, None), x.shape)
  whole = PartitionSpec()

  def per_shard(x, gates, experts, gate, up, down):
    batch, length, embed = x.shape
    y = dropless_experts(x.reshape(-1, embed), gates.reshape(batch * length, -1),
                         experts.reshape(batch * length, -1), gate, up, down)
    return y.reshape(batch, length, embed)

  return map_shards(per_shard, (rows, rows, rows, whole, whole, whole), rows)(
      x, gates, experts, *weights)

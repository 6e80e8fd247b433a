"""The decoder stack: `num_layers` blocks, scanned or looped, rematerialised by a named policy.

The transformer and bGPT's patch and byte decoders all build their layers with `decoder_stack`.
A block is a module class built as `block(config, decode, cache_len)` whose `__call__(x,
positions, segment_ids)` returns the new x; it may keep a 'cache' (decoding), sow auxiliary
losses (`sow_aux_loss`) and metrics (`sow_metric`). A block may hold several layers (the MoE
transformer scans groups of `moe.every` layers): `num_blocks` says how many to stack. Under scan
every collection gets a leading layers axis, so params are stored [layers, ...] (one entry per
block) with the logical axis "layers".

A `LayerPlan` adds per-layer switches that depend on the layer's index (LayerSkip's layer
dropout, every layer's output for its early-exit loss); without one the stack is exactly the
plain stack. Its block is a subclass of the given one, so params keep their paths.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.kernels.flash_attention import FLASH_RESIDUAL_NAMES

# Which intermediates the backward pass keeps rather than recomputes. Every policy also keeps
# the attention kernels' residuals, so rematerialisation never reruns an attention forward
# kernel: the Pallas kernel's output and log-sum-exp (by name), and the outputs of JAX's cuDNN
# forward primitive (its output and softmax statistics, which carry no names: without this,
# "dots" ran cuDNN's forward twice per layer). "none" does not rematerialise at all.
_BASE_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
REMAT_POLICIES = ("none",) + tuple(_BASE_POLICIES)
CUDNN_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"  # jax._src.cudnn's primitive
AUX_LOSS = "aux_loss"  # the collection auxiliary losses are sown into
METRICS = "metrics"  # the collection of logged scalars that are not losses


def remat_policy(name: str):
  """The jax.checkpoint policy of `name` (None for "none")."""
  if name == "none":
    return None
  policies = jax.checkpoint_policies
  attention_residuals = policies.save_from_both_policies(
      policies.save_only_these_names(*FLASH_RESIDUAL_NAMES), _is_cudnn_attention_forward)
  return policies.save_from_both_policies(_BASE_POLICIES[name], attention_residuals)


def _is_cudnn_attention_forward(primitive, *_, **__) -> bool:
  return primitive.name == CUDNN_ATTENTION_FORWARD


def sow_aux_loss(module: nn.Module, name: str, value: jax.Array) -> None:
  """Adds a scalar to the training objective, as it should enter it (weight applied), logged
  as `aux_loss/<name>` (summed over the layers that sow it; `collect_aux_losses`)."""
  module.sow(AUX_LOSS, name, value)


def sow_metric(module: nn.Module, name: str, value: jax.Array) -> None:
  """Logs a scalar as `<name>` (not part of the objective): summed over the layers that sow it
  and over a step's micro-batches, so a count (e.g. "moe_dropped_tokens"), not a mean."""
  module.sow(METRICS, name, value)


def collect_aux_losses(variables, collection: str = AUX_LOSS) -> dict[str, jax.Array]:
  """{name: the sum of every value sown under that name} from an apply's mutable variables
  (the auxiliary losses, or with `collection=METRICS` the metrics)."""
  totals = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get(collection, {})):
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    totals[name] = totals.get(name, 0.0) + leaf.sum()
  return totals


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Per-layer switches of the stack (LayerSkip, Elhoushi et al. 2024); all off by default.

  layer_dropout  p_max: each row skips layer l of L (the layer's output is its input) with
                 probability `layer_dropout_rate(p_max, l, L)`, drawn per row and layer from
                 the "dropout" rng stream (so it needs one: training only).
  layer_outputs  the stack also returns every block's output [blocks, batch, length, embed].
  """

  layer_dropout: float = 0.0
  layer_outputs: bool = False


def layer_dropout_rate(p_max: float, layer, num_layers: int):
  """LayerSkip's rate of layer `layer` (0-based): p_max (e^(l ln 2 / (L - 1)) - 1), rising
  with depth from 0 at the first layer to p_max at the last (deep layers matter least to the
  early exits that must not need them). Needs L >= 2."""
  return p_max * (jnp.exp(layer * jnp.log(2.0) / (num_layers - 1)) - 1.0)


@functools.cache
def _planned(block: type, plan: LayerPlan, num_blocks: int) -> type:
  """`block` called as (x, positions, segment_ids, layer) -> (x, the layer's output or None):
  scan's calling convention, with the block's index (traced under scan) driving `plan`."""
  class Planned(block):
    @nn.compact
    def __call__(self, x, positions, segment_ids, layer):
      y = super().__call__(x, positions, segment_ids)
      if plan.layer_dropout > 0:
        rate = layer_dropout_rate(plan.layer_dropout, layer, num_blocks)
        skip = jax.random.bernoulli(self.make_rng("dropout"), rate, (x.shape[0],))
        y = jnp.where(skip[:, None, None], x, y)
      return y, (y if plan.layer_outputs else None)

  Planned.__name__ = Planned.__qualname__ = f"Planned{block.__name__}"
  return Planned


@functools.cache
def _scan_convention(block: type) -> type:
  """`block` in scan's calling convention, (carry, *broadcast) -> (carry, None); a subclass, so
  its params keep the block's own paths."""
  class Scanned(block):
    @nn.compact
    def __call__(self, x, positions, segment_ids):
      return super().__call__(x, positions, segment_ids), None

  Scanned.__name__ = Scanned.__qualname__ = f"Scanned{block.__name__}"
  return Scanned


def decoder_stack(block: type, config, x, positions, segment_ids, *, decode: bool = False,
                  cache_len: int = 0, name: str = "layers", num_blocks: int | None = None,
                  plan: LayerPlan | None = None):
  """Runs `num_blocks` (default `config.num_layers`) blocks on x [batch, length, embed]; call
  it inside a compact method. Reads `config.scan_layers` and `config.remat_policy`. Scanned
  params live under `name`, looped ones under `name_0`, `name_1`, ...

  Returns x; with a `plan`, (x, every block's output [blocks, batch, length, embed] or None)."""
  num_blocks = config.num_layers if num_blocks is None else num_blocks
  policy = remat_policy(config.remat_policy)
  if plan is not None:
    return _planned_stack(_planned(block, plan, num_blocks), config, x, positions, segment_ids,
                          decode=decode, cache_len=cache_len, name=name, num_blocks=num_blocks,
                          policy=policy)
  if config.scan_layers:
    layer = _scan_convention(block)
    if policy is not None:
      layer = nn.remat(layer, policy=policy, prevent_cse=False)
    x, _ = _scan(layer, num_blocks, (nn.broadcast, nn.broadcast))(
        config, decode, cache_len, name=name)(x, positions, segment_ids)
    return x
  if policy is not None:
    block = nn.remat(block, policy=policy)
  for i in range(num_blocks):
    x = block(config, decode, cache_len, name=f"{name}_{i}")(x, positions, segment_ids)
  return x


def _scan(layer: type, num_blocks: int, in_axes: tuple):
  """`layer` (in scan's calling convention) scanned over `num_blocks` blocks."""
  return nn.scan(layer, variable_axes={"params": 0, "cache": 0, AUX_LOSS: 0, METRICS: 0},
                 split_rngs={"params": True, "dropout": True},  # a key per layer
                 in_axes=in_axes, length=num_blocks,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def _planned_stack(planned: type, config, x, positions, segment_ids, *, decode, cache_len,
                   name, num_blocks, policy):
  """`decoder_stack` of a `_planned` block: (x, the blocks' outputs stacked or None)."""
  if config.scan_layers:
    if policy is not None:
      planned = nn.remat(planned, policy=policy, prevent_cse=False)
    return _scan(planned, num_blocks, (nn.broadcast, nn.broadcast, 0))(
        config, decode, cache_len, name=name)(x, positions, segment_ids,
                                               jnp.arange(num_blocks))
  if policy is not None:
    planned = nn.remat(planned, policy=policy)
  outputs = []
  for i in range(num_blocks):
    x, output = planned(config, decode, cache_len, name=f"{name}_{i}")(
        x, positions, segment_ids, i)
    outputs.append(output)
  return x, (None if outputs[0] is None else jnp.stack(outputs))

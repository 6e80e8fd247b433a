"""The decoder stack: `num_layers` blocks, scanned or looped, rematerialised by a named policy.

The transformer and bGPT's patch and byte decoders all build their layers with `decoder_stack`.
A block is a module class built as `block(config, decode, cache_len)` whose `__call__(x,
positions, segment_ids)` returns the new x; it may keep a 'cache' (decoding), sow auxiliary
losses (`sow_aux_loss`) and metrics (`sow_metric`). A block may hold several layers (the MoE
transformer scans groups of `moe.every` layers): `num_blocks` says how many to stack. Under scan
every collection gets a leading layers axis, so params are stored [layers, ...] (one entry per
block) with the logical axis "layers".
"""
import functools

import flax.linen as nn
import jax

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
                  cache_len: int = 0, name: str = "layers", num_blocks: int | None = None):
  """Runs `num_blocks` (default `config.num_layers`) blocks on x [batch, length, embed]; call
  it inside a compact method. Reads `config.scan_layers` and `config.remat_policy`. Scanned
  params live under `name`, looped ones under `name_0`, `name_1`, ..."""
  num_blocks = config.num_layers if num_blocks is None else num_blocks
  policy = remat_policy(config.remat_policy)
  if config.scan_layers:
    layer = _scan_convention(block)
    if policy is not None:
      layer = nn.remat(layer, policy=policy, prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0, "cache": 0, AUX_LOSS: 0, METRICS: 0},
                    split_rngs={"params": True, "dropout": True},  # a key per layer
                    in_axes=(nn.broadcast, nn.broadcast),
                    length=num_blocks, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(config, decode, cache_len, name=name)(x, positions, segment_ids)
    return x
  if policy is not None:
    block = nn.remat(block, policy=policy)
  for i in range(num_blocks):
    x = block(config, decode, cache_len, name=f"{name}_{i}")(x, positions, segment_ids)
  return x

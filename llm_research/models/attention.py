"""Grouped-query self-attention with rotary embeddings, packed segments and a KV cache.

`model.attention_impl` picks how causal attention over packed rows is computed in training and
prefill (`ATTENTION_IMPLS`; decoding with the KV cache always uses the jnp path):
  "xla"     the jnp reference (`kernels.flash_attention.masked_attention`): materialises the
            [length, length] probabilities, saving them in the compute dtype for the backward.
  "pallas"  the Pallas flash-attention kernel (kernels/flash_attention.py), memory linear in
            length; under a mesh it runs per device on its shard (batch over the data axes,
            heads over `tensor`) inside shard_map.
  "cudnn"   cuDNN's fused flash attention (`jax.nn.dot_product_attention(implementation=
            "cudnn")`), packed rows as cuDNN's ragged segments; GPU only, bfloat16/float16,
            head_dim a multiple of 8 up to 128.
  "auto"    cuDNN on GPU where it applies (else Pallas), Pallas on TPU, XLA on CPU.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.kernels.flash_attention import (flash_attention, flash_attention_reference,
                                                  masked_attention)
from llm_research.models.layers import apply_rotary, constrain, map_shards, partition_spec

CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CUDNN_MAX_HEAD_DIM = 128


def xla_attention(query, key, value, *, segment_ids):
  """Causal attention over packed rows: the plain XLA path."""
  return flash_attention_reference(query, key, value, causal=True, segment_ids=segment_ids)


def pallas_attention(query, key, value, *, segment_ids):
  """Causal attention over packed rows: the Pallas kernel, on each device's shard.

  Batch splits over the mesh axes of `batch`, heads over those of `heads` when they divide both
  the query and the kv heads (so each shard keeps whole GQA groups); lengths stay whole.
  """
  q_spec = partition_spec(("batch", None, "heads", None), query.shape)
  kv_spec = partition_spec(("batch", None, "kv_heads", None), key.shape)
  if q_spec[2] != kv_spec[2]:  # e.g. one kv head: keep the heads whole on every device
    q_spec = partition_spec(("batch", None, None, None), query.shape)
    kv_spec = partition_spec(("batch", None, None, None), key.shape)
  kernel = lambda q, k, v, seg: flash_attention(q, k, v, causal=True, segment_ids=seg)
  return map_shards(kernel, (q_spec, kv_spec, kv_spec, jax.sharding.PartitionSpec(q_spec[0])),
                    q_spec)(query, key, value, segment_ids)


def cudnn_attention(query, key, value, *, segment_ids):
  """Causal attention over packed rows: cuDNN, each row's segments as ragged sequences."""
  lengths, offsets = segment_lengths_and_offsets(segment_ids)
  # A private entry point: jax.nn.dot_product_attention does not pass packed offsets on.
  from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
  return dot_product_attention(
      query, key, value, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
      kv_offsets=offsets, scale=query.shape[-1]**-0.5, mask_type=MaskType.CAUSAL)


def segment_lengths_and_offsets(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Packed rows [batch, length] (ids 1, 2, ... in contiguous runs, 0 = padding) -> cuDNN's
  ragged description: lengths [batch, length] of each row's segments in order (-1 past the
  last) and their start offsets [batch, length + 1] (-1 past the last). Padding is no segment.
  """
  batch, length = segment_ids.shape
  starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  starts &= segment_ids > 0
  index = jnp.cumsum(starts, axis=1) - 1  # the segment each position belongs to, in order
  count = starts.sum(axis=1, keepdims=True)  # [batch, 1]
  slots = jnp.arange(length)[None]
  rows = jnp.arange(batch)[:, None]
  target = jnp.where(segment_ids > 0, index, length)  # padding lands out of range: dropped
  lengths = jnp.zeros((batch, length), jnp.int32).at[rows, target].add(1, mode="drop")
  lengths = jnp.where(slots < count, lengths, -1)
  offsets = jnp.full((batch, length + 1), -1, jnp.int32).at[
      rows, jnp.where(starts, index, length + 1)].set(
          jnp.broadcast_to(slots, (batch, length)).astype(jnp.int32), mode="drop")
  return lengths, offsets


ATTENTION_IMPLS = {"xla": xla_attention, "pallas": pallas_attention, "cudnn": cudnn_attention}


def resolve_attention_impl(impl: str, dtype, head_dim: int, backend: str) -> str:
  """The implementation `impl` stands for on `backend` ("auto" picks; others are themselves)."""
  if impl != "auto":
    return impl
  if backend == "gpu":
    cudnn_ok = (jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0
                and head_dim <= CUDNN_MAX_HEAD_DIM)
    return "cudnn" if cudnn_ok else "pallas"
  return "pallas" if backend == "tpu" else "xla"


class Attention(nn.Module):
  """Multi-head / grouped-query / multi-query attention (num_kv_heads divides num_heads).

  With `decode=True` the keys and values are written into a 'cache' collection of
  `cache_len` slots at each token's absolute position, and queries attend to every slot at or
  before their own position: prefill and one-token steps are the same code.
  """

  config: "TransformerConfig"  # noqa: F821 (transformer.py)
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    # x: [batch, length, embed]; positions, segment_ids: [batch, length]
    cfg = self.config
    project = lambda name, heads, axis: cfg.linear(
        (heads, cfg.head_dim), ("embed",), (axis, "head_dim"), name=name)(x)
    q = project("query", cfg.num_heads, "heads")
    k = project("key", cfg.num_kv_heads, "kv_heads")
    v = project("value", cfg.num_kv_heads, "kv_heads")
    q = apply_rotary(q, positions, cfg.rope_theta, cfg.rope_scaling)
    k = apply_rotary(k, positions, cfg.rope_theta, cfg.rope_scaling)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))

    if self.decode:
      out = self._attend_cached(q, k, v, positions)
    else:
      impl = resolve_attention_impl(cfg.attention_impl, q.dtype, cfg.head_dim,
                                    jax.default_backend())
      out = ATTENTION_IMPLS[impl](q, k, v, segment_ids=segment_ids)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    return cfg.linear((x.shape[-1],), ("heads", "head_dim"), ("embed",), name="out")(out)

  def _attend_cached(self, q, k, v, positions):
    batch = q.shape[0]
    shape = (batch, self.cache_len, self.config.num_kv_heads, self.config.head_dim)
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    rows = jnp.arange(batch)[:, None]
    cached_k.value = cached_k.value.at[rows, positions].set(k, mode="drop")
    cached_v.value = cached_v.value.at[rows, positions].set(v, mode="drop")
    mask = jnp.arange(self.cache_len)[None, None, :] <= positions[:, :, None]
    return masked_attention(q, cached_k.value, cached_v.value, mask)

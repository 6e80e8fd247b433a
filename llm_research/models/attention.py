"""Grouped-query self-attention with rotary embeddings, packed segments and a KV cache."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.kernels.flash_attention import flash_attention
from llm_research.models.layers import Dtype, Linear, apply_rotary, constrain

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def masked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     mask: jax.Array) -> jax.Array:
  """Softmax attention in float32; GQA by grouping query heads, K/V never repeated.

  query: [batch, q_len, heads, head_dim]; key, value: [batch, kv_len, kv_heads, head_dim];
  mask: [batch, q_len, kv_len] (True = attend). Returns [batch, q_len, heads, head_dim].
  A row with nothing to attend to gives a uniform average, never NaN.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  groups = heads // kv_heads
  q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32)
  logits = logits * head_dim**-0.5
  logits = jnp.where(mask[:, None, None], logits, _MASKED)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, value)
  return out.reshape(batch, q_len, heads, head_dim)


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[batch, length] segment ids -> [batch, length, length]: causal and within one segment."""
  length = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same


def xla_attention(query, key, value, *, segment_ids):
  """Causal attention over packed sequences: the plain XLA path."""
  return masked_attention(query, key, value, causal_segment_mask(segment_ids))


def pallas_attention(query, key, value, *, segment_ids):
  """Causal attention over packed sequences: the Pallas flash-attention kernel."""
  return flash_attention(query, key, value, causal=True, segment_ids=segment_ids)


ATTENTION_IMPLS = {"xla": xla_attention, "pallas": pallas_attention}


class Attention(nn.Module):
  """Multi-head / grouped-query / multi-query attention (num_kv_heads divides num_heads).

  With `decode=True` the keys and values are written into a 'cache' collection of
  `cache_len` slots at each token's absolute position, and queries attend to every slot at or
  before their own position: prefill and one-token steps are the same code.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  decode: bool = False
  cache_len: int = 0
  linear_impl: str = "dense"

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    # x: [batch, length, embed]; positions, segment_ids: [batch, length]
    def project(name, heads, heads_axis):
      return Linear((heads, self.head_dim), ("embed",), (heads_axis, "head_dim"), self.dtype,
                    impl=self.linear_impl, name=name)(x)

    q = project("query", self.num_heads, "heads")
    k = project("key", self.num_kv_heads, "kv_heads")
    v = project("value", self.num_kv_heads, "kv_heads")
    q = apply_rotary(q, positions, self.rope_theta)
    k = apply_rotary(k, positions, self.rope_theta)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))

    if self.decode:
      out = self._attend_cached(q, k, v, positions)
    else:
      out = ATTENTION_IMPLS[self.attention_impl](q, k, v, segment_ids=segment_ids)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    return Linear((x.shape[-1],), ("heads", "head_dim"), ("embed",), self.dtype,
                  impl=self.linear_impl, name="out")(out)

  def _attend_cached(self, q, k, v, positions):
    batch = q.shape[0]
    shape = (batch, self.cache_len, self.num_kv_heads, self.head_dim)
    cached_k = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
    rows = jnp.arange(batch)[:, None]
    cached_k.value = cached_k.value.at[rows, positions].set(k, mode="drop")
    cached_v.value = cached_v.value.at[rows, positions].set(v, mode="drop")
    mask = jnp.arange(self.cache_len)[None, None, :] <= positions[:, :, None]
    return masked_attention(q, cached_k.value, cached_v.value, mask)


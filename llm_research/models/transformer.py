"""The LLaMA-style decoder: the one transformer core every variant switches on.

Pre-norm blocks of grouped-query attention (rotary positions, packed segments) and a SwiGLU
MLP, RMSNorm, no biases. Params are float32; compute runs in `dtype`. Layers are optionally
scanned (compile time flat in depth) and rematerialised by a named policy.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.config import ConfigError
from llm_research.models.attention import ATTENTION_IMPLS, Attention
from llm_research.models.bitlinear import LINEAR_IMPLS
from llm_research.models.layers import Linear, RMSNorm, SwiGLU, constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  num_layers: int = 4
  embed_dim: int = 256
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 768
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"
  linear_impl: str = "dense"  # attention and MLP projections; embedding and head stay float

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ConfigError(f"model config: {msg}")
    check(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
          f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary")
    check(self.dtype in DTYPES, f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
    check(self.remat_policy in REMAT_POLICIES,
          f"remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    check(self.attention_impl in ATTENTION_IMPLS,
          f"attention_impl={self.attention_impl!r} is not one of {sorted(ATTENTION_IMPLS)}")
    check(self.linear_impl in LINEAR_IMPLS,
          f"linear_impl={self.linear_impl!r} is not one of {sorted(LINEAR_IMPLS)}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def num_params(self, include_embeddings: bool = True) -> int:
    attn = self.embed_dim * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.embed_dim * self.mlp_dim
    per_layer = attn + mlp + 2 * self.embed_dim
    embeddings = self.vocab_size * self.embed_dim * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + self.embed_dim + (embeddings if include_embeddings else 0)


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)). Signature fits `nn.scan`: (carry, _) -> (carry, _)."""

  config: TransformerConfig
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.config
    dtype = cfg.compute_dtype
    h = RMSNorm(cfg.norm_eps, dtype, name="attn_norm")(x)
    h = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                  cfg.attention_impl, dtype, self.decode, self.cache_len, cfg.linear_impl,
                  name="attn")(
                      h, positions, segment_ids)
    x = constrain(x + h, ("batch", "length", "embed"))
    h = RMSNorm(cfg.norm_eps, dtype, name="mlp_norm")(x)
    x = x + SwiGLU(cfg.mlp_dim, dtype, cfg.linear_impl, name="mlp")(h)
    return constrain(x, ("batch", "length", "embed"))


class _ScannedBlock(Block):
  @nn.compact
  def __call__(self, x, positions, segment_ids):
    return super().__call__(x, positions, segment_ids), None


class Transformer(nn.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (float32).

  `positions` are the rotary positions (restarting at 0 in each packed document; absolute
  cache slots when decoding); `segment_ids` keep packed documents from attending to each other.
  """

  config: TransformerConfig
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None):
    cfg = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (cfg.vocab_size, cfg.embed_dim), jnp.float32)
    x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
    x = constrain(x, ("batch", "length", "embed"))

    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.scan_layers:
      block = _ScannedBlock
      if cfg.remat_policy != "none":
        block = nn.remat(block, policy=policy, prevent_cse=False)
      stack = nn.scan(
          block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, self.decode, self.cache_len, name="layers")(x, positions, segment_ids)
    else:
      block = nn.remat(Block, policy=policy) if cfg.remat_policy != "none" else Block
      for i in range(cfg.num_layers):
        x = block(cfg, self.decode, self.cache_len, name=f"layers_{i}")(x, positions, segment_ids)

    x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("ble,ve->blv", x, embedding.astype(cfg.compute_dtype)) \
          * cfg.embed_dim**-0.5
    else:
      logits = Linear((cfg.vocab_size,), ("embed",), ("vocab",), cfg.compute_dtype,
                      name="head")(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

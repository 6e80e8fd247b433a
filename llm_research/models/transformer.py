"""The LLaMA-style decoder: the one transformer core every variant switches on.

Pre-norm blocks of grouped-query attention (rotary positions, packed segments) and an MLP from
the MLP registry (SwiGLU by default), RMSNorm, no biases. Params are float32; compute runs in
`dtype`. The layers are the decoder stack (stack.py): scanned or looped, rematerialised by a
named policy. Projections are `Linear`s of base `linear_impl`, with LoRA adapters when
`lora_rank > 0`; the embedding and the output head stay dense.

With `mlp_impl="moe"` every `moe.every`-th layer's MLP is a mixture of experts (moe.py; its
experts are dense, without adapters). For `moe.every > 1` the stack repeats a `LayerGroup` of
`moe.every` layers, the last one MoE, whose params sit under "layers/layer_<j>" (scanned:
[num_layers / moe.every, ...]); with `moe.every=1`, and for a dense model, the layout is the
plain one.

LayerSkip's switches (training/layerskip.py, speculative.py), off unless asked for: a
`LayerPlan` (`make_model(plan=...)`: layer dropout; every layer's early-exit logits, through the
shared final norm and head, sown as "intermediates"/"exit_logits" [num_layers - 1, batch,
length, vocab]), a `hidden` input that replaces the embedding (a model of the last layers,
continuing from another's hidden state), and the hidden state before the final norm, sown as
"intermediates"/"hidden" [batch, length, embed] (the input of the layer after the last).
"""
import dataclasses
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.errors import ConfigError
from llm_research.kernels.flash_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from llm_research.models import registry
from llm_research.models.attention import (ATTENTION_IMPLS, CUDNN_DTYPES, CUDNN_MAX_HEAD_DIM,
                                           Attention, resolve_attention_impl)
from llm_research.models.linear import LINEAR_BASES, Linear, LoRA
from llm_research.models.mlp import MLPS
from llm_research.models.moe import MoEConfig
from llm_research.models.norms import RMSNorm
from llm_research.models.layers import RopeScaling, constrain
from llm_research.models.stack import REMAT_POLICIES, LayerPlan, decoder_stack

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
shape_field = registry.shape_field


@registry.register("transformer")
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  num_layers: int = shape_field(4)
  embed_dim: int = shape_field(256)
  num_heads: int = shape_field(4)
  num_kv_heads: int = shape_field(4)
  head_dim: int = shape_field(64)
  mlp_dim: int = shape_field(768)
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)  # off by default
  norm_eps: float = 1e-6
  tie_embeddings: bool = shape_field(True)
  dtype: str = "float32"
  scan_layers: bool = shape_field(True)
  remat_policy: str = "none"
  attention_impl: str = "auto"
  # Attention and MLP projections: the base (linear.LINEAR_BASES) and LoRA adapters on top
  # (lora_rank 0: none). The embedding and the output head stay dense.
  linear_impl: str = shape_field("dense")
  lora_rank: int = shape_field(0)
  lora_alpha: float = 16.0
  lora_heads: int = shape_field(1)
  mlp_impl: str = shape_field("swiglu")
  # Mixture of experts (mlp_impl="moe"): the `moe` group of the model section (moe.py).
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  # Config keys of runs written before the MoE settings were a group (their config.json).
  LEGACY_KEYS = {"num_experts": "moe.num_experts", "experts_per_token": "moe.experts_per_token",
                 "moe_router": "moe.router", "capacity_factor": "moe.capacity_factor",
                 "moe_every": "moe.every", "renormalize_combine": "moe.renormalize_combine",
                 "load_balance_weight": "moe.load_balance_weight",
                 "router_z_loss_weight": "moe.router_z_loss_weight"}
  # Takes a LayerPlan and a `hidden` input (the module docstring): LayerSkip training, early
  # exit and self-speculative decoding (llm_research/speculative.py) look for this.
  early_exit: ClassVar[bool] = True

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ConfigError(f"model.{msg}")
    for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "lora_heads"):
      check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
    check(self.num_heads % self.num_kv_heads == 0,
          f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    check(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary")
    for problem in self.rope_scaling.problems():
      check(False, f"rope_scaling.{problem}")
    for name in ("rope_theta", "norm_eps"):
      check(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be positive")
    check(self.lora_rank >= 0, f"lora_rank={self.lora_rank} must not be negative (0: no LoRA)")
    check(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha} must be positive")
    smallest = min(self.embed_dim, self.num_kv_heads * self.head_dim, self.mlp_dim)
    check(self.lora_rank <= smallest, f"lora_rank={self.lora_rank} is larger than the smallest "
          f"dim of a projection it adapts ({smallest}: embed_dim, num_kv_heads * head_dim, "
          "mlp_dim)")
    for name, value, allowed in (("dtype", self.dtype, DTYPES),
                                 ("remat_policy", self.remat_policy, REMAT_POLICIES),
                                 ("attention_impl", self.attention_impl,
                                  ("auto", *ATTENTION_IMPLS)),
                                 ("linear_impl", self.linear_impl, LINEAR_BASES),
                                 ("mlp_impl", self.mlp_impl, MLPS)):
      check(value in allowed, f"{name}={value!r} is not one of {sorted(allowed)}")
    self._check_attention(check)
    self._check_moe(check)

  def _check_moe(self, check):
    moe = self.mlp_impl == "moe"
    check(moe or self.moe.num_experts == 0,
          f"moe.num_experts={self.moe.num_experts} needs mlp_impl='moe' (0: a dense model)")
    if not moe:
      return
    for problem in self.moe.problems(self.num_layers):
      check(False, f"moe.{problem}")
    check(self.linear_impl == "dense", f"linear_impl={self.linear_impl!r}: the experts of "
          "mlp_impl='moe' are dense")

  @property
  def layer_group(self) -> int:
    """Layers per scanned block: `moe.every` for an MoE model (its last layer MoE), else 1."""
    return self.moe.every if self.mlp_impl == "moe" else 1

  def is_moe_layer(self, layer: int) -> bool:
    return self.mlp_impl == "moe" and (layer + 1) % self.moe.every == 0

  def _check_attention(self, check):
    """The kernel `attention_impl` resolves to on this backend takes this dtype and head_dim."""
    backend = jax.default_backend()
    impl = resolve_attention_impl(self.attention_impl, self.compute_dtype, self.head_dim,
                                  backend)
    where = (f"attention_impl={self.attention_impl!r}"
             + (f" (on {backend}: {impl!r})" if impl != self.attention_impl else ""))
    if impl == "pallas":
      check(jnp.dtype(self.compute_dtype) in SUPPORTED_DTYPES,
            f"{where} takes dtype float32 or bfloat16, not {self.dtype!r}")
      check(self.head_dim in SUPPORTED_HEAD_DIMS,
            f"{where} takes head_dim in {SUPPORTED_HEAD_DIMS}, not {self.head_dim}")
    if impl == "cudnn":
      check(backend == "gpu", f"{where} needs a GPU; the backend is {backend!r}")
      check(jnp.dtype(self.compute_dtype) in CUDNN_DTYPES,
            f"{where} takes dtype bfloat16 or float16, not {self.dtype!r}")
      check(self.head_dim % 8 == 0 and self.head_dim <= CUDNN_MAX_HEAD_DIM,
            f"{where} takes a head_dim that is a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, "
            f"not {self.head_dim}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def lora(self) -> LoRA | None:
    return LoRA(self.lora_rank, self.lora_alpha, self.lora_heads) if self.lora_rank else None

  def linear(self, features, in_axes, out_axes, *, name: str) -> Linear:
    """A projection of this model: base `linear_impl`, LoRA adapters if configured."""
    return Linear(tuple(features), tuple(in_axes), tuple(out_axes), self.compute_dtype,
                  impl=self.linear_impl, lora=self.lora, name=name)

  def make_model(self, *, decode: bool = False, cache_len: int = 0,
                 plan: LayerPlan | None = None) -> nn.Module:
    return Transformer(self, decode=decode, cache_len=cache_len, plan=plan)

  def num_params(self, include_embeddings: bool = True, *, active: bool = False) -> int:
    """Parameters; with `active`, those one token uses (an MoE layer: the router and the
    moe.experts_per_token experts of top_k, moe.capacity_factor experts on average of
    expert_choice)."""
    e, q, kv, m = (self.embed_dim, self.num_heads * self.head_dim,
                   self.num_kv_heads * self.head_dim, self.mlp_dim)
    attention = [(e, q), (e, kv), (e, kv), (q, e)]  # (fan in, fan out)
    mlp = [(e, m), (e, m), (m, e)]
    weights = lambda projections: sum(i * o for i, o in projections)
    adapters = lambda projections: (self.lora_heads * self.lora_rank
                                    * sum(i + o for i, o in projections))
    norms = 2 * e
    dense_layer = weights(attention + mlp) + adapters(attention + mlp) + norms
    experts = self.moe.num_experts
    if active:
      experts = (self.moe.experts_per_token if self.moe.router == "top_k"
                 else self.moe.capacity_factor)
    moe_layer = (weights(attention) + adapters(attention) + experts * weights(mlp)
                 + e * self.moe.num_experts + norms)  # experts have no adapters; + the router
    moe_layers = sum(self.is_moe_layer(i) for i in range(self.num_layers))
    layers = (self.num_layers - moe_layers) * dense_layer + moe_layers * moe_layer
    embeddings = self.vocab_size * e * (1 if self.tie_embeddings else 2)
    return round(layers + e + (embeddings if include_embeddings else 0))

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 N for the matmul weights a token uses (embedding lookup
    excluded, output head included; an MoE layer's router and active experts, not the slots a
    capacity leaves empty) plus attention: QK^T and PV are 4 * seq_len * heads * head_dim FLOPs
    per token per layer forward, halved for the causal mask, times 3 for forward + backward."""
    matmul_params = (self.num_params(include_embeddings=False, active=True)
                     + self.vocab_size * self.embed_dim)
    attention = 4 * seq_len * self.num_heads * self.head_dim * self.num_layers / 2
    return 6 * matmul_params + 3 * attention


class Block(nn.Module):
  """x + attn(norm(x)), then + mlp(norm(x)); the MLP `mlp_impl` (default: config.mlp_impl)."""

  config: TransformerConfig
  decode: bool = False
  cache_len: int = 0
  mlp_impl: str = ""

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.config
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x)
    h = Attention(cfg, self.decode, self.cache_len, name="attn")(h, positions, segment_ids)
    x = constrain(x + h, ("batch", "length", "embed"))
    h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x)
    x = x + MLPS[self.mlp_impl or cfg.mlp_impl](cfg, name="mlp")(h, segment_ids)
    return constrain(x, ("batch", "length", "embed"))


class LayerGroup(nn.Module):
  """`config.moe.every` layers ("layer_0", ...), all dense but the last (MoE): the block the
  stack repeats when MoE layers alternate with dense ones."""

  config: TransformerConfig
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg = self.config
    for j in range(cfg.moe.every):
      mlp_impl = "moe" if j == cfg.moe.every - 1 else "swiglu"
      x = Block(cfg, self.decode, self.cache_len, mlp_impl, name=f"layer_{j}")(
          x, positions, segment_ids)
    return x


class Transformer(nn.Module):
  """tokens [batch, length] -> logits [batch, length, vocab] (float32).

  `positions` are the rotary positions (restarting at 0 in each packed document; absolute
  cache slots when decoding); `segment_ids` keep packed documents from attending to each other.
  """

  config: TransformerConfig
  decode: bool = False
  cache_len: int = 0
  plan: LayerPlan | None = None  # LayerSkip's per-layer switches (models/stack.py)

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, hidden=None):
    """`hidden` [batch, length, embed], when given, is the first layer's input in place of the
    tokens' embeddings (the tokens still give the shapes)."""
    cfg = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape([tokens, positions, segment_ids])
    chex.assert_type([tokens, positions, segment_ids], int)
    embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
        (cfg.vocab_size, cfg.embed_dim), jnp.float32)
    x = jnp.take(embedding, tokens, axis=0) if hidden is None else hidden
    x = constrain(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))
    group = cfg.layer_group
    stacked = decoder_stack(Block if group == 1 else LayerGroup, cfg, x, positions, segment_ids,
                            decode=self.decode, cache_len=self.cache_len,
                            num_blocks=cfg.num_layers // group, plan=self.plan)
    x, layer_outputs = stacked if self.plan is not None else (stacked, None)
    self.sow("intermediates", "hidden", x)  # nothing unless "intermediates" is mutable
    final_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")
    head = (None if cfg.tie_embeddings else
            Linear((cfg.vocab_size,), ("embed",), ("vocab",), cfg.compute_dtype, name="head"))

    def logits_of(x):  # [batch, length, embed] -> float32 [batch, length, vocab]
      x = final_norm(x)
      if head is None:
        logits = jnp.einsum("ble,ve->blv", x, embedding.astype(cfg.compute_dtype)) \
            * cfg.embed_dim**-0.5
      else:
        logits = head(x)
      return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    if layer_outputs is not None:  # the early exits of layers < L - 1
      early = layer_outputs[:-1]  # [num_layers - 1, batch, length, embed]
      exits = logits_of(early.reshape(-1, *early.shape[2:]))
      self.sow("intermediates", "exit_logits", exits.reshape(*early.shape[:2], *exits.shape[1:]))
    return logits_of(x)

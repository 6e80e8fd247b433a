"""The tensor map between Hugging Face's Llama / Mistral / Qwen2 / Mixtral names and the
transformer's params.

Per layer, a Hugging Face projection `[out, in]` (torch's Linear) is the transposed kernel
`[*in, *out]` of the core, reshaped: q_proj [heads * head_dim, embed] <-> query
[embed, heads, head_dim] (rotary is the half-split convention on both sides, and query head h
reads kv head h // (heads / kv_heads) on both: no permutation), o_proj <-> out
[heads, head_dim, embed], gate/up/down_proj <-> gate/up/down, the two norms' weights <-> the
scales. Mixtral's experts: per expert `block_sparse_moe.experts.<j>.w1/w3/w2` (the hub's files:
gate, up, down) or the fused `mlp.experts.gate_up_proj` [experts, 2 mlp, embed] and
`mlp.experts.down_proj` (transformers 5's in-memory layout), both read; the hub's is written.

Tied embeddings: the core multiplies tied logits by embed_dim**-0.5, Hugging Face does not, so
the final norm's scale is multiplied by sqrt(embed_dim) on the way in and divided on the way
out (the norm's output feeds only the logits). That round trip is exact in float32 when
sqrt(embed_dim) is a power of two (embed_dim 64, 256, 1024, 4096, ...); otherwise the tied
final-norm scale can move by one unit in the last place.
"""
import dataclasses
import math
from typing import Callable

import numpy as np

from llm_research.errors import ConfigError
from llm_research.models.transformer import TransformerConfig

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Entry:
  """One param of a layer (`path` below the layer) <-> Hugging Face tensors `names`."""
  path: tuple[str, ...]
  names: tuple[str, ...]
  to_core: Callable[..., Array]  # the named tensors -> the param
  to_hf: Callable[[Array], tuple[Array, ...]]  # the param -> the named tensors


def _projection(path, name, in_shape, out_shape) -> Entry:
  """A torch Linear weight [prod(out), prod(in)] <-> a kernel [*in, *out]."""
  fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
  return Entry(path, (name,), lambda w: w.T.reshape(*in_shape, *out_shape),
               lambda k: (k.reshape(fan_in, fan_out).T,))


def _copy(path, name) -> Entry:
  return Entry(path, (name,), lambda w: w, lambda p: (p,))


def layer_entries(config: TransformerConfig, i: int, *, fused_experts: bool = False
                  ) -> list[Entry]:
  """The params of layer i and the Hugging Face tensors each comes from."""
  e, h, kv, d, m = (config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim,
                    config.mlp_dim)
  at = f"model.layers.{i}."
  entries = [
      _copy(("attn_norm", "scale"), at + "input_layernorm.weight"),
      _copy(("mlp_norm", "scale"), at + "post_attention_layernorm.weight"),
      _projection(("attn", "query", "kernel"), at + "self_attn.q_proj.weight", (e,), (h, d)),
      _projection(("attn", "key", "kernel"), at + "self_attn.k_proj.weight", (e,), (kv, d)),
      _projection(("attn", "value", "kernel"), at + "self_attn.v_proj.weight", (e,), (kv, d)),
      _projection(("attn", "out", "kernel"), at + "self_attn.o_proj.weight", (h, d), (e,)),
  ]
  if config.mlp_impl != "moe":
    return entries + [
        _projection(("mlp", "gate", "kernel"), at + "mlp.gate_proj.weight", (e,), (m,)),
        _projection(("mlp", "up", "kernel"), at + "mlp.up_proj.weight", (e,), (m,)),
        _projection(("mlp", "down", "kernel"), at + "mlp.down_proj.weight", (m,), (e,))]
  experts = range(config.moe.num_experts)
  if fused_experts:
    return entries + [
        _projection(("mlp", "router", "kernel"), at + "mlp.gate.weight", (e,),
                    (config.moe.num_experts,)),
        Entry(("mlp", "gate", "kernel"), (at + "mlp.experts.gate_up_proj",),
              lambda w: w[:, :m].transpose(0, 2, 1), None),
        Entry(("mlp", "up", "kernel"), (at + "mlp.experts.gate_up_proj",),
              lambda w: w[:, m:].transpose(0, 2, 1), None),
        Entry(("mlp", "down", "kernel"), (at + "mlp.experts.down_proj",),
              lambda w: w.transpose(0, 2, 1), None)]
  moe_at = at + "block_sparse_moe."
  per_expert = lambda proj: tuple(f"{moe_at}experts.{j}.{proj}.weight" for j in experts)
  stacked = lambda path, proj: Entry(  # [experts, in, out] <-> one [out, in] per expert
      path, per_expert(proj), lambda *ws: np.stack([w.T for w in ws]),
      lambda k: tuple(k[j].T for j in experts))
  return entries + [
      _projection(("mlp", "router", "kernel"), moe_at + "gate.weight", (e,),
                  (config.moe.num_experts,)),
      stacked(("mlp", "gate", "kernel"), "w1"), stacked(("mlp", "up", "kernel"), "w3"),
      stacked(("mlp", "down", "kernel"), "w2")]


def outer_entries(config: TransformerConfig) -> list[Entry]:
  """The params outside the layers: the embedding, the final norm, the untied head."""
  tied = math.sqrt(config.embed_dim) if config.tie_embeddings else 1.0
  entries = [
      _copy(("embedding",), "model.embed_tokens.weight"),
      Entry(("final_norm", "scale"), ("model.norm.weight",),
            lambda w: (w.astype(np.float32) * np.float32(tied)),
            lambda s: ((s / np.float32(tied)).astype(np.float32),))]
  if not config.tie_embeddings:
    entries.append(_projection(("head", "kernel"), "lm_head.weight", (config.embed_dim,),
                               (config.vocab_size,)))
  return entries


def uses_fused_experts(config: TransformerConfig, names: set[str]) -> bool:
  return config.mlp_impl == "moe" and "model.layers.0.mlp.experts.gate_up_proj" in names


def check_names(config: TransformerConfig, names: set[str], where: str) -> None:
  """Refuses a checkpoint whose tensors are not exactly those `config`'s params come from: a
  missing tensor, or one the core has no place for (Qwen2's q/k/v biases), named."""
  fused = uses_fused_experts(config, names)
  expected = {n for entry in outer_entries(config) for n in entry.names}
  for i in range(config.num_layers):
    expected |= {n for entry in layer_entries(config, i, fused_experts=fused)
                 for n in entry.names}
  # Old checkpoints store rotary's inverse frequencies, which rope_theta already fixes; a tied
  # model may also store its head (the embedding itself).
  ignored = {n for n in names if n.endswith("rotary_emb.inv_freq")}
  if config.tie_embeddings:
    ignored |= {"lm_head.weight"} & names
  missing, extra = sorted(expected - names), sorted(names - expected - ignored)
  if missing:
    raise ConfigError(f"{where}: no tensor {missing[0]!r}"
                      + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
  if extra:
    why = (" (projection biases are not implemented by the core)"
           if extra[0].endswith(".bias") else "")
    raise ConfigError(f"{where}: tensor {extra[0]!r} has no place in the model{why}"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


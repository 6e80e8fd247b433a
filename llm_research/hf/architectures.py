"""Hugging Face `config.json` <-> the transformer's config (`TransformerConfig`).

Read: LlamaForCausalLM (Llama 2 and 3), MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM.
What the core cannot compute is refused with one line naming the config field (or tensor),
never converted into different logits: rope scaling other than Llama 3.1's 'llama3' (which
the core computes: `RopeScaling`), a sliding window shorter than max_position_embeddings
(Mistral v0.1), projection biases (Qwen2 always has q/k/v biases: `weights.check_names` names
them), an activation other than SiLU. Written: a
LlamaForCausalLM, or a MixtralForCausalLM for an MoE model (the core's top-k routing that
Mixtral computes: every layer MoE, dropless, renormalised weights).
"""
from llm_research.errors import ConfigError
from llm_research.models.layers import RopeScaling
from llm_research.models.moe import MoEConfig
from llm_research.models.transformer import TransformerConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "MixtralForCausalLM": "mixtral"}


def rope_settings(hf: dict) -> dict:
  """{'rope_type': ..., 'rope_theta': ..., ...}: transformers 5's `rope_parameters`, or the
  `rope_theta` and `rope_scaling` of configs written before it."""
  settings = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  settings.setdefault("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
  settings.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
  return settings


def from_hf_config(hf: dict, where: str) -> TransformerConfig:
  """The transformer config of a Hugging Face config.json (`where` names it in errors)."""
  architecture = (hf.get("architectures") or [None])[0]
  if architecture not in ARCHITECTURES:
    raise ConfigError(f"{where}: architecture {architecture!r} (model_type "
                      f"{hf.get('model_type')!r}) is not supported; supported: "
                      f"{', '.join(ARCHITECTURES)}")
  def refuse_unless(ok: bool, field: str, why: str):
    if not ok:
      raise ConfigError(f"{where}: {field}={_field(hf, field)!r} {why}")
  rope = rope_settings(hf)
  refuse_unless(rope["rope_type"] in ("default", "llama3"), "rope_parameters.rope_type",
                "(rope scaling) is not implemented by the core's rotary embedding ('default' "
                "and Llama 3.1's 'llama3' are)")
  refuse_unless(hf.get("hidden_act", "silu") == "silu", "hidden_act",
                "is not the core's SwiGLU activation (silu)")
  for field in ("attention_bias", "mlp_bias"):
    refuse_unless(not hf.get(field), field, "is not supported: the core's projections have "
                  "no biases")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  refuse_unless(window is None or window >= hf.get("max_position_embeddings", 0),
                "sliding_window", f"is shorter than max_position_embeddings="
                f"{hf.get('max_position_embeddings')}: the core attends to every earlier "
                "token (sliding-window attention is not implemented)")
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"],
      embed_dim=hf["hidden_size"], num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      mlp_dim=hf["intermediate_size"], rope_theta=float(rope["rope_theta"]),
      rope_scaling=_rope_scaling(rope),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  if ARCHITECTURES[architecture] == "mixtral":
    refuse_unless(not hf.get("router_jitter_noise"), "router_jitter_noise",
                  "is not implemented by the core's router")
    refuse_unless(hf["num_experts_per_tok"] >= 2, "num_experts_per_tok",
                  "is not supported: Mixtral gives a lone expert weight 1, the core's top-1 "
                  "router its probability (Switch Transformer's convention)")
    fields.update(mlp_impl="moe", moe=MoEConfig(
        num_experts=hf["num_local_experts"], experts_per_token=hf["num_experts_per_tok"],
        router="top_k", capacity_factor=0.0, every=1, renormalize_combine=True))
  try:
    return TransformerConfig(**fields)
  except ConfigError as error:
    raise ConfigError(f"{where}: {error}") from None


def _rope_scaling(rope: dict) -> RopeScaling:
  """The core's RopeScaling of Hugging Face's rope settings ('llama3', or none)."""
  if rope["rope_type"] != "llama3":
    return RopeScaling()
  return RopeScaling(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                     high_freq_factor=float(rope["high_freq_factor"]),
                     original_max_position=int(rope["original_max_position_embeddings"]))


def _rope_parameters(config: TransformerConfig) -> dict:
  """Hugging Face's `rope_parameters` of the core's rotary settings."""
  scaling = config.rope_scaling
  if scaling.factor == 1:
    return {"rope_type": "default", "rope_theta": config.rope_theta}
  return {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": scaling.factor,
          "low_freq_factor": scaling.low_freq_factor,
          "high_freq_factor": scaling.high_freq_factor,
          "original_max_position_embeddings": scaling.original_max_position}


def _field(hf: dict, dotted: str):
  if dotted == "rope_parameters.rope_type":
    return rope_settings(hf)["rope_type"]
  return hf.get(dotted)


def to_hf_config(config: TransformerConfig, *, max_position_embeddings: int,
                 bos_token_id: int | None = None, eos_token_id: int | None = None,
                 dtype: str = "float32") -> dict:
  """A Hugging Face config.json for `config`; a model Hugging Face would compute differently
  is a ConfigError naming the field."""
  check_exportable(config)
  hf = dict(
      vocab_size=config.vocab_size, hidden_size=config.embed_dim,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, hidden_act="silu",
      max_position_embeddings=max_position_embeddings, rms_norm_eps=config.norm_eps,
      rope_theta=config.rope_theta,  # read by transformers before 5.0
      rope_parameters=_rope_parameters(config),
      tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
      bos_token_id=bos_token_id, eos_token_id=eos_token_id, dtype=dtype)
  if config.mlp_impl == "moe":
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
              num_local_experts=config.moe.num_experts,
              num_experts_per_tok=config.moe.experts_per_token, router_jitter_noise=0.0,
              sliding_window=None)
    del hf["mlp_bias"]
  else:
    hf.update(architectures=["LlamaForCausalLM"], model_type="llama")
  return hf


def check_exportable(config: TransformerConfig) -> None:
  def refuse_unless(ok: bool, field: str, why: str):
    if not ok:
      value = config
      for name in field.split("."):
        value = getattr(value, name)
      raise ConfigError(f"model.{field}={value!r} {why}")
  refuse_unless(config.linear_impl == "dense", "linear_impl",
                "has no Hugging Face equivalent: export a dense model")
  refuse_unless(config.lora_rank == 0, "lora_rank",
                "(LoRA adapters): merge them first (llm_research.methods.lora)")
  if config.mlp_impl != "moe":
    return
  moe = config.moe
  refuse_unless(moe.every == 1, "moe.every", "must be 1: every Mixtral layer is MoE")
  refuse_unless(moe.router == "top_k", "moe.router", "must be 'top_k' (Mixtral's router)")
  refuse_unless(moe.capacity_factor == 0, "moe.capacity_factor",
                "must be 0 (dropless, as Mixtral computes)")
  refuse_unless(moe.renormalize_combine, "moe.renormalize_combine",
                "must be True (Mixtral renormalises the top-k weights)")
  refuse_unless(moe.experts_per_token >= 2, "moe.experts_per_token",
                "must be at least 2: Mixtral gives a lone expert weight 1, the core's top-1 "
                "router its probability")


"""The MLP registry (`model.mlp_impl`): name -> module class built as `cls(config, name=...)`,
mapping x [batch, length, embed] to the same shape, called as `(x, segment_ids)` (segment_ids
[batch, length], 0 = padding): `swiglu`, and `moe` (moe.py: experts of SwiGLUs behind a router,
in every `moe.every`-th layer; padding takes no expert)."""
import flax.linen as nn
import jax

from llm_research.models.layers import constrain
from llm_research.models.moe import MoE


class SwiGLU(nn.Module):
  """LLaMA's gated MLP: down(silu(gate(x)) * up(x)), hidden size `config.mlp_dim`."""

  config: "TransformerConfig"  # noqa: F821 (transformer.py; any config with `linear()`)

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    del segment_ids  # every token, padding too, goes through the same MLP
    cfg = self.config  # x: [batch, length, embed]
    up = lambda name: cfg.linear((cfg.mlp_dim,), ("embed",), ("mlp",), name=name)
    hidden = nn.silu(up("gate")(x)) * up("up")(x)  # [batch, length, mlp]
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return cfg.linear((x.shape[-1],), ("mlp",), ("embed",), name="down")(hidden)


MLPS = {"swiglu": SwiGLU, "moe": MoE}

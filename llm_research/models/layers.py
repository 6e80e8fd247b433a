"""Building blocks of the transformer core: linear layers, RMSNorm, rotary embeddings, SwiGLU.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the config's rules
map them onto mesh axes, so nothing here names a mesh axis.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.models import bitlinear

Dtype = Any


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout to logical axes (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Linear(nn.Module):
  """A bias-free linear map contracting the last `len(in_axes)` dims into `features`.

  The kernel has shape `in_shape + features` and logical axes `in_axes + out_axes`; it is
  stored in float32 and cast to `dtype` for the matmul. `impl` is one of
  `bitlinear.LINEAR_IMPLS`: "bitnet" trains the same kernel as BitNet b1.58, and
  "ternary_packed" holds it packed to 2 bits for inference (see bitlinear.py).
  """

  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  impl: str = "dense"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    if self.impl == "ternary_packed":
      return self._ternary_packed(x, in_shape)
    init = nn.initializers.normal(stddev=math.prod(in_shape)**-0.5)
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(init, self.in_axes + self.out_axes),
        in_shape + tuple(self.features),
        jnp.float32,
    )
    if self.impl == "bitnet":
      x, kernel = bitlinear.bitnet_operands(x, kernel, n_in)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))

  def _ternary_packed(self, x: jax.Array, in_shape: tuple[int, ...]) -> jax.Array:
    fan_in, fan_out = math.prod(in_shape), math.prod(self.features)
    if fan_in % 4:
      raise ValueError(f"ternary_packed Linear {self.name!r}: input size {fan_in} "
                       "(product of the contracted dims) must be a multiple of 4")
    packed = self.param(
        "packed_kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                      (None, self.out_axes[0])),
        (fan_in // 4, fan_out), jnp.uint8)
    scale = self.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, ()),
                       (), jnp.float32)
    y = bitlinear.ternary_packed_matmul(x, packed, scale, len(in_shape), self.features)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
        jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(self.dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [batch, length, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class SwiGLU(nn.Module):
  """LLaMA's gated MLP: down(silu(gate(x)) * up(x))."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  linear_impl: str = "dense"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:  # [batch, length, embed]
    dense = lambda name: Linear((self.mlp_dim,), ("embed",), ("mlp",), self.dtype,
                                impl=self.linear_impl, name=name)
    hidden = nn.silu(dense("gate")(x)) * dense("up")(x)  # [batch, length, mlp]
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return Linear((x.shape[-1],), ("mlp",), ("embed",), self.dtype, impl=self.linear_impl,
                  name="down")(hidden)

"""Linear layers that compose: a base map (`LINEAR_BASES`) plus optional LoRA adapters on top.

    y = base(x) + (alpha / rank / heads) * sum_n B_n A_n x        (the sum only with LoRA)

Bases (`model.linear_impl`):
  "dense"           x W, W the float32 "kernel" cast to the compute dtype.
  "bitnet"          BitNet b1.58 training: the same "kernel", quantized with straight-through
                    gradients (bitlinear.py).
  "ternary_packed"  BitNet inference: "packed_kernel" (2 bits a weight) and "kernel_scale",
                    through the ternary matmul kernel (bitlinear.py).
LoRA (`LoRA(rank, alpha, heads)`): `heads` pairs A_n [*in, rank] and B_n [rank, *out], stored
as "lora_a" [heads, *in, rank] and "lora_b" [heads, rank, *out] beside the base's params. B is
zero (a fresh adapter leaves the base's function unchanged); A is LTE's orthogonal init (Huh et
al.): per head, orthonormal columns over the flattened fan-in scaled by sqrt(fan_in / rank), so
that |A x| is about |x| (rows instead when rank > fan_in). The adapters read the layer's input x
unquantized whatever the base. `llm_research.methods.lora.merge` folds them into the kernel.
"""
import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llm_research.models import bitlinear
from llm_research.models.layers import Dtype, map_shards, partition_spec


@dataclasses.dataclass(frozen=True)
class LoRA:
  rank: int
  alpha: float
  heads: int = 1

  @property
  def scale(self) -> float:
    return self.alpha / self.rank / self.heads


def orthogonal_adapter_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32):
  """LoRA's A, [heads, *in, rank]: per head a semi-orthogonal [fan_in, rank] matrix times
  sqrt(fan_in / rank) (LTE's init: A's r singular values are all sqrt(fan_in / rank), so A keeps
  the norm of an isotropic input on average)."""
  heads, rank, fan_in = shape[0], shape[-1], math.prod(shape[1:-1])
  init = nn.initializers.orthogonal(scale=math.sqrt(fan_in / rank))
  a = jax.vmap(lambda k: init(k, (fan_in, rank), dtype))(jax.random.split(key, heads))
  return a.reshape(shape)


def _contract(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
  """Contracts the last `n_in` dims of x with the first `n_in` of w."""
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                    ((), ())))


def _kernel(layer: "Linear", in_shape: tuple[int, ...]) -> jax.Array:
  init = nn.initializers.normal(stddev=math.prod(in_shape)**-0.5)
  return layer.param("kernel", nn.with_logical_partitioning(init, layer.in_axes + layer.out_axes),
                     in_shape + tuple(layer.features), jnp.float32)


def _dense(layer: "Linear", x: jax.Array, n_in: int) -> jax.Array:
  kernel = _kernel(layer, x.shape[x.ndim - n_in:])
  return _contract(x.astype(layer.dtype), kernel.astype(layer.dtype), n_in)


def _bitnet(layer: "Linear", x: jax.Array, n_in: int) -> jax.Array:
  kernel = _kernel(layer, x.shape[x.ndim - n_in:])
  x, kernel = bitlinear.bitnet_operands(x, kernel, n_in)
  return _contract(x.astype(layer.dtype), kernel.astype(layer.dtype), n_in)


def _ternary_packed(layer: "Linear", x: jax.Array, n_in: int) -> jax.Array:
  """Under a mesh the kernel runs per device (shard_map): rows split like the batch (x's
  leading dim), output features like the layer's first out axis, K whole."""
  fan_in, fan_out = math.prod(x.shape[x.ndim - n_in:]), math.prod(layer.features)
  if fan_in % 4:
    raise ValueError(f"ternary_packed Linear {layer.name!r}: input size {fan_in} "
                     "(product of the contracted dims) must be a multiple of 4")
  packed = layer.param(
      "packed_kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                    (None, layer.out_axes[0])),
      (fan_in // 4, fan_out), jnp.uint8)
  scale = layer.param("kernel_scale", nn.with_logical_partitioning(nn.initializers.ones, ()),
                      (), jnp.float32)
  lead = x.shape[:x.ndim - n_in]
  out_spec = partition_spec(("batch",) + (None,) * (len(lead) - 1) + layer.out_axes,
                            lead + tuple(layer.features))
  rest = math.prod(layer.features[1:])

  def per_shard(x, packed, scale):  # this device's rows and output features
    features = (packed.shape[1] // rest, *layer.features[1:])
    return bitlinear.ternary_packed_matmul(x, packed, scale, n_in, features)

  y = map_shards(per_shard, (PartitionSpec(out_spec[0]), PartitionSpec(None, out_spec[len(lead)]),
                             PartitionSpec()), out_spec)(x, packed, scale)
  return y.astype(layer.dtype)


# base name -> fn(layer, x, n_in) -> y: creates the base's params on `layer` and applies them.
LINEAR_BASES: dict[str, Callable] = {
    "dense": _dense, "bitnet": _bitnet, "ternary_packed": _ternary_packed}


class Linear(nn.Module):
  """A bias-free linear map contracting the last `len(in_axes)` dims of x into `features`.

  Params carry logical axes `in_axes + out_axes` (LoRA's add "lora_heads" and "lora_rank").
  `impl` names the base in LINEAR_BASES; `lora` adds adapters on top of it.
  """

  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  impl: str = "dense"
  lora: LoRA | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_axes)
    y = LINEAR_BASES[self.impl](self, x, n_in)
    if self.lora is not None:
      y = y + self._adapters(x, n_in)
    return y

  def _adapters(self, x: jax.Array, n_in: int) -> jax.Array:
    lora, in_shape = self.lora, x.shape[x.ndim - n_in:]
    a = self.param("lora_a", nn.with_logical_partitioning(
        orthogonal_adapter_init, ("lora_heads", *self.in_axes, "lora_rank")),
                   (lora.heads, *in_shape, lora.rank), jnp.float32)
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("lora_heads", "lora_rank", *self.out_axes)),
                   (lora.heads, lora.rank, *self.features), jnp.float32)
    x = x.astype(self.dtype)
    a = jnp.moveaxis(a, 0, n_in).astype(self.dtype)  # [*in, heads, rank]
    low_rank = _contract(x, a, n_in)  # [..., heads, rank]
    return lora.scale * _contract(low_rank, b.astype(self.dtype), 2)  # [..., *features]

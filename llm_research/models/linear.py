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


def _householder_q(z: jax.Array) -> jax.Array:
  """Q of z = Q R ([m, n], m >= n) with R's diagonal positive, so Q is Haar distributed for a
  Gaussian z: Householder QR (LAPACK's geqrf + orgqr) in elementwise ops and sums only, no
  linalg custom call and no matmul (whose default float32 precision is lower on TPU)."""
  m, n = z.shape
  rows = jnp.arange(m)

  def reflect(j, carry):  # H_j = I - 2 v v^T zeroes column j below the diagonal
    r, vs = carry
    x = jnp.where(rows >= j, r[:, j], 0)
    alpha = -jnp.where(x[j] >= 0, 1, -1) * jnp.sqrt(jnp.sum(x * x))  # R_jj; no cancellation
    v = x - alpha * (rows == j)
    v = v / jnp.maximum(jnp.sqrt(jnp.sum(v * v)), jnp.finfo(z.dtype).tiny)
    r = r - 2 * v[:, None] * jnp.sum(v[:, None] * r, axis=0)
    return r, vs.at[:, j].set(v)

  r, vs = jax.lax.fori_loop(0, n, reflect, (z, jnp.zeros_like(z)))

  def accumulate(i, q):  # Q = H_0 ... H_{n-1} [I_n; 0], the reflections applied last first
    v = vs[:, n - 1 - i]
    return q - 2 * v[:, None] * jnp.sum(v[:, None] * q, axis=0)

  q = jax.lax.fori_loop(0, n, accumulate, jnp.eye(m, n, dtype=z.dtype))
  return q * jnp.where(jnp.diagonal(r) >= 0, 1, -1).astype(z.dtype)


def orthogonal_adapter_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32):
  """LoRA's A, [heads, *in, rank]: per head a semi-orthogonal [fan_in, rank] matrix times
  sqrt(fan_in / rank) (LTE's init: A's r singular values are all sqrt(fan_in / rank), so A keeps
  the norm of an isotropic input on average).

  The same draws as `nn.initializers.orthogonal` (jax.random.orthogonal: the Q of a Gaussian's
  QR, signs fixed so that R's diagonal is positive), equal up to rounding, but orthonormalised by
  `_householder_q` in plain jnp ops rather than by `jnp.linalg.qr`. Why: on CPU, jaxlib 0.10's
  batched LAPACK kernels (lapack_sgeqrf_ffi, lapack_sorgqr_ffi) run on an XLA intra-op pool
  thread, schedule their batch chunks on that same pool and block on an absl::BlockingCounter
  (jax::ParallelBatchMap, jaxlib/cpu/lapack_kernels.cc). LTE inits every projection in one jit;
  once as many QRs run at once as the pool has threads (2 on a 2-core machine), every thread
  waits for chunks queued behind itself and step 1 hangs forever. No upstream issue reports this
  hang as such; the closest: https://github.com/jax-ml/jax/issues/36927 (the 0.10 regression that
  jax commit 859992407d "Don't try to parallelize LAPACK kernels in opensource builds" cites when
  it takes this path out of open-source builds, after 0.11.0) and
  https://github.com/jax-ml/jax/issues/39292 (the same path crashing batched eigh). With no
  custom call in it, this init never waits on the pool, whatever the jaxlib, sizes or thread
  count (tests/test_lte.py: test_orthogonal_adapter_inits_in_one_jit_do_not_deadlock)."""
  heads, rank, fan_in = shape[0], shape[-1], math.prod(shape[1:-1])
  scale = jnp.asarray(math.sqrt(fan_in / rank), dtype)
  tall = (max(fan_in, rank), min(fan_in, rank))

  def one(k):  # jax.random.orthogonal(k, fan_in, (), dtype, rank), without jnp.linalg.qr
    z = jax.random.normal(k, tall, dtype)
    q = _householder_q(z.astype(jnp.promote_types(dtype, jnp.float32))).astype(dtype)
    return scale * (q if fan_in >= rank else q.T)

  a = jax.vmap(one)(jax.random.split(key, heads))
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

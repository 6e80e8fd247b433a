"""Ternary matmul for BitNet b1.58 inference: int8 activations times 2-bit packed weights.

    y[m, n] = (sum_k x[m, k] * w[k, n]) * x_scale[m] * w_scale

with x int8 [M, K] (per-row absmax quantized), w in {-1, 0, +1} packed 4 per byte and the
sum accumulated exactly in int32, then the two float scales.

Packed layout ("quarter planes"), shared with `llm_research.methods.ternary_packing`:
K is a multiple of 4, Kq = K // 4, and `packed` is uint8 [Kq, N] with

    packed[r, n] = sum_{i=0..3} code(w[i * Kq + r, n]) << (2 * i)
    code(0) = 0b00, code(+1) = 0b01, code(-1) = 0b11 (2-bit two's complement; 0b10 unused)

so byte 0 means four zeros, and a row block of `packed` holds four row blocks of w, one per
bit plane, that meet the four quarters of x viewed as [M, 4, Kq] (a free reshape).

Three implementations, one signature `(x, x_scale, packed, w_scale) -> float32 [M, N]`:
`ternary_matmul_pallas` (a grid over (M, N) blocks, a loop over K blocks inside the kernel
that unpacks one [block_k, block_n] tile at a time: the weights stay packed in memory),
`ternary_matmul_reference` (pure jnp, int32, the ground truth), and the dispatch
`ternary_matmul`: Pallas on GPU/TPU; on CPU the reference, because Pallas only interprets
there (tests call it with `impl="interpret"`).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

IMPLS = ("auto", "pallas", "interpret", "reference")


def _check_inputs(x, x_scale, packed, w_scale):
  if x.dtype != jnp.int8 or x.ndim != 2:
    raise TypeError(f"ternary_matmul: x must be int8 [M, K], got {x.dtype} {x.shape}")
  if packed.dtype != jnp.uint8 or packed.ndim != 2:
    raise TypeError(f"ternary_matmul: packed must be uint8 [K // 4, N], got "
                    f"{packed.dtype} {packed.shape}")
  if x.shape[1] != 4 * packed.shape[0]:
    raise ValueError(f"ternary_matmul: x has K={x.shape[1]} but packed holds "
                     f"4 * {packed.shape[0]} = {4 * packed.shape[0]} rows of weights")
  if x_scale.shape != (x.shape[0],):
    raise ValueError(f"ternary_matmul: x_scale must be [M]=[{x.shape[0]}], got {x_scale.shape}")
  if jnp.shape(w_scale) != ():
    raise ValueError(f"ternary_matmul: w_scale must be a scalar, got {jnp.shape(w_scale)}")


def unpack_plane(packed: jax.Array, plane: int) -> jax.Array:
  """Bit plane `plane` (0..3) of packed uint8 bytes as int8 values in {-1, 0, +1}."""
  shifted = packed.astype(jnp.int32) << (30 - 2 * plane)  # the plane's 2 bits on top
  return (shifted >> 30).astype(jnp.int8)  # arithmetic shift sign-extends 0b11 to -1


def _rescale(acc, x_scale, w_scale):
  return acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None] \
      * jnp.asarray(w_scale, jnp.float32)


def ternary_matmul_reference(x, x_scale, packed, w_scale):
  """x int8 [M, K], x_scale [M], packed uint8 [K // 4, N], w_scale [] -> float32 [M, N]."""
  _check_inputs(x, x_scale, packed, w_scale)
  quarters = x.reshape(x.shape[0], 4, -1)  # [M, 4, Kq]
  acc = sum(jnp.dot(quarters[:, i], unpack_plane(packed, i), preferred_element_type=jnp.int32)
            for i in range(4))  # [M, N] int32
  return _rescale(acc, x_scale, w_scale)


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int):
  # x_ref: [bm, 4, Kq] int8; w_ref: [Kq, bn] uint8; o_ref: [bm, bn] int32.
  num_k = w_ref.shape[0] // block_k

  def body(k, acc):
    rows = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    x = x_ref[:, :, rows]  # [bm, 4, block_k]
    w = w_ref[rows, :]  # [block_k, bn], unpacked here one plane at a time
    for i in range(4):
      acc += jnp.dot(x[:, i], unpack_plane(w, i), preferred_element_type=jnp.int32)
    return acc

  o_ref[...] = jax.lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.int32))


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def ternary_matmul_pallas(x, x_scale, packed, w_scale, *, block_m: int = 128,
                          block_n: int = 256, block_k: int = 512, interpret: bool = False):
  """The Pallas kernel; same signature and result as `ternary_matmul_reference`.

  Blocks larger than a dim shrink to the dim; ragged M and N edges are computed on padding
  and dropped. `block_k` shrinks to the largest divisor of K // 4 not above it.
  """
  _check_inputs(x, x_scale, packed, w_scale)
  (m, k), (kq, n) = x.shape, packed.shape
  bm, bn = min(block_m, m), min(block_n, n)
  bk = _largest_divisor_at_most(kq, block_k)
  acc = pl.pallas_call(
      functools.partial(_kernel, block_k=bk),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.int32),
      grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
      in_specs=[pl.BlockSpec((bm, 4, kq), lambda i, j: (i, 0, 0)),
                pl.BlockSpec((kq, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret,
  )(x.reshape(m, 4, kq), packed)
  return _rescale(acc, x_scale, w_scale)


def ternary_matmul(x, x_scale, packed, w_scale, *, impl: str = "auto"):
  """Dispatch: 'auto' is Pallas on GPU/TPU and the jnp reference on CPU."""
  if impl not in IMPLS:
    raise ValueError(f"ternary_matmul: impl={impl!r} is not one of {IMPLS}")
  if impl == "auto":
    impl = "reference" if jax.default_backend() == "cpu" else "pallas"
  if impl == "reference":
    return ternary_matmul_reference(x, x_scale, packed, w_scale)
  return ternary_matmul_pallas(x, x_scale, packed, w_scale, interpret=impl == "interpret")

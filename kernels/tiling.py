"""Tiling arithmetic shared by the Pallas kernels: block rules, block fitting, zero padding.

Both kernels (flash_attention.py, ternary_matmul.py) pad their operands up to whole blocks with
zeros and shrink a table's block to a short dimension; the rules here are the ones they share.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TRITON_MIN_BLOCK = 16  # Triton's smallest dot tile; its block shapes are powers of two


def is_triton_block(block: int) -> bool:
  """Whether Triton takes `block` as a tile length: a power of two >= TRITON_MIN_BLOCK."""
  return block >= TRITON_MIN_BLOCK and block & (block - 1) == 0


def fit_power_of_two(block: int, length: int, smallest: int = TRITON_MIN_BLOCK) -> int:
  """`block`, shrunk for a short `length` to the smallest power of two >= `smallest` covering
  it, so a short input is not padded to a whole table block."""
  return min(block, max(smallest, pl.next_power_of_2(length)))


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return pl.cdiv(n, multiple) * multiple


def pad_axis(x: jax.Array, axis: int, length: int) -> jax.Array:
  """x with `axis` zero-padded at the end to `length`; x itself when it is that long already
  (jnp.pad would still emit a pad op)."""
  axis = axis % x.ndim
  if x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths)

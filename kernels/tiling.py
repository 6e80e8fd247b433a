"""Helpers shared by the Pallas kernels, public here so that no kernel file imports another's
private names (DESIGN.md: kernels/).

- Tiling arithmetic (flash_attention.py, ternary_matmul.py): Triton's block rule, fitting a
  table's block to a short dimension, rounding up and zero padding to whole blocks.
- float32 dots in the three layouts the attention kernels multiply (`dot`, `dot_t`, `dot_tn`),
  LOG2_E for the kernels that run the softmax in base 2, and the logit of a masked key.
- The attention masks and block ranges of flash_attention.py's Triton-layout kernels and
  flash_attention_tpu.py's Mosaic ones: `attention_mask` (which keys a query sees),
  `kv_block_range` / `q_block_range` (which blocks the causal band and the window leave),
  `split_refs` (a kernel's refs with optional segment ids).

The Hopper kernels' helpers (wgmma matmul, layout casts, the SMEM ring's slots) need
`jax.experimental.pallas.mosaic_gpu`; they stay public in flash_attention_mgpu.py, which
flash_attention_mgpu_backward.py imports, so that this module imports on every platform without
loading Mosaic GPU.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

TRITON_MIN_BLOCK = 16  # Triton's smallest dot tile; its block shapes are powers of two
# The logit of a masked key in the flash attention kernels: finite (a fully masked row has
# max == MASKED_LOGIT, and MASKED_LOGIT - MASKED_LOGIT == 0, never inf - inf), below any real
# logit, and far enough from the float32 limit to be added to.
MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2_E = math.log2(math.e)  # exp(x) == exp2(x * LOG2_E): kernels whose softmax runs in base 2


# ---------------------------------------------------------------------------------------------
# Tiling arithmetic


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


# ---------------------------------------------------------------------------------------------
# float32 dots


def dot(a, b):
  """a [m, k] @ b [k, n] -> [m, n] in float32."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def dot_t(a, b):
  """a [m, d] @ b[n, d]^T -> [m, n] in float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a[m, n]^T @ b [m, d] -> [n, d] in float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Attention masks and block ranges. `spec` is flash_attention.py's static kernel spec; these read
# its padded lengths q_pad and kv_pad, its blocks block_q and block_k, causal and window.


def attention_mask(q_idx, k_idx, causal, window, kv_len):
  """Boolean [rows, cols] from positions q_idx [rows, 1], k_idx [1, cols]; None: all visible.

  window: None or (left, right), keys in [q - left, q + right]; kv_len masks padded keys (None:
  no padding).
  """
  conditions = []
  if kv_len is not None:
    conditions.append(k_idx < kv_len)
  if causal:
    conditions.append(q_idx >= k_idx)
  if window is not None:
    left, right = window
    conditions += [k_idx >= q_idx - left, k_idx <= q_idx + right]
  if not conditions:
    return None
  return functools.reduce(jnp.logical_and, conditions)


def kv_block_range(spec, q_block):
  """[lo, hi) of the kv blocks that query block `q_block` (traced) can see."""
  hi_key = spec.kv_pad - 1  # last key a row of this block may see
  first_q, last_q = q_block * spec.block_q, (q_block + 1) * spec.block_q - 1
  if spec.causal:
    hi_key = jnp.minimum(hi_key, last_q)
  lo_key = 0
  if spec.window is not None:
    left, right = spec.window
    hi_key = jnp.minimum(hi_key, last_q + right)
    lo_key = jnp.maximum(0, first_q - left)
  return _block_of(lo_key, spec.block_k), _block_of(hi_key, spec.block_k) + 1


def q_block_range(spec, kv_block):
  """[lo, hi) of the query blocks that can see kv block `kv_block` (traced)."""
  first_k, last_k = kv_block * spec.block_k, (kv_block + 1) * spec.block_k - 1
  lo_q, hi_q = 0, spec.q_pad - 1
  if spec.causal:
    lo_q = jnp.maximum(lo_q, first_k)
  if spec.window is not None:
    left, right = spec.window
    lo_q = jnp.maximum(lo_q, first_k - right)
    hi_q = jnp.minimum(hi_q, last_k + left)
  return _block_of(lo_q, spec.block_q), _block_of(hi_q, spec.block_q) + 1


def _block_of(index, block):
  """Block holding `index` (clamped at 0); traced, so `lax.div`, not `//`."""
  return lax.div(jnp.maximum(index, 0), block)


def split_refs(refs, num_inputs: int, segmented: bool):
  """A kernel's refs as (inputs, (q_seg_ref, kv_seg_ref), outputs and scratch): the two segment-id
  refs follow the `num_inputs` inputs in a segmented call and are None otherwise."""
  if not segmented:
    return refs[:num_inputs], (None, None), refs[num_inputs:]
  return refs[:num_inputs], refs[num_inputs:num_inputs + 2], refs[num_inputs + 2:]

"""Flash attention kernels for TPU (Mosaic): forward, dq, dk/dv. Dispatch: flash_attention.py.

Same algorithm and semantics as the Triton-layout kernels in flash_attention.py (the masks,
block ranges and dots the two share come from tiling.py), tiled the way Mosaic wants: every
block is 2-D with its last two dims multiples of (8, 128) or equal to the array's. So
  * q, k, v, out are viewed head-major: [batch, heads, length, head_dim]; a block is one
    [block, head_dim] tile of one head (head_dim 64/128/256 is the whole last dim);
  * per-row statistics (log-sum-exp, delta) and the query segment ids travel lane-replicated,
    [..., length, 128], a column [block_q, 1] in the kernel; the key segment ids travel
    sublane-replicated, [batch, 8, kv_len], a row [1, block_k] in the kernel;
  * the kv loop (forward, dq) and the (query head, q block) loop (dk/dv) are the last grid
    axes ("arbitrary"), accumulating in VMEM scratch that is initialised on the first step and
    written out on the last. Query head h reads kv head h // groups through the index maps
    (GQA without repeating K/V).
Blocks outside the causal band / window are skipped (`pl.when`) and their index maps clamped
to the visible range, so a skipped step re-uses the block already in VMEM instead of copying.
Block lengths are powers of two >= 128 (the dispatch pads short inputs to 128), so every tile
is made of whole (8, 128) vreg tiles.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llm_research.kernels import tiling

LANES, SUBLANES = 128, 8


def _tile_mask(spec, q_block, kv_block, q_seg_ref, kv_seg_ref):
  """The [block_q, block_k] mask of one tile (None: nothing masked)."""
  shape = (spec.block_q, spec.block_k)
  q_idx = q_block * spec.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_idx = kv_block * spec.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  kv_len = spec.kv_len if spec.kv_pad != spec.kv_len else None
  mask = tiling.attention_mask(q_idx, k_idx, spec.causal, spec.window, kv_len)
  if spec.segmented:
    same = q_seg_ref[:, :1] == kv_seg_ref[:1, :]  # [block_q, 1] == [1, block_k]
    mask = same if mask is None else mask & same
  return mask


def _visible_kv_block(spec, q_block, kv_block):
  """kv_block clamped to those q_block sees: a skipped step keeps the block already fetched."""
  lo, hi = tiling.kv_block_range(spec, q_block)
  return jnp.minimum(jnp.maximum(kv_block, lo), hi - 1)


def _visible_q_block(spec, kv_block, q_block):
  """q_block clamped to those that see kv_block: a skipped step keeps the block already fetched."""
  lo, hi = tiling.q_block_range(spec, kv_block)
  return jnp.minimum(jnp.maximum(q_block, lo), hi - 1)


def _lane_replicated(x):
  """[..., length] -> [..., length, 128]."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _segment_args(segments):
  """(q_seg [batch, q_pad], kv_seg [batch, kv_pad]) -> [batch, q_pad, 128], [batch, 8, kv_pad]."""
  if segments is None:
    return ()
  q_seg, kv_seg = segments
  return (_lane_replicated(q_seg),
          jnp.broadcast_to(kv_seg[:, None, :], (kv_seg.shape[0], SUBLANES, kv_seg.shape[1])))


def _compiler_params(parallel_axes, arbitrary_axes):
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * parallel_axes + ("arbitrary",) * arbitrary_axes)


def _query_major_specs(spec, head_dim):
  """Block specs for grid (batch, heads, q_blocks, kv_blocks), the forward's and dq's: q-like
  [block_q, d], k/v [block_k, d] of kv head h // groups, row statistics [block_q, 128], and the
  segment ids (q [block_q, 128], kv [8, block_k])."""
  bq, bk, g = spec.block_q, spec.block_k, spec.groups
  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                         lambda b, h, i, j: (b, lax.div(h, g), _visible_kv_block(spec, i, j), 0))
  rows_spec = pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j: (b, h, i, 0))
  seg_specs = [pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
               pl.BlockSpec((None, SUBLANES, bk),
                            lambda b, h, i, j: (b, 0, _visible_kv_block(spec, i, j)))]
  return q_spec, kv_spec, rows_spec, seg_specs


# ---------------------------------------------------------------------------------------------
# Forward: grid (batch, heads, q_blocks, kv_blocks)


def _forward_kernel(*refs, spec):
  (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), (o_ref, lse_ref, acc_ref, m_ref, l_ref) = \
      tiling.split_refs(refs, 3, spec.segmented)
  # q_ref, o_ref: [block_q, d]; k_ref, v_ref: [block_k, d]; lse_ref: [block_q, 128];
  # scratch: acc_ref [block_q, d], m_ref (running max), l_ref (running sum) [block_q, 128]
  q_block, kv_block = pl.program_id(2), pl.program_id(3)
  lo, hi = tiling.kv_block_range(spec, q_block)

  @pl.when(kv_block == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, tiling.MASKED_LOGIT, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

  @pl.when((lo <= kv_block) & (kv_block < hi))
  def _step():
    s = tiling.dot_t(q_ref[...], k_ref[...]) * spec.scale  # [block_q, block_k]
    mask = _tile_mask(spec, q_block, kv_block, q_seg_ref, kv_seg_ref)
    if mask is not None:
      s = jnp.where(mask, s, tiling.MASKED_LOGIT)
    m, l = m_ref[:, :1], l_ref[:, :1]  # [block_q, 1]
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row masked so far has m_new == MASKED_LOGIT, p == 1
    correction = jnp.exp(m - m_new)
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * correction + tiling.dot(p.astype(v.dtype), v)
    m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l * correction + p.sum(axis=1, keepdims=True), l_ref.shape)

  @pl.when(kv_block == pl.num_programs(3) - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0  # rows with nothing to attend to: output 0, p == 0 in the backward
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_ref[...] / safe_l[:, :1]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(safe_l))


def forward(q, k, v, segments, spec):
  """Padded q [batch, q_pad, heads, d], k/v [batch, kv_pad, kv_heads, d] -> out (like q),
  lse [batch, heads, q_pad]."""
  batch, q_pad, heads, head_dim = q.shape
  bq, bk = spec.block_q, spec.block_k
  q_spec, kv_spec, rows_spec, seg_specs = _query_major_specs(spec, head_dim)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec),
      grid=(batch, heads, q_pad // bq, spec.kv_pad // bk),
      in_specs=[q_spec, kv_spec, kv_spec] + (seg_specs if spec.segmented else []),
      out_specs=[q_spec, rows_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, heads, q_pad, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad, LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32),
                      pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32)],
      compiler_params=_compiler_params(3, 1),
      interpret=spec.interpret,
      name="flash_attention_forward_tpu",
  )(_head_major(q), _head_major(k), _head_major(v), *_segment_args(segments))
  return _head_major(out), lse[..., 0]


def _head_major(x):
  """[batch, length, heads, d] <-> [batch, heads, length, d]."""
  return x.transpose(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Backward: dq with grid (batch, heads, q_blocks, kv_blocks); dk, dv with grid (batch, kv_heads,
# kv_blocks, groups, q_blocks), the last two walking the query heads of the group and their
# q blocks. delta = rowsum(o * do).


def _probs(spec, q, k, lse, mask):
  """Recomputed softmax tile [block_q, block_k] from the saved log-sum-exp [block_q, 1]."""
  p = jnp.exp(tiling.dot_t(q, k) * spec.scale - lse)
  return p if mask is None else jnp.where(mask, p, 0.0)


def _dq_kernel(*refs, spec):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), (dq_ref, acc_ref) = \
      tiling.split_refs(refs, 6, spec.segmented)
  # q_ref, do_ref, dq_ref, acc_ref (scratch): [block_q, d]; k_ref, v_ref: [block_k, d];
  # lse_ref, delta_ref: [block_q, 128]
  q_block, kv_block = pl.program_id(2), pl.program_id(3)
  lo, hi = tiling.kv_block_range(spec, q_block)

  @pl.when(kv_block == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when((lo <= kv_block) & (kv_block < hi))
  def _step():
    k = k_ref[...]
    mask = _tile_mask(spec, q_block, kv_block, q_seg_ref, kv_seg_ref)
    p = _probs(spec, q_ref[...], k, lse_ref[:, :1], mask)
    ds = p * (tiling.dot_t(do_ref[...], v_ref[...]) - delta_ref[:, :1])  # [block_q, block_k]
    acc_ref[...] += tiling.dot(ds.astype(k.dtype), k)

  @pl.when(kv_block == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec):
  ((q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref),
   (dk_ref, dv_ref, dk_acc_ref, dv_acc_ref)) = tiling.split_refs(refs, 6, spec.segmented)
  # q_ref, do_ref: [block_q, d]; lse_ref, delta_ref: [block_q, 128];
  # k_ref, v_ref, dk_ref, dv_ref, dk_acc_ref and dv_acc_ref (scratch): [block_k, d]
  kv_block, head, q_block = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  lo, hi = tiling.q_block_range(spec, kv_block)

  @pl.when((head == 0) & (q_block == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  @pl.when((lo <= q_block) & (q_block < hi))
  def _step():
    q, do = q_ref[...], do_ref[...]
    mask = _tile_mask(spec, q_block, kv_block, q_seg_ref, kv_seg_ref)
    p = _probs(spec, q, k_ref[...], lse_ref[:, :1], mask)  # [block_q, block_k]
    dv_acc_ref[...] += tiling.dot(p.T.astype(do.dtype), do)  # float32 transposes, then the MXU
    ds = p * (tiling.dot_t(do, v_ref[...]) - delta_ref[:, :1])
    dk_acc_ref[...] += tiling.dot(ds.T.astype(q.dtype), q)

  @pl.when((head == pl.num_programs(3) - 1) & (q_block == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(q, k, v, segments, out, lse, dout, dq_spec, dkv_spec):
  """Padded inputs as for `forward`, its out and lse, dout like q -> dq, dk, dv; each kernel
  with its own blocks."""
  batch, q_pad, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  g = dq_spec.groups
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  q, k, v, dout = (_head_major(x) for x in (q, k, v, dout))
  lse, delta = _lane_replicated(lse), _lane_replicated(delta)  # [batch, heads, q_pad, 128]
  seg_args = _segment_args(segments)

  # dq: like the forward, one query block of one head per (batch, head, q block), kv innermost.
  bq, bk = dq_spec.block_q, dq_spec.block_k
  q_spec, kv_spec, rows_spec, seg_specs = _query_major_specs(dq_spec, head_dim)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=dq_spec),
      grid=(batch, heads, q_pad // bq, dq_spec.kv_pad // bk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, rows_spec, rows_spec]
      + (seg_specs if dq_spec.segmented else []),
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)],
      compiler_params=_compiler_params(3, 1),
      interpret=dq_spec.interpret,
      name="flash_attention_dq_tpu",
  )(q, k, v, dout, lse, delta, *seg_args)

  # dk, dv: one kv block of one kv head per (batch, kv head, kv block), over every q block of
  # every query head of its group (heads h * g + r, r < g).
  bq, bk = dkv_spec.block_q, dkv_spec.block_k

  def q_index(b, h, j, r, i):
    return b, h * g + r, _visible_q_block(dkv_spec, j, i), 0

  group_q_spec = pl.BlockSpec((None, None, bq, head_dim), q_index)
  group_rows_spec = pl.BlockSpec((None, None, bq, LANES), q_index)
  block_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, h, j, r, i: (b, h, j, 0))
  seg_specs = [pl.BlockSpec((None, bq, LANES),
                            lambda b, h, j, r, i: (b, _visible_q_block(dkv_spec, j, i), 0)),
               pl.BlockSpec((None, SUBLANES, bk), lambda b, h, j, r, i: (b, 0, j))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=dkv_spec),
      grid=(batch, kv_heads, dkv_spec.kv_pad // bk, g, q_pad // bq),
      in_specs=[group_q_spec, block_spec, block_spec, group_q_spec, group_rows_spec,
                group_rows_spec] + (seg_specs if dkv_spec.segmented else []),
      out_specs=[block_spec, block_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, head_dim), jnp.float32)] * 2,
      compiler_params=_compiler_params(3, 2),
      interpret=dkv_spec.interpret,
      name="flash_attention_dkv_tpu",
  )(q, k, v, dout, lse, delta, *seg_args)
  return _head_major(dq), _head_major(dk), _head_major(dv)

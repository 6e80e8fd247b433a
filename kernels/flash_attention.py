"""Flash attention in Pallas: forward and backward kernels, the pure-jnp reference, dispatch.

`flash_attention(query, key, value, *, causal, segment_ids, local_window_size, ...)` takes the
layout and grouped-query convention of `jax.nn.dot_product_attention`: query
[batch, q_len, heads, head_dim], key/value [batch, kv_len, kv_heads, head_dim], query head `h`
reads kv head `h // (heads // kv_heads)`; K and V are never repeated in memory.

The forward pass keeps a [block_q, head_dim] float32 accumulator per grid cell and walks the kv
blocks with an online softmax; it saves only the output and the log-sum-exp per query row
(`lse` [batch, heads, q_pad] float32, natural log, +inf for a row that sees no key). The
backward pass (also Pallas) recomputes the probabilities block by block from that log-sum-exp:
one kernel for dq (grid over query blocks), one for dk/dv (grid over kv blocks and kv heads,
looping over the query heads of the group). Memory is linear in length. Each of the three
kernels has its own tiles and, on GPU, Triton warps and stages (`AttentionBlockSizes`, the
table `BLOCK_SIZES`): dq holds a long query block and walks short kv blocks; dk/dv has the
square tiles that compiled without register spills.

Lengths need not be multiples of the block sizes: the dispatch pads to whole blocks and the
kernels mask the padded keys. Rows with nothing to attend to give zeros, never NaN.

Masks only where needed: blocks outside the causal band or the window are not visited, and
the visited ones are walked in up to three runs, masked / whole / masked (`_runs`): only the
blocks that the causal diagonal, a window edge or the padded keys cross pay for the mask's
iotas, compares and selects, as in FlashAttention-2's Triton kernels. With segment ids every
visited block is masked. In these kernels logits, running maxima and the recomputed softmax
are in base 2 (the scale times log2(e), then exp2, one GPU instruction where exp is two); the
saved log-sum-exp is converted to and from natural log, so the TPU kernels' (natural exp
throughout) and any other reader's convention is unchanged.

Backends: the kernels in this file follow Triton's layout ([length, groups, head_dim] blocks of
the query heads of one kv head, 1-D row vectors): on GPU they lower through Triton (block shapes
are powers of two >= 16); on CPU they run with `interpret=True` (the tests). Mosaic (TPU) does
not tile that layout, so on TPU the dispatch runs the kernels of flash_attention_tpu.py instead:
the same algorithm, masks and block ranges (tiling.py holds what the two share) on head-major
[batch, heads, length, head_dim] views with 2-D (8, 128)-tiled blocks (block lengths >= 128,
short inputs padded to 128) and VMEM accumulators. On a Hopper GPU bfloat16 or float16
attention, causal or full, without segment ids or a window, at head_dim 64 or 128 and padded
lengths that the tiles divide (128), runs the Mosaic GPU kernels instead (TMA, wgmma, warp
specialisation): the forward of flash_attention_mgpu.py and the backward of
flash_attention_mgpu_backward.py. Every forward saves the same residuals (out and the natural-log
lse), so either forward pairs with either backward: `hopper_forward` and `hopper_backward` force
each choice.

Precision: float32 inputs are multiplied at the backend's default precision for float32 dots,
that of `jnp.dot` without `precision=` and of XLA's and cuDNN's attention: TF32 on NVIDIA GPUs
(operands rounded to a 10-bit mantissa, float32 accumulation; ~1e-3 relative error), full
float32 on CPU. `jax.default_matmul_precision("highest")` around the call makes the GPU
kernels' dots full float32. Softmax statistics and accumulators are float32 throughout.

Remat: the forward's residuals, the output and the log-sum-exp, carry the names in
FLASH_RESIDUAL_NAMES. A remat policy that saves them (e.g.
`jax.checkpoint_policies.save_only_these_names(*FLASH_RESIDUAL_NAMES)`) keeps the backward
pass from re-running the forward kernel; one that does not re-runs it.

`masked_attention` is the plain-jnp attention over an explicit mask (the XLA path);
`flash_attention_reference` is it with the kernels' masks, the ground truth of the tests.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from llm_research.kernels import tiling

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
FLASH_RESIDUAL_NAMES = ("flash_attention_out", "flash_attention_lse")


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
  """One kernel's tile lengths along the query and key axes (powers of two >= 16) and its
  Triton launch parameters: warps per program and software-pipelining stages (GPU only).

  Not shared with the ternary matmul's `MatmulBlockSizes`: the two kernels tile different axes
  (query and key lengths here; rows, columns and depth there), so each names its own.
  """

  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes:
  """The tiles of the three kernels, each its own: the forward and dq kernels hold a query
  block and walk the kv blocks, dk/dv holds a kv block and walks the query blocks, and a kernel
  wants the block it holds (and accumulates into) large and the one it walks small."""

  forward: KernelBlocks
  dq: KernelBlocks
  dkv: KernelBlocks

  def kernels(self) -> tuple[KernelBlocks, KernelBlocks, KernelBlocks]:
    """(forward, dq, dkv)."""
    return self.forward, self.dq, self.dkv


def _same_blocks(block: int) -> AttentionBlockSizes:
  """Square `block` tiles for all three kernels (launch parameters unused off GPU)."""
  return AttentionBlockSizes(*[KernelBlocks(block, block)] * 3)


# backend -> head_dim -> AttentionBlockSizes.
# GPU: forward tiles as in FlashAttention-2's Triton kernels (measured on an H200 at 240-263
# TFLOP/s causal bf16); dq a long query block over short kv blocks, as in Triton's fused-attention
# tutorial. dk/dv: the tiles that compile without register spills. Each kernel's Triton IR
# (lowered here for CUDA, causal bf16) compiled for sm_90a by the standalone Triton 3.9 and its
# ptxas, 2026-11-27, no GPU: the tutorial's 32 x 128 dk/dv tile spilled at head_dim 64 and 128
# (648-700 bytes, 255 registers, part mma.sync instead of wgmma), 64 x 128 too (212-1968); 64 x 64
# with 8 warps did not (164 and 244 registers, wgmma only). At head_dim 256 only 32 x 32 with 8
# warps of those tried (32 x 64, 64 x 32; 4 warps) compiled without spills (246 registers). The
# forward and dq entries compiled without spills. XLA's own Triton may compile differently, and
# nothing here is timed: `experiments/benchmarks/attention.py --sweep` times candidates on a GPU.
# TPU: 128 everywhere, Mosaic's lane width; untuned (larger q blocks are likely faster).
# CPU (interpret mode): big tiles, since interpret cost grows with the number of tile steps.
BLOCK_SIZES = {
    "gpu": {
        64: AttentionBlockSizes(forward=KernelBlocks(128, 64, num_warps=4),
                                dq=KernelBlocks(128, 32, num_warps=4),
                                dkv=KernelBlocks(64, 64, num_warps=8)),
        128: AttentionBlockSizes(forward=KernelBlocks(128, 64, num_warps=8),
                                 dq=KernelBlocks(128, 32, num_warps=8),
                                 dkv=KernelBlocks(64, 64, num_warps=8)),
        256: AttentionBlockSizes(forward=KernelBlocks(64, 32, num_warps=8),
                                 dq=KernelBlocks(64, 32, num_warps=8),
                                 dkv=KernelBlocks(32, 32, num_warps=8)),
    },
    "tpu": {d: _same_blocks(128) for d in SUPPORTED_HEAD_DIMS},
    "cpu": {d: _same_blocks(128) for d in SUPPORTED_HEAD_DIMS},
}
_TPU_MIN_BLOCK = 128  # TPU blocks: multiples of Mosaic's lane width


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static a kernel needs: lengths, blocks, masking, backend."""

  q_pad: int  # padded lengths, multiples of the blocks
  kv_pad: int
  kv_len: int  # keys at kv_len and beyond are padding
  block_q: int
  block_k: int
  scale: float
  causal: bool
  window: tuple[int, int] | None  # (left, right): keys in [q - left, q + right]
  segmented: bool
  groups: int  # query heads per kv head
  tpu: bool  # the Mosaic kernels of flash_attention_tpu.py, else the Triton-layout ones here
  interpret: bool
  compiler_params: object
  hopper: bool = False  # the forward of flash_attention_mgpu.py, not the Triton-layout one

  @property
  def scale_log2(self) -> float:
    """The logit scale times log2(e): the Triton-layout kernels keep logits, running maxima and
    the log-sum-exp in base-2 units and exponentiate with exp2, one instruction on a GPU where
    exp is a multiply and an exp2."""
    return self.scale * tiling.LOG2_E


# ---------------------------------------------------------------------------------------------
# Plain-jnp attention and the reference


def masked_attention(query, key, value, mask, *, scale=None):
  """Softmax attention over an explicit mask, in plain jnp: the XLA attention path.

  Args:
    query: [batch, q_len, heads, head_dim].
    key, value: [batch, kv_len, kv_heads, head_dim]; kv_heads divides heads, query head `h`
      reads kv head `h // (heads // kv_heads)` (K and V are never repeated in memory).
    mask: bool, broadcastable to [batch, q_len, kv_len]; True = attend.
    scale: logit scale, default head_dim ** -0.5.

  Returns [batch, q_len, heads, head_dim] in query's dtype. Logits and softmax are float32; a
  row with nothing to attend to gives zeros, never NaN. The [q_len, kv_len] logits are
  materialised, but the backward pass keeps only the probabilities, in value's dtype (see
  `_masked_softmax`): with bfloat16 inputs no float32 [q_len, kv_len] array outlives the
  forward pass.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  scale = head_dim**-0.5 if scale is None else scale
  q = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, key, preferred_element_type=jnp.float32) * scale
  mask = jnp.broadcast_to(mask, (batch, q_len, kv_len))[:, None, None]  # [batch, 1, 1, t, s]
  probs = _masked_softmax(logits, mask, value.dtype)  # [batch, kv_heads, groups, t, s]
  out = jnp.einsum("bkgts,bskd->btkgd", probs, value, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, head_dim).astype(query.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_softmax(logits, mask, dtype):
  """float32 logits [..., kv_len] -> softmax over the keys where `mask`, 0 elsewhere (all 0 in
  a row without any), in `dtype`.

  Autodiff of this formula would keep float32 arrays of the logits' shape (the exponentials,
  the float32 probabilities) for the backward pass; the custom VJP keeps only the `dtype`
  probabilities p, enough for the softmax gradient d_logits = p * (dp - sum(p * dp)). Masked
  keys have p == 0 and so get no gradient.
  """
  return _masked_softmax_fwd(logits, mask, dtype)[0]


def _masked_softmax_fwd(logits, mask, dtype):
  logits = jnp.where(mask, logits, tiling.MASKED_LOGIT)
  probs = jnp.where(mask, jnp.exp(logits - logits.max(-1, keepdims=True)), 0.0)
  denom = probs.sum(-1, keepdims=True)
  probs = (probs / jnp.where(denom == 0, 1.0, denom)).astype(dtype)
  return probs, probs


def _masked_softmax_bwd(dtype, probs, d_probs):
  del dtype  # the cotangent of float32 logits is float32
  p, dp = probs.astype(jnp.float32), d_probs.astype(jnp.float32)
  return p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)), None


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def flash_attention_reference(query, key, value, *, causal=False, segment_ids=None,
                              local_window_size=None, scale=None):
  """Same signature and semantics as `flash_attention`: `masked_attention` with the kernels'
  masks. Materialises the [q_len, kv_len] logits: for tests and as the XLA peer in benchmarks.
  """
  q_len, kv_len = query.shape[1], key.shape[1]
  mask = tiling.attention_mask(jnp.arange(q_len)[:, None], jnp.arange(kv_len)[None, :], causal,
                               _window(local_window_size), None)  # [q_len, kv_len] or None
  mask = True if mask is None else mask
  q_seg, kv_seg = _split_segment_ids(segment_ids)
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])  # [batch, q_len, kv_len]
  return masked_attention(query, key, value, mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# Block runs and tile masks of the Triton-layout kernels (the masks and block ranges they build
# on, shared with the TPU kernels and the reference, are in tiling.py)


def _kv_block_runs(spec, q_block):
  """The kv blocks that query block `q_block` (traced) sees, as `_runs`: unmasked where every
  key of the block is visible to every row of the query block."""
  lo, hi = tiling.kv_block_range(spec, q_block)
  first_q, last_q = q_block * spec.block_q, (q_block + 1) * spec.block_q - 1
  lowers, uppers = [], []  # keys >= each lower and < each upper are visible to every row
  if spec.kv_pad != spec.kv_len:
    uppers.append(spec.kv_len)
  if spec.causal:
    uppers.append(first_q + 1)
  if spec.window is not None:
    left, right = spec.window
    lowers.append(last_q - left)
    uppers.append(first_q + right + 1)
  return _runs(spec, lo, hi, lowers, uppers, spec.block_k)


def _q_block_runs(spec, kv_block):
  """The query blocks that see kv block `kv_block` (traced), as `_runs`: unmasked where every
  row of the query block sees every key of the kv block."""
  lo, hi = tiling.q_block_range(spec, kv_block)
  first_k, last_k = kv_block * spec.block_k, (kv_block + 1) * spec.block_k - 1
  lowers, uppers = [], []  # rows >= each lower and < each upper see every key
  if spec.causal:
    lowers.append(last_k)
  if spec.window is not None:
    left, right = spec.window
    lowers.append(last_k - right)
    uppers.append(first_k + left + 1)
  if spec.kv_pad != spec.kv_len:  # no row sees the whole of a block holding padded keys
    # q_pad or 0; not jnp.where, whose select Pallas' Triton lowering fed as an i1 into the
    # division in `_runs` (caught by lowering a causal call with padded keys and no window).
    uppers.append(jnp.asarray(last_k < spec.kv_len, jnp.int32) * spec.q_pad)
  return _runs(spec, lo, hi, lowers, uppers, spec.block_q)


def _runs(spec, lo, hi, lowers, uppers, block):
  """Blocks [lo, hi) of length `block` as consecutive runs [(start, stop, masked)]: unmasked
  the blocks lying wholly in [max(lowers), min(uppers)) (positions along the walked axis),
  masked those before and after. No lowers (uppers): no masked run before (after); a segmented
  call has one run, masked. The kernels loop over each run with its own body, so that the
  common, whole blocks skip the mask's iotas, compares and selects.
  """
  if spec.segmented:
    return [(lo, hi, True)]
  hi = jnp.maximum(lo, hi)  # a block that no row sees has lo > hi
  runs = []
  if lowers:
    first_whole = lax.div(jnp.maximum(functools.reduce(jnp.maximum, lowers), 0) + block - 1,
                          block)
    start = jnp.clip(first_whole, lo, hi)
    runs.append((lo, start, True))
    lo = start
  if not uppers:
    return runs + [(lo, hi, False)]
  stop = jnp.clip(lax.div(functools.reduce(jnp.minimum, uppers), block), lo, hi)
  return runs + [(lo, stop, False), (stop, hi, True)]


def _fold_runs(runs, step, carry):
  """`carry` through step(block, carry, masked=...) over the blocks of `runs`, in order."""
  for start, stop, masked in runs:
    carry = lax.fori_loop(start, stop, functools.partial(step, masked=masked), carry)
  return carry


def _block_mask(spec, q_start, k_start, rows, cols, q_seg=None, kv_seg=None):
  """The [rows, cols] mask of one tile (None: nothing masked)."""
  q_idx = q_start + lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  k_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
  kv_len = spec.kv_len if spec.kv_pad != spec.kv_len else None
  mask = tiling.attention_mask(q_idx, k_idx, spec.causal, spec.window, kv_len)
  if spec.segmented:
    same = q_seg[:, None] == kv_seg[None, :]
    mask = same if mask is None else mask & same
  return mask


# ---------------------------------------------------------------------------------------------
# Forward kernel: grid (q_blocks, batch, heads)


def _forward_kernel(*refs, spec):
  (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), (o_ref, lse_ref) = tiling.split_refs(
      refs, 3, spec.segmented)
  q_seg = q_seg_ref[...] if spec.segmented else None  # [block_q]
  # q_ref, o_ref: [block_q, head_dim]; k_ref, v_ref: [kv_pad, head_dim]; lse_ref: [block_q]
  bq, bk = spec.block_q, spec.block_k
  q_block = pl.program_id(0)
  q = q_ref[...]

  def step(kv_block, carry, masked):
    acc, m, l = carry  # [bq, head_dim], [bq], [bq] float32; m and logits in base-2 units
    keys = pl.ds(kv_block * bk, bk)
    s = tiling.dot_t(q, k_ref[keys, :]) * spec.scale_log2  # [bq, bk]
    mask = None
    if masked:
      kv_seg = kv_seg_ref[keys] if spec.segmented else None
      mask = _block_mask(spec, q_block * bq, kv_block * bk, bq, bk, q_seg, kv_seg)
    if mask is not None:
      s = jnp.where(mask, s, tiling.MASKED_LOGIT)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
      p = jnp.where(mask, p, 0.0)  # a row masked so far has m_new == MASKED_LOGIT, p == 1
    correction = jnp.exp2(m - m_new)
    v = v_ref[keys, :]
    acc = acc * correction[:, None] + tiling.dot(p.astype(v.dtype), v)
    return acc, m_new, l * correction + p.sum(axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), tiling.MASKED_LOGIT, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _fold_runs(_kv_block_runs(spec, q_block), step, init)
  empty = l == 0.0  # rows with nothing to attend to: output 0, p == 0 in the backward
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  # The residual is a natural log, as the TPU kernels' (m is in base-2 units): m ln 2 + ln l.
  lse_ref[...] = jnp.where(empty, jnp.inf, m / tiling.LOG2_E + jnp.log(jnp.where(empty, 1.0, l)))


def _forward(q, k, v, segments, spec):
  """Padded q [batch, q_pad, heads, d], k/v [batch, kv_pad, kv_heads, d] -> out, lse."""
  batch, q_pad, heads, head_dim = q.shape
  kv_pad = k.shape[1]
  g = spec.groups
  q_spec = pl.BlockSpec((None, spec.block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // g, 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  if spec.segmented:
    in_specs += [pl.BlockSpec((None, spec.block_q), lambda i, b, h: (b, i)),
                 pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0))]
  return pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec),
      grid=(q_pad // spec.block_q, batch, heads),
      in_specs=in_specs,
      out_specs=[q_spec, pl.BlockSpec((None, None, spec.block_q), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_pad), jnp.float32)],
      compiler_params=spec.compiler_params,
      interpret=spec.interpret,
      name="flash_attention_forward",
  )(q, k, v, *(segments or ()))


# ---------------------------------------------------------------------------------------------
# Backward kernels: dq with grid (q_blocks, batch, heads); dk, dv with grid (kv_blocks, batch,
# kv_heads), each cell looping over its group's query heads. delta = rowsum(o * do).


def _probs(spec, q, k, lse_log2, masked, q_start, k_start, q_seg, kv_seg):
  """Recomputed softmax tile [rows, cols] from the saved log-sum-exp, in base-2 units."""
  p = jnp.exp2(tiling.dot_t(q, k) * spec.scale_log2 - lse_log2[:, None])
  if not masked:
    return p
  mask = _block_mask(spec, q_start, k_start, q.shape[0], k.shape[0], q_seg, kv_seg)
  return p if mask is None else jnp.where(mask, p, 0.0)


def _dq_kernel(*refs, spec):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), (dq_ref,) = \
      tiling.split_refs(refs, 6, spec.segmented)
  q_seg = q_seg_ref[...] if spec.segmented else None
  # q_ref, do_ref, dq_ref: [block_q, d]; k_ref, v_ref: [kv_pad, d]; lse/delta_ref: [block_q]
  bq, bk = spec.block_q, spec.block_k
  q_block = pl.program_id(0)
  q, do, lse_log2, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def step(kv_block, dq, masked):
    keys = pl.ds(kv_block * bk, bk)
    k = k_ref[keys, :]
    kv_seg = kv_seg_ref[keys] if spec.segmented else None
    p = _probs(spec, q, k, lse_log2, masked, q_block * bq, kv_block * bk, q_seg,
               kv_seg)  # [bq, bk]
    ds = p * (tiling.dot_t(do, v_ref[keys, :]) - delta[:, None])
    return dq + tiling.dot(ds.astype(k.dtype), k)

  dq = _fold_runs(_kv_block_runs(spec, q_block), step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), (dk_ref, dv_ref) = \
      tiling.split_refs(refs, 6, spec.segmented)
  kv_seg = kv_seg_ref[...] if spec.segmented else None
  # q_ref, do_ref: [q_pad, groups, d]; lse_ref, delta_ref: [groups, q_pad];
  # k_ref, v_ref, dk_ref, dv_ref: [block_k, d]
  bq, bk = spec.block_q, spec.block_k
  kv_block = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  runs = _q_block_runs(spec, kv_block)

  def head(g, carry):
    def step(q_block, carry, masked):
      dk, dv = carry
      rows = pl.ds(q_block * bq, bq)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      q_seg = q_seg_ref[rows] if spec.segmented else None
      p = _probs(spec, q, k, lse_ref[g, rows], masked, q_block * bq, kv_block * bk, q_seg,
                 kv_seg)
      dv = dv + tiling.dot_tn(p.astype(do.dtype), do)
      ds = p * (tiling.dot_t(do, v) - delta_ref[g, rows][:, None])  # [bq, bk]
      return dk + tiling.dot_tn(ds.astype(q.dtype), q), dv

    return _fold_runs(runs, step, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, spec.groups, head, (zeros, zeros))
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, segments, out, lse, dout, dq_spec, dkv_spec):
  """Padded inputs as for `_forward`, its out and lse, dout like q -> dq, dk, dv; each kernel
  with its own blocks and launch parameters."""
  batch, q_pad, heads, head_dim = q.shape
  kv_pad, kv_heads = k.shape[1], k.shape[2]
  g = dq_spec.groups
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  lse_log2 = lse * tiling.LOG2_E  # the kernels' base-2 units; +inf (empty rows) stays +inf
  seg_args = segments or ()

  # dq: like the forward, one query block of one head per cell.
  bq, bk = dq_spec.block_q, dq_spec.block_k
  q_spec = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, kv_pad, None, head_dim), lambda i, b, h: (b, 0, h // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  seg_specs = [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
               pl.BlockSpec((None, kv_pad), lambda i, b, h: (b, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=dq_spec),
      grid=(q_pad // bq, batch, heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
      + (seg_specs if segments else []),
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=dq_spec.compiler_params,
      interpret=dq_spec.interpret,
      name="flash_attention_dq",
  )(q, k, v, dout, lse_log2, delta, *seg_args)

  # dk, dv: one kv block of one kv head per cell, over all query heads of its group.
  bk = dkv_spec.block_k
  group_spec = pl.BlockSpec((None, q_pad, g, head_dim), lambda j, b, h: (b, 0, h, 0))
  group_rows = pl.BlockSpec((None, g, q_pad), lambda j, b, h: (b, h, 0))
  block_spec = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
  seg_specs = [pl.BlockSpec((None, q_pad), lambda j, b, h: (b, 0)),
               pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=dkv_spec),
      grid=(kv_pad // bk, batch, kv_heads),
      in_specs=[group_spec, block_spec, block_spec, group_spec, group_rows, group_rows]
      + (seg_specs if segments else []),
      out_specs=[block_spec, block_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=dkv_spec.compiler_params,
      interpret=dkv_spec.interpret,
      name="flash_attention_dkv",
  )(q, k, v, dout, lse_log2, delta, *seg_args)
  return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# custom_vjp over padded inputs: the forward kernel's spec for the primal, the dq and dk/dv
# kernels' for the vjp.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segments, fwd_spec, dq_spec, dkv_spec):
  return _forward_call(q, k, v, segments, fwd_spec)[0]


def _flash_fwd(q, k, v, segments, fwd_spec, dq_spec, dkv_spec):
  out, lse = _forward_call(q, k, v, segments, fwd_spec)
  # Named for remat policies: saving these two spares the backward a second forward kernel.
  out, lse = (checkpoint_name(x, name) for x, name in zip((out, lse), FLASH_RESIDUAL_NAMES))
  return out, (q, k, v, segments, out, lse)


def _flash_bwd(fwd_spec, dq_spec, dkv_spec, residuals, dout):
  q, k, v, segments, out, lse = residuals
  dq, dk, dv = _kernels(dq_spec)[1](q, k, v, segments, out, lse, dout, dq_spec, dkv_spec)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnums=4)
def _forward_call(q, k, v, segments, spec):
  """The forward kernel of spec's layout -> (out, lse), under jit so that an unused call can be
  dropped. Remat re-traces the forward for the backward pass, and when the policy saves
  FLASH_RESIDUAL_NAMES that re-traced kernel call is dead; but Pallas' DCE rule keeps every
  pallas_call, while a jit call with no used output and no effects is removed."""
  return _kernels(spec)[0](q, k, v, segments, spec)


def _kernels(spec):
  """(forward, backward) of spec's layout; both take and give the same arrays either way."""
  if spec.tpu:
    from llm_research.kernels import flash_attention_tpu
    return flash_attention_tpu.forward, flash_attention_tpu.backward
  if spec.hopper:
    return _hopper_forward, _hopper_backward
  return _forward, _backward


def _hopper_forward(q, k, v, segments, spec):
  """flash_attention_mgpu's forward with its default tiles on the padded inputs -> (out, lse);
  `_hopper_forward_applies` chose it, so there are no segments."""
  from llm_research.kernels import flash_attention_mgpu
  del segments
  return flash_attention_mgpu.forward(q, k, v, causal=spec.causal, scale=spec.scale,
                                      kv_len=spec.kv_len, interpret=spec.interpret)


def _hopper_backward(q, k, v, segments, out, lse, dout, dq_spec, dkv_spec):
  """flash_attention_mgpu_backward's kernels with their default tiles on the padded inputs ->
  (dq, dk, dv); the padded query rows' dout is zero (the output is sliced), so they add nothing
  to dk and dv. `_hopper_applies` chose them, so there are no segments."""
  from llm_research.kernels import flash_attention_mgpu_backward
  del segments, dkv_spec  # the kernels have their own tiles
  return flash_attention_mgpu_backward.backward(
      q, k, v, out, dout, lse, causal=dq_spec.causal, scale=dq_spec.scale,
      kv_len=dq_spec.kv_len, interpret=dq_spec.interpret)


# ---------------------------------------------------------------------------------------------
# Dispatch


def flash_attention(query, key, value, *, causal=False, segment_ids=None,
                    local_window_size=None, scale=None, block_sizes=None, interpret=None,
                    hopper_forward=None, hopper_backward=None):
  """Memory-efficient softmax attention, a drop-in for `jax.nn.dot_product_attention`.

  Args:
    query: [batch, q_len, heads, head_dim], float32 or bfloat16.
    key, value: [batch, kv_len, kv_heads, head_dim], same dtype; kv_heads divides heads.
    causal: query i sees keys j <= i (aligned at position 0, as in jax.nn).
    segment_ids: int [batch, length] (q_len == kv_len) or a pair (q_ids [batch, q_len],
      kv_ids [batch, kv_len]): a query sees only keys of its own segment (packed sequences).
    local_window_size: None, an int w or a pair (left, right): query i sees keys in
      [i - left, i + right] (w means (w, w)), as in jax.nn.dot_product_attention.
    scale: logit scale, default head_dim ** -0.5.
    block_sizes: an AttentionBlockSizes overriding the per-backend table `BLOCK_SIZES`: for
      each kernel (forward, dq, dkv) block_q and block_k, powers of two >= 16 (on TPU >= 128),
      and Triton's num_warps (a power of two <= 32) and num_stages (>= 1), used on GPU only.
    interpret: run the Pallas kernels in interpret mode; default True on CPU.
    hopper_forward: run the forward on flash_attention_mgpu.py's Hopper kernel (True; an error
      where it does not apply; with interpret=True, its Mosaic GPU interpreter), never (False),
      or where it applies (None: a Hopper GPU, not interpreting, and the module docstring's
      conditions). `block_sizes.forward` then does not apply: that kernel has its own tiles.
    hopper_backward: the same for the backward (flash_attention_mgpu_backward.py), in place of
      the dq and dk/dv kernels and their `block_sizes`.

  Returns [batch, q_len, heads, head_dim] in query's dtype; float32 accumulation throughout.
  Float32 inputs are multiplied at the backend's default dot precision: TF32 on NVIDIA GPUs
  (~1e-3 relative error, as XLA and cuDNN by default), full float32 on CPU (module docstring).
  Rows that see no key are zeros. Differentiable in query, key, value (Pallas backward); the
  residuals are named FLASH_RESIDUAL_NAMES for remat policies.
  """
  backend = jax.default_backend()
  _check_inputs(query, key, value, segment_ids, local_window_size, block_sizes, backend)
  interpret = backend == "cpu" if interpret is None else interpret
  q_len, heads, head_dim = query.shape[1:]
  kv_len, kv_heads = key.shape[1], key.shape[2]
  table = block_sizes or BLOCK_SIZES[backend if backend in ("gpu", "tpu") else "cpu"][head_dim]
  # Short inputs shrink the blocks, on TPU not below 128: Mosaic's tiles stay whole (8, 128).
  fit = functools.partial(tiling.fit_power_of_two,
                          smallest=_TPU_MIN_BLOCK if backend == "tpu" else tiling.TRITON_MIN_BLOCK)
  kernels = [dataclasses.replace(blocks, block_q=fit(blocks.block_q, q_len),
                                 block_k=fit(blocks.block_k, kv_len))
             for blocks in table.kernels()]
  # Pad once to lengths every block divides (blocks are powers of two: the largest does).
  q_pad = tiling.round_up(q_len, max(blocks.block_q for blocks in kernels))
  kv_pad = tiling.round_up(kv_len, max(blocks.block_k for blocks in kernels))
  fwd_spec, dq_spec, dkv_spec = (
      _Spec(q_pad=q_pad, kv_pad=kv_pad, kv_len=kv_len, block_q=blocks.block_q,
            block_k=blocks.block_k, scale=head_dim**-0.5 if scale is None else float(scale),
            causal=causal, window=_window(local_window_size),
            segmented=segment_ids is not None, groups=heads // kv_heads, tpu=backend == "tpu",
            interpret=interpret, compiler_params=_compiler_params(backend, blocks, interpret))
      for blocks in kernels)
  hopper = functools.partial(_hopper_applies, backend=backend, interpret=interpret, query=query,
                             segment_ids=segment_ids, local_window_size=local_window_size,
                             q_pad=q_pad, kv_pad=kv_pad)
  if hopper("hopper_forward", hopper_forward):
    fwd_spec = dataclasses.replace(fwd_spec, hopper=True)
  if hopper("hopper_backward", hopper_backward):
    dq_spec = dataclasses.replace(dq_spec, hopper=True)  # _flash_bwd's kernels follow dq_spec
  segments = None
  if segment_ids is not None:
    q_seg, kv_seg = _split_segment_ids(segment_ids)
    segments = (_pad(q_seg.astype(jnp.int32), q_pad), _pad(kv_seg.astype(jnp.int32), kv_pad))
  out = _flash(_pad(query, q_pad), _pad(key, kv_pad), _pad(value, kv_pad), segments,
               fwd_spec, dq_spec, dkv_spec)
  return out[:, :q_len]


def _pad(x, length):
  """Zero-pad the length axis (1) of x to `length`."""
  return tiling.pad_axis(x, 1, length)


def _window(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, int):
    return (local_window_size, local_window_size)
  return tuple(local_window_size)


def _split_segment_ids(segment_ids):
  if segment_ids is None or isinstance(segment_ids, (tuple, list)):
    return segment_ids if segment_ids is not None else (None, None)
  return segment_ids, segment_ids


def _hopper_applies(name, choice, *, backend, interpret, query, segment_ids, local_window_size,
                    q_pad, kv_pad) -> bool:
  """Whether a pass runs its Hopper kernels (`hopper_forward` or `hopper_backward`, `name`, in
  flash_attention, given as `choice`); raises where choice=True asks for them and they do not
  apply. The backward's default tiles take what the forward's do (a test checks it)."""
  if choice is False:
    return False
  from llm_research.kernels import flash_attention_mgpu
  on_hopper = backend == "gpu" and flash_attention_mgpu.hopper_available()
  reasons = []
  # Chosen by default only compiled on a Hopper; asked for, it may run interpreted anywhere.
  if not (on_hopper and not interpret if choice is None else on_hopper or interpret):
    reasons.append("it runs on a Hopper GPU (compute capability 9.0), or in interpret mode")
  if segment_ids is not None or local_window_size is not None:
    reasons.append("it takes no segment_ids and no local_window_size")
  if not flash_attention_mgpu.takes_with_default_tiles(query.dtype, query.shape[3], q_pad,
                                                       kv_pad):
    reasons.append(f"it takes {[d.name for d in flash_attention_mgpu.SUPPORTED_DTYPES]} at "
                   f"head_dim {flash_attention_mgpu.SUPPORTED_HEAD_DIMS} and lengths padded "
                   f"to multiples of its tiles, got {query.dtype.name}, head_dim "
                   f"{query.shape[3]}, lengths padded to {q_pad} and {kv_pad}")
  if choice and reasons:
    raise ValueError(f"{name}=True, but " + "; ".join(reasons))
  return not reasons


def _compiler_params(backend, blocks, interpret):
  """Triton's launch parameters from a kernel's KernelBlocks (GPU); None elsewhere."""
  if backend != "gpu" or interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _check_inputs(query, key, value, segment_ids, local_window_size, block_sizes, backend):
  """Raise at trace time, naming the argument, on anything the kernels do not handle."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, length, heads, head_dim], got shape {x.shape}")
    if x.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"{name}.dtype={x.dtype} is not one of "
                       f"{[d.name for d in SUPPORTED_DTYPES]}")
  if key.shape != value.shape:
    raise ValueError(f"key {key.shape} and value {value.shape} must have the same shape")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(f"query, key, value dtypes differ: {query.dtype}, {key.dtype}, "
                     f"{value.dtype}")
  batch, q_len, heads, head_dim = query.shape
  if key.shape[0] != batch or key.shape[3] != head_dim:
    raise ValueError(f"key {key.shape} must match query {query.shape} in batch and head_dim")
  if heads % key.shape[2]:
    raise ValueError(f"key heads ({key.shape[2]}) must divide query heads ({heads})")
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"query head_dim={head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
  if segment_ids is not None:
    q_seg, kv_seg = _split_segment_ids(segment_ids)
    for name, ids, length in (("query", q_seg, q_len), ("key", kv_seg, key.shape[1])):
      if ids.shape != (batch, length):
        raise ValueError(f"segment_ids for the {name} have shape {ids.shape}, expected "
                         f"{(batch, length)}")
  window = _window(local_window_size)
  if window is not None and (len(window) != 2 or min(window) < 0):
    raise ValueError(f"local_window_size={local_window_size} must be an int or a pair "
                     "(left, right) of non-negative ints")
  if block_sizes is not None:
    _check_block_sizes(block_sizes, backend)


def _check_block_sizes(block_sizes, backend):
  if not (isinstance(block_sizes, AttentionBlockSizes)
          and all(isinstance(b, KernelBlocks) for b in block_sizes.kernels())):
    raise ValueError(f"block_sizes={block_sizes} must be an AttentionBlockSizes of three "
                     "KernelBlocks (forward, dq, dkv)")
  for name, blocks in zip(("forward", "dq", "dkv"), block_sizes.kernels()):
    lengths = (blocks.block_q, blocks.block_k)
    if not all(tiling.is_triton_block(b) for b in lengths):
      raise ValueError(f"block_sizes.{name}={blocks}: block_q and block_k must be powers of "
                       f"two >= {tiling.TRITON_MIN_BLOCK}")
    if backend == "tpu" and min(lengths) < _TPU_MIN_BLOCK:
      raise ValueError(f"block_sizes.{name}={blocks}: block_q and block_k must be >= "
                       f"{_TPU_MIN_BLOCK} on TPU")
    if not (blocks.num_warps in (1, 2, 4, 8, 16, 32) and blocks.num_stages >= 1):
      raise ValueError(f"block_sizes.{name}={blocks}: num_warps must be a power of two <= 32 "
                       "(Triton's rule) and num_stages >= 1")

"""Flash attention backward for Hopper GPUs in Pallas Mosaic GPU (wgmma, TMA, warp specialization).

`backward(query, key, value, out, dout, lse, *, causal, scale, kv_len, ...)` -> (dq, dk, dv)
takes the layout, grouped-query convention and residuals of flash_attention_mgpu.forward: query
[batch, q_len, heads, head_dim], key/value [batch, kv_pad, kv_heads, head_dim] (query head `h`
reads kv head `h // (heads // kv_heads)`), lse float32 [batch, heads, q_len] in natural log.

The FlashAttention-2/3 structure, in two kernels after delta = rowsum(out * dout) (plain jnp):
- dk/dv: a thread block holds `num_compute_warpgroups * block_kv` keys of one kv head, each
  compute warpgroup `block_kv` of them with float32 dK and dV accumulators in registers. A memory
  warpgroup streams, for every query head of the group and every query block that can see the
  keys, Q, dO, lse and delta by TMA into a ring of `max_concurrent_steps` SMEM slots. Per step,
  with the kv rows as wgmma's M (so that P^T and dS^T come out of the accumulators already in the
  shape of the next wgmma's register operand): S^T = K Q^T and dP^T = V dO^T, then
  P^T = exp2(S^T * scale * log2 e - lse * log2 e), dV += P^T dO, dS^T = P^T * (dP^T - delta)
  and dK += dS^T Q.
- dq: like the forward, a thread block holds `num_compute_warpgroups * block_q` query rows of one
  head and a memory warpgroup streams K and V of its kv head; per step S = Q K^T, dP = dO V^T,
  dS = P * (dP - delta), dQ += dS K.
Both kernels skip what causal masking hides (a warpgroup walks only the blocks its rows or keys
can see and consumes the others' loads unread) and mask only the blocks that straddle the
diagonal or `kv_len`. Why two kernels and not FA3's one: FA3 adds each step's dQ contribution
into a float32 global buffer with atomic (or TMA reduce-add) stores from the dk/dv kernel.
Mosaic GPU Pallas has both (`plgpu.atomic_add`, `copy_smem_to_gmem(..., reduction_op="add")`),
but its interpreter runs neither (the first fails on the ref, the second raises
NotImplementedError), so that route could not be checked without a GPU; and it makes dq depend
on the order of the adds. The price of the second kernel is recomputing S and dP: 7 matmuls per
block pair instead of 5.

Accumulation: on the GPU dK, dV and dQ accumulate in place (`pl.run_state` over a wgmma
accumulator initialised with the running value), which keeps a fresh [rows, head_dim] float32
product out of the registers that the accumulators already crowd; the independent products of a
step (S and dP; dV and dK) are issued together and waited for once. The interpreter does not run
`pl.run_state`, so there the product is added (`_accumulate`); as in the forward, interpret
mode multiplies with `lax.dot_general` and skips layout casts (flash_attention_mgpu's module
docstring), and the TMA copies, barriers, ring, masks and softmax recomputation are the GPU's.

Padding: lengths are multiples of the tiles (the caller pads). Keys at `kv_len` and beyond get
zero gradients and are never read by the dq kernel; padded query rows must carry dout = 0 (as the
dispatch's padding gives), so they add nothing to dK and dV.

Not done: FA3's intra-warpgroup overlap of one step's softmax with the next step's wgmmas, and
any tuning of the tiles (defaults: 64 x 64 steps, two compute warpgroups, two ring slots).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from llm_research.kernels import flash_attention_mgpu as fwd
from llm_research.kernels import tiling
from llm_research.kernels.flash_attention_mgpu import layout_cast, matmul, ring_slot

# Tiles per wgmma step: 64 query rows by 64 keys, the smallest wgmma M; each kernel's held block
# is num_compute_warpgroups times its side (128 with two), as in FA3's head_dim-128 backward.
DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV, DEFAULT_CONCURRENT_STEPS = 64, 64, 2


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static the two kernels need; field names as in the forward's config, whose
  helpers (`matmul`, `layout_cast`, `ring_slot`, `visible_kv_blocks`) read them."""

  block_q: int  # query rows per wgmma step: held per warpgroup in dq, streamed in dk/dv
  block_kv: int  # keys per wgmma step: streamed in dq, held per warpgroup in dk/dv
  max_concurrent_steps: int  # SMEM ring slots
  num_compute_warpgroups: int
  q_blocks: int  # q_len // block_q
  kv_len: int  # keys at kv_len and beyond are padding
  kv_blocks: int  # kv blocks holding at least one real key
  causal: bool
  scale: float
  groups: int  # query heads per kv head
  head_dim: int
  dtype: jnp.dtype
  interpret: bool

  @property
  def scale_log2(self):
    return self.scale * tiling.LOG2_E


def backward(query, key, value, out, dout, lse, *, causal=False, scale=None, kv_len=None,
             block_q=DEFAULT_BLOCK_Q, block_kv=DEFAULT_BLOCK_KV,
             max_concurrent_steps=DEFAULT_CONCURRENT_STEPS,
             num_compute_warpgroups=fwd.DEFAULT_COMPUTE_WARPGROUPS, interpret=False):
  """Gradients of flash attention on Hopper; returns (dq, dk, dv).

  Args:
    query: [batch, q_len, heads, head_dim], bfloat16 or float16; head_dim 64 or 128.
    key, value: [batch, kv_pad, kv_heads, head_dim], same dtype; kv_heads divides heads.
    out: the forward's output, like query.
    dout: the output's cotangent, like query; zero on padded query rows.
    lse: the forward's float32 [batch, heads, q_len] log-sum-exp of each row's scaled logits
      over the keys it sees, natural log (flash_attention_mgpu.forward's second output).
    causal: query i sees keys j <= i.
    scale: logit scale, default head_dim ** -0.5.
    kv_len: keys at kv_len and beyond are padding; default kv_pad.
    block_q: query rows per step, a multiple of 64; q_len a multiple of
      num_compute_warpgroups * block_q.
    block_kv: keys per step, a multiple of 64; kv_pad a multiple of
      num_compute_warpgroups * block_kv. The dk/dv kernel keeps 2 * block_kv * head_dim float32
      accumulators per warpgroup: at head_dim 128, block_kv 64 already takes 128 of a thread's
      232 registers, and more spills.
    max_concurrent_steps: SMEM ring slots of each kernel (>= 2: a load overlaps the math).
    num_compute_warpgroups: 1 or 2 compute warpgroups per thread block, in both kernels.
    interpret: run in Mosaic GPU interpret mode (CPU), or pass InterpretGPUParams.

  Returns:
    dq like query, dk and dv like key; dk and dv are zero at keys past kv_len.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_pad, kv_heads = key.shape[1], key.shape[2]
  kv_len = kv_pad if kv_len is None else kv_len
  fwd.check_inputs(query, key, value, kv_len, block_q, block_kv, max_concurrent_steps,
                   num_compute_warpgroups)
  _check_residuals(query, key, out, dout, lse, block_kv, num_compute_warpgroups)
  _check_smem(query.dtype, head_dim, block_q, block_kv, max_concurrent_steps,
              num_compute_warpgroups)
  interpret = fwd.interpret_params(interpret)
  c = _Config(
      block_q=block_q, block_kv=block_kv, max_concurrent_steps=max_concurrent_steps,
      num_compute_warpgroups=num_compute_warpgroups, q_blocks=q_len // block_q, kv_len=kv_len,
      kv_blocks=pl.cdiv(kv_len, block_kv), causal=causal,
      scale=head_dim**-0.5 if scale is None else float(scale), groups=heads // kv_heads,
      head_dim=head_dim, dtype=query.dtype, interpret=bool(interpret))
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
  lse_log2 = lse * tiling.LOG2_E  # the kernels' base-2 units
  launch = functools.partial(
      plgpu.kernel, num_threads=num_compute_warpgroups + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=interpret or None)
  # kv tiles first to last: under causal masking the first ones see the most query blocks, so
  # the longest thread blocks start first (the dq kernel walks its query tiles backwards).
  dk, dv = launch(
      functools.partial(_dkv_entry, config=c),
      out_type=(jax.ShapeDtypeStruct(key.shape, key.dtype),
                jax.ShapeDtypeStruct(value.shape, value.dtype)),
      grid=(kv_heads, kv_pad // (num_compute_warpgroups * block_kv), batch),
      grid_names=("heads", "kv_tiles", "batch"),
  )(query, key, value, dout, lse_log2, delta)
  dq = launch(
      functools.partial(_dq_entry, config=c),
      out_type=jax.ShapeDtypeStruct(query.shape, query.dtype),
      grid=(heads, q_len // (num_compute_warpgroups * block_q), batch),
      grid_names=("heads", "q_tiles", "batch"),
  )(query, key, value, dout, lse_log2, delta)
  return dq, dk, dv


# ---- shared by the two kernels -----------------------------------------------------------------


def _produce(c, steps, load, free):
  """The memory warpgroup's loop: `load(step, slot)` issues step's TMA copies into its ring slot
  once the compute warpgroups have released the slot's previous step. The steps past the last
  load only wait for the last slots to be released: every thread must follow every phase of a
  barrier it waits on (the interpreter checks it)."""
  @pl.loop(0, steps + c.max_concurrent_steps)
  def _step(step):
    slot = ring_slot(c, step)

    @pl.when(step >= c.max_concurrent_steps)  # the slot held step - max_concurrent_steps
    def _():
      plgpu.barrier_wait(free.at[slot])

    @pl.when(step < steps)
    def _():
      load(step, slot)


def _pass_over(c, loaded, free, step):
  """Consume a ring step this warpgroup does not need (another warpgroup's rows or keys see it):
  the free barriers count an arrival from every compute warpgroup."""
  slot = ring_slot(c, step)
  plgpu.barrier_wait(loaded.at[slot])
  plgpu.barrier_arrive(free.at[slot])


def _products(c, *operands):
  """a @ b^T in float32 for each (a, b) pair of SMEM refs; on the GPU all wgmmas are issued
  before waiting for any, so that the tensor cores run them back to back."""
  if c.interpret:
    return tuple(matmul(c, a, b, transpose_b=True) for a, b in operands)

  def issue_and_read(*acc_refs):
    for acc_ref, (a, b) in zip(acc_refs, operands):
      plgpu.wgmma(acc_ref, a, plgpu.transpose_ref(b, (1, 0)))
    return tuple(acc_ref[...] for acc_ref in acc_refs)  # waits for the wgmmas
  return pl.run_scoped(issue_and_read, *(plgpu.ACC((a.shape[0], b.shape[0]), jnp.float32)
                                         for a, b in operands))


def _accumulate(c, *operands):
  """acc + a @ b for each (acc, a, b): acc float32, a a register array, b an SMEM ref; on the
  GPU in place (module docstring), all wgmmas issued before waiting for any."""
  if c.interpret:
    return tuple(acc + matmul(c, a, b, transpose_b=False) for acc, a, b in operands)

  def issue(acc_refs):
    for acc_ref, (_, a, b) in zip(acc_refs, operands):
      plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(issue)(tuple(plgpu.ACC.init(acc) for acc, _, _ in operands))


def _masked(c, x, first_query, first_key, query_axis):
  """x [rows, cols] of base-2 logits with -inf where the key is padding or, causal, after the
  query; query_axis says which of x's axes indexes queries."""
  iota = lambda axis: layout_cast(c, lax.broadcasted_iota(jnp.int32, x.shape, axis),
                                  plgpu.Layout.WGMMA)
  query_index = first_query + iota(query_axis)
  key_index = first_key + iota(1 - query_axis)
  visible = key_index < c.kv_len
  if c.causal:
    visible &= query_index >= key_index
  return jnp.where(visible, x, -jnp.inf)


def _write(c, values_and_buffers, gmem_refs):
  """Store float32 register tiles in the input dtype through SMEM buffers, then copy them to
  global memory by TMA; the buffers must be free (their wgmmas done)."""
  for value, smem in values_and_buffers:
    smem[...] = value.astype(c.dtype)
  plgpu.commit_smem()  # the register stores above are visible to the TMA engine
  for (_, smem), gmem in zip(values_and_buffers, gmem_refs):
    plgpu.copy_smem_to_gmem(smem, gmem)
  plgpu.wait_smem_to_gmem(0)  # SMEM must outlive the copies


def _set_registers(c, wg):
  """Give the compute warpgroups the registers the memory warpgroup does not need (the forward's
  split); with one compute warpgroup the default split suffices."""
  if c.num_compute_warpgroups == 1:
    return

  @pl.when(wg < c.num_compute_warpgroups)
  def _():
    plgpu.set_max_registers(fwd.COMPUTE_REGISTERS, action="increase")

  @pl.when(wg == c.num_compute_warpgroups)
  def _():
    plgpu.set_max_registers(fwd.MEMORY_REGISTERS, action="decrease")


# ---- dk, dv ------------------------------------------------------------------------------------


def _dkv_entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, config):
  """Allocate SMEM and barriers for all warpgroups of the block, then run `_dkv_kernel`."""
  c = config
  wgs, slots = c.num_compute_warpgroups, c.max_concurrent_steps
  held = plgpu.SMEM((wgs, c.block_kv, c.head_dim), c.dtype, transforms=fwd.SWIZZLED)
  ring = plgpu.SMEM((slots, c.block_q, c.head_dim), c.dtype, transforms=fwd.SWIZZLED)
  ring_rows = plgpu.SMEM((slots, c.block_q), jnp.float32)
  smem = [held, held, ring, ring, ring_rows, ring_rows]  # K, V; Q, dO, lse, delta rings
  barriers = (
      plgpu.Barrier(num_arrivals=2, num_barriers=wgs),  # K and V loaded
      plgpu.Barrier(num_arrivals=4, num_barriers=slots),  # Q, dO, lse, delta slot loaded
      plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),  # slot read by every warpgroup
  )
  pl.run_scoped(
      lambda smem_refs, barrier_refs: _dkv_kernel(
          q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *smem_refs,
          *barrier_refs, config=c),
      smem, barriers, collective_axes="wg")


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem,
                q_ring, do_ring, lse_ring, delta_ring, kv_loaded, rows_loaded, rows_free, *,
                config):
  c = config
  batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  block_first_key = lax.axis_index("kv_tiles") * c.num_compute_warpgroups * c.block_kv
  # Ring step s covers query head kv_head * groups + s // per_head and query block
  # block_lo + s % per_head: the blocks some key of this thread block can see, for every head.
  block_lo = _first_q_block(c, block_first_key)
  per_head = c.q_blocks - block_lo
  _set_registers(c, wg)

  @pl.when(wg < c.num_compute_warpgroups)
  def _compute():
    first_key = block_first_key + wg * c.block_kv
    keys = (batch, pl.ds(first_key, c.block_kv), kv_head)
    _dkv_warpgroup(c, k_ref.at[keys], v_ref.at[keys], dk_ref.at[keys], dv_ref.at[keys],
                   k_smem.at[wg], v_smem.at[wg], kv_loaded.at[wg], q_ring, do_ring, lse_ring,
                   delta_ring, rows_loaded, rows_free, first_key, block_lo, per_head)

  @pl.when(wg == c.num_compute_warpgroups)
  def _memory():
    def load(step, slot):
      head = kv_head * c.groups + lax.div(step, per_head)
      rows = pl.ds((block_lo + lax.rem(step, per_head)) * c.block_q, c.block_q)
      for gmem, ring in ((q_ref.at[batch, rows, head], q_ring), (do_ref.at[batch, rows, head],
                                                                 do_ring),
                         (lse_ref.at[batch, head, rows], lse_ring),
                         (delta_ref.at[batch, head, rows], delta_ring)):
        plgpu.copy_gmem_to_smem(gmem, ring.at[slot], rows_loaded.at[slot])

    _produce(c, c.groups * per_head, load, rows_free)


def _first_q_block(c, first_key):
  """The first query block that can see key `first_key` (traced); q_blocks if none can: the key
  is padding, or causal and past every query."""
  lo = jnp.minimum(lax.div(first_key, c.block_q), c.q_blocks) if c.causal else 0
  return jnp.where(first_key < c.kv_len, lo, c.q_blocks)


def _dkv_warpgroup(c, k_gmem, v_gmem, dk_gmem, dv_gmem, k_smem, v_smem, kv_loaded, q_ring,
                   do_ring, lse_ring, delta_ring, rows_loaded, rows_free, first_key, block_lo,
                   per_head):
  """dK and dV of keys [first_key, first_key + block_kv) of one kv head: the sum over the query
  heads of the group and the query blocks in the ring, then dk and dv to global memory."""
  plgpu.copy_gmem_to_smem(k_gmem, k_smem, kv_loaded)
  plgpu.copy_gmem_to_smem(v_gmem, v_smem, kv_loaded)
  plgpu.barrier_wait(kv_loaded)
  # Query blocks [lo, unmasked_lo) need a mask, [unmasked_lo, q_blocks) do not: with keys past
  # kv_len all of them do; causal, those whose first row is at or after the last key do not.
  lo = _first_q_block(c, first_key)
  last_key = first_key + c.block_kv - 1
  if c.causal:
    unmasked_lo = jnp.minimum(lax.div(last_key + c.block_q - 1, c.block_q), c.q_blocks)
  else:
    unmasked_lo = lo
  unmasked_lo = jnp.where(last_key < c.kv_len, unmasked_lo, c.q_blocks)
  step = functools.partial(_dkv_step, c, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring,
                           rows_loaded, rows_free, first_key)

  def head(g, carry):
    ring_step = lambda q_block: g * per_head + q_block - block_lo

    @pl.loop(block_lo, lo)  # blocks only a later warpgroup's keys see (causal)
    def _skip(q_block):
      _pass_over(c, rows_loaded, rows_free, ring_step(q_block))

    carry = lax.fori_loop(lo, unmasked_lo,
                          functools.partial(step, ring_step, masked=True), carry)
    return lax.fori_loop(unmasked_lo, c.q_blocks,
                         functools.partial(step, ring_step, masked=False), carry)

  zeros = layout_cast(c, jnp.zeros((c.block_kv, c.head_dim), jnp.float32), plgpu.Layout.WGMMA)
  dk, dv = lax.fori_loop(0, c.groups, head, (zeros, zeros))
  # dK is scaled once here rather than dS^T at every step; K and V are no longer read.
  _write(c, ((dk * c.scale, k_smem), (dv, v_smem)), (dk_gmem, dv_gmem))


def _dkv_step(c, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring, rows_loaded, rows_free,
              first_key, ring_step, q_block, carry, *, masked):
  """One query block of one head: carry (dK, dV) [block_kv, head_dim] -> updated."""
  dk, dv = carry
  slot = ring_slot(c, ring_step(q_block))
  q_smem, do_smem = q_ring.at[slot], do_ring.at[slot]
  plgpu.barrier_wait(rows_loaded.at[slot])
  per_query = plgpu.Layout.WGMMA.reduce(0)  # a vector with one value per accumulator column
  by_query = lambda x, like: lax.broadcast_in_dim(x, like.shape, [1])
  lse, delta = (layout_cast(c, ring.at[slot][...], per_query) for ring in (lse_ring,
                                                                          delta_ring))
  logits_t, dp_t = _products(c, (k_smem, q_smem), (v_smem, do_smem))  # [block_kv, block_q]
  logits_t *= c.scale_log2
  if masked:
    logits_t = _masked(c, logits_t, q_block * c.block_q, first_key, query_axis=1)
  p_t = jnp.exp2(logits_t - by_query(lse, logits_t))
  ds_t = p_t * (dp_t - by_query(delta, dp_t))
  dv, dk = _accumulate(c, (dv, p_t.astype(c.dtype), do_smem), (dk, ds_t.astype(c.dtype), q_smem))
  plgpu.barrier_arrive(rows_free.at[slot])  # the wgmmas have finished reading the slot
  return dk, dv


# ---- dq ----------------------------------------------------------------------------------------


def _dq_entry(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, config):
  """Allocate SMEM and barriers for all warpgroups of the block, then run `_dq_kernel`."""
  c = config
  wgs, slots = c.num_compute_warpgroups, c.max_concurrent_steps
  held = plgpu.SMEM((wgs, c.block_q, c.head_dim), c.dtype, transforms=fwd.SWIZZLED)
  held_rows = plgpu.SMEM((wgs, c.block_q), jnp.float32)
  ring = plgpu.SMEM((slots, c.block_kv, c.head_dim), c.dtype, transforms=fwd.SWIZZLED)
  smem = [held, held, held_rows, held_rows, ring, ring]  # Q (then dQ), dO, lse, delta; K, V
  barriers = (
      plgpu.Barrier(num_arrivals=4, num_barriers=wgs),  # Q, dO, lse, delta loaded
      plgpu.Barrier(num_arrivals=2, num_barriers=slots),  # K and V slot loaded
      plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),  # slot read by every warpgroup
  )
  pl.run_scoped(
      lambda smem_refs, barrier_refs: _dq_kernel(
          q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *smem_refs, *barrier_refs,
          config=c),
      smem, barriers, collective_axes="wg")


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem, do_smem,
               lse_smem, delta_smem, k_ring, v_ring, rows_loaded, kv_loaded, kv_free, *, config):
  c = config
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  q_tiles = c.q_blocks // c.num_compute_warpgroups
  # Last query tile first: under causal masking it has the most kv blocks.
  block_first_row = (q_tiles - 1 - lax.axis_index("q_tiles")) * c.num_compute_warpgroups * \
      c.block_q
  block_kv_steps = fwd.visible_kv_blocks(c, block_first_row + c.num_compute_warpgroups * c.block_q)
  _set_registers(c, wg)

  @pl.when(wg < c.num_compute_warpgroups)
  def _compute():
    first_row = block_first_row + wg * c.block_q
    rows = pl.ds(first_row, c.block_q)
    gmem = (q_ref.at[batch, rows, head], do_ref.at[batch, rows, head],
            lse_ref.at[batch, head, rows], delta_ref.at[batch, head, rows])
    _dq_warpgroup(c, gmem, dq_ref.at[batch, rows, head], q_smem.at[wg], do_smem.at[wg],
                  lse_smem.at[wg], delta_smem.at[wg], rows_loaded.at[wg], k_ring, v_ring,
                  kv_loaded, kv_free, first_row, block_kv_steps)

  @pl.when(wg == c.num_compute_warpgroups)
  def _memory():
    kv_head = lax.div(head, jnp.array(c.groups, head.dtype))

    def load(step, slot):
      keys = (batch, pl.ds(step * c.block_kv, c.block_kv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[keys], k_ring.at[slot], kv_loaded.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[keys], v_ring.at[slot], kv_loaded.at[slot])

    _produce(c, block_kv_steps, load, kv_free)


def _dq_warpgroup(c, gmem, dq_gmem, q_smem, do_smem, lse_smem, delta_smem, rows_loaded, k_ring,
                  v_ring, kv_loaded, kv_free, first_row, block_kv_steps):
  """dQ of rows [first_row, first_row + block_q) of one head: the sum over the kv blocks in the
  ring, then dq to global memory."""
  for source, smem in zip(gmem, (q_smem, do_smem, lse_smem, delta_smem)):
    plgpu.copy_gmem_to_smem(source, smem, rows_loaded)
  plgpu.barrier_wait(rows_loaded)
  per_row = plgpu.Layout.WGMMA.reduce(1)
  lse, delta = (layout_cast(c, smem[...], per_row) for smem in (lse_smem, delta_smem))
  # Blocks [0, unmasked_steps) are visible to every row; [unmasked_steps, kv_steps) need a mask
  # (as in the forward).
  unmasked_steps = c.kv_len // c.block_kv
  if c.causal:
    unmasked_steps = jnp.minimum(lax.div(first_row + 1, c.block_kv), unmasked_steps)
  kv_steps = fwd.visible_kv_blocks(c, first_row + c.block_q)
  step = functools.partial(_dq_step, c, q_smem, do_smem, lse, delta, k_ring, v_ring, kv_loaded,
                           kv_free, first_row)
  dq = layout_cast(c, jnp.zeros((c.block_q, c.head_dim), jnp.float32), plgpu.Layout.WGMMA)
  dq = lax.fori_loop(0, unmasked_steps, functools.partial(step, masked=False), dq)
  dq = lax.fori_loop(unmasked_steps, kv_steps, functools.partial(step, masked=True), dq)

  @pl.loop(kv_steps, block_kv_steps)  # blocks only a later warpgroup's rows see (causal)
  def _skip(kv_step):
    _pass_over(c, kv_loaded, kv_free, kv_step)

  _write(c, ((dq * c.scale, q_smem),), (dq_gmem,))  # Q is no longer read


def _dq_step(c, q_smem, do_smem, lse, delta, k_ring, v_ring, kv_loaded, kv_free, first_row,
             kv_step, dq, *, masked):
  """One kv block: dQ [block_q, head_dim] -> updated."""
  slot = ring_slot(c, kv_step)
  k_smem, v_smem = k_ring.at[slot], v_ring.at[slot]
  plgpu.barrier_wait(kv_loaded.at[slot])
  by_row = lambda x, like: lax.broadcast_in_dim(x, like.shape, [0])
  logits, dp = _products(c, (q_smem, k_smem), (do_smem, v_smem))  # [block_q, block_kv]
  logits *= c.scale_log2
  if masked:
    logits = _masked(c, logits, first_row, kv_step * c.block_kv, query_axis=0)
  p = jnp.exp2(logits - by_row(lse, logits))
  ds = p * (dp - by_row(delta, dp))
  dq, = _accumulate(c, (dq, ds.astype(c.dtype), k_smem))
  plgpu.barrier_arrive(kv_free.at[slot])  # the wgmmas have finished reading the slot
  return dq


# ---- checks ------------------------------------------------------------------------------------


def _check_residuals(query, key, out, dout, lse, block_kv, num_compute_warpgroups):
  """Raise, naming the argument, on residuals that do not fit the inputs (fwd.check_inputs
  checks query, key and value)."""
  for name, x in (("out", out), ("dout", dout)):
    if x.shape != query.shape or x.dtype != query.dtype:
      raise ValueError(f"{name} {x.shape} {x.dtype} must be like query {query.shape} "
                       f"{query.dtype}")
  batch, q_len, heads, _ = query.shape
  if lse.shape != (batch, heads, q_len) or lse.dtype != jnp.float32:
    raise ValueError(f"lse {lse.shape} {lse.dtype} must be float32 {(batch, heads, q_len)}")
  if key.shape[1] % (num_compute_warpgroups * block_kv):
    raise ValueError(f"kv length {key.shape[1]} must be a multiple of num_compute_warpgroups * "
                     f"block_kv = {num_compute_warpgroups * block_kv}: the caller pads")


def _check_smem(dtype, head_dim, block_q, block_kv, max_concurrent_steps,
                num_compute_warpgroups):
  """Raise if either kernel's held tiles, ring and float32 rows overflow an SM's shared memory
  (the lowering does not check it; the launch would fail on the GPU). Each kernel holds two
  [rows, head_dim] tiles per warpgroup and rings two more; the float32 rows (lse, delta) are
  held in dq and ringed in dk/dv."""
  itemsize = jnp.dtype(dtype).itemsize
  wgs, slots = num_compute_warpgroups, max_concurrent_steps
  needs = {
      "dq": 2 * (wgs * block_q + slots * block_kv) * head_dim * itemsize + 2 * wgs * block_q * 4,
      "dk/dv": 2 * (wgs * block_kv + slots * block_q) * head_dim * itemsize
               + 2 * slots * block_q * 4,
  }
  for kernel, used in needs.items():
    if used > fwd.SMEM_BYTES:
      raise ValueError(f"block_q={block_q}, block_kv={block_kv}, max_concurrent_steps="
                       f"{max_concurrent_steps}, num_compute_warpgroups={wgs} need {used} "
                       f"bytes of shared memory per thread block in the {kernel} kernel at "
                       f"head_dim={head_dim}, more than the {fwd.SMEM_BYTES} available")

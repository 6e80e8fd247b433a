"""Flash attention forward for Hopper GPUs in Pallas Mosaic GPU (wgmma, TMA, warp specialization).

`forward(query, key, value, *, causal, scale, kv_len, ...)` takes the layout and grouped-query
convention of flash_attention.py: query [batch, q_len, heads, head_dim], key/value
[batch, kv_pad, kv_heads, head_dim], query head `h` reads kv head `h // (heads // kv_heads)`. It
returns the output and the log-sum-exp per query row, float32 [batch, heads, q_len] in natural
log: the residuals flash_attention.py's backward kernels consume, so this forward pairs with them.

Why a second forward: the Triton-layout kernel cannot issue Hopper's asynchronous instructions
and reaches about half of cuDNN. This one is built the FlashAttention-3 way:
- a thread block covers `num_compute_warpgroups * block_q` query rows of one head; each compute
  warpgroup owns `block_q` of them, and one more warpgroup only issues TMA copies;
- that memory warpgroup streams K and V blocks into a ring of `max_concurrent_steps` SMEM slots;
  per slot, "ready" barriers (completed by the TMA) and "free" barriers (one arrival per compute
  warpgroup) order producer and consumers, so loads run ahead of the math;
- S = Q K^T and O += P V are wgmma with float32 accumulators in registers, Q, K, V read from
  swizzled SMEM; the online softmax runs in base 2 (one multiply folds scale and log2(e));
- causal: a warpgroup stops at the last kv block its rows can see, the memory warpgroup at the
  last one any row of the block can see, and only the blocks that straddle the diagonal or the
  end of the keys (`kv_len`) compute a mask; the others run unmasked;
- ping-pong (`ping_pong`, two compute warpgroups): the warpgroups take turns on the tensor
  cores, one's softmax running while the other's wgmmas do (see `_kv_step`);
- query tiles run last-to-first, so under causal masking the longest thread blocks start first.
Not done: overlapping one step's softmax with the next step's QK^T inside a warpgroup (FA3's
intra-warpgroup pipelining), and a Mosaic GPU backward.

Padding: lengths are multiples of the blocks (the caller pads). Keys at `kv_len` and beyond are
masked; kv blocks wholly past `kv_len` are never loaded. Every query row sees key 0 (causal
attention is aligned at position 0, as in jax.nn), so no row is empty and every log-sum-exp is
finite: the +inf that flash_attention.py writes for rows that see nothing never arises here.

Interpret mode (CPU) runs the same code with two differences, both forced by what Mosaic GPU's
interpreter simulates. Its wgmma takes neither a transposed SMEM operand (K^T) nor a register
operand (P, which stays in registers on the GPU), so there the two matmuls load their SMEM
operands and multiply with `lax.dot_general` (the interpreter's wgmma is such a product too); and
it has no rule for register-layout casts, which only tell the GPU lowering how to lay out
constants, so there they are skipped. The TMA copies, the barriers, the ring, the masks and the
softmax are the GPU's code.

Precision: bfloat16 or float16 inputs, float32 accumulators and softmax statistics. On the GPU
exp2 uses the fast approximate instruction (`approx_math`).

Shared with flash_attention_mgpu_backward.py, hence public: `matmul`, `layout_cast`,
`ring_slot`, `visible_kv_blocks` (each reads the fields its config shares with the backward's),
`check_inputs`, `interpret_params`, SWIZZLED, the register budgets and SMEM_BYTES. They live here,
not in tiling.py, because they need Mosaic GPU (`jax.experimental.pallas.mosaic_gpu`), which
tiling.py, imported on every platform, does not load.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from llm_research.kernels import tiling

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
# wgmma's M is 64 rows per warpgroup and its N, K steps are multiples of 64 for 16-bit inputs
# with 128-byte swizzling; block_q and block_kv are multiples of this.
BLOCK_MULTIPLE = 64
# SMEM transforms of the [rows, head_dim] tiles wgmma reads, here and in the backward: 128-byte
# swizzled (8, 64) tiles, read without bank conflicts, for 16-bit rows of 64 elements (head_dim,
# block_q and block_kv are multiples of 64).
SWIZZLED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
# A Hopper SM has 64K 32-bit registers, so the per-thread budgets of the warpgroups (128 threads
# each) sum to at most 65536 / 128 = 512. Two compute warpgroups and one memory warpgroup:
# 232 + 232 + 40 = 504; the memory warpgroup gives up what it does not need so that the
# accumulators fit without spilling.
COMPUTE_REGISTERS, MEMORY_REGISTERS = 232, 40
# Shared memory a Hopper thread block may use (227 KiB), less the 2 KiB Mosaic GPU keeps for its
# own reductions (CompilerParams.reduction_scratch_bytes) and 1 KiB for barriers and alignment.
SMEM_BYTES = 227 * 1024 - 2048 - 1024
HOPPER_COMPUTE_CAPABILITY = "9.0"
# Default tiles, FlashAttention-3-like for head_dim <= 128 and untuned here: 2 x 64 query rows
# per thread block, 128-key blocks, 2 ring slots.
DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV, DEFAULT_CONCURRENT_STEPS = 64, 128, 2
DEFAULT_COMPUTE_WARPGROUPS = 2


def hopper_available() -> bool:
  """Whether the default device is a Hopper GPU: wgmma and the warpgroup register split exist on
  sm_90a only (Blackwell has other tensor-core instructions), so other GPUs need another path."""
  device = jax.devices()[0]
  return (device.platform == "gpu"
          and getattr(device, "compute_capability", None) == HOPPER_COMPUTE_CAPABILITY)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static the kernel needs."""

  block_q: int  # query rows per compute warpgroup
  block_kv: int
  max_concurrent_steps: int  # SMEM ring slots for K and for V
  num_compute_warpgroups: int
  kv_len: int  # keys at kv_len and beyond are padding
  kv_blocks: int  # kv blocks holding at least one real key
  causal: bool
  scale: float
  groups: int  # query heads per kv head
  q_tiles: int  # thread blocks along the query axis
  head_dim: int
  dtype: jnp.dtype
  ping_pong: bool  # the two compute warpgroups take turns on the tensor cores
  interpret: bool  # Mosaic GPU interpret mode (module docstring: what differs)

  @property
  def rows_per_block(self):
    return self.num_compute_warpgroups * self.block_q


def forward(query, key, value, *, causal=False, scale=None, kv_len=None,
            block_q=DEFAULT_BLOCK_Q, block_kv=DEFAULT_BLOCK_KV,
            max_concurrent_steps=DEFAULT_CONCURRENT_STEPS,
            num_compute_warpgroups=DEFAULT_COMPUTE_WARPGROUPS, ping_pong=True, interpret=False):
  """Flash attention forward on Hopper; returns (out, lse).

  Args:
    query: [batch, q_len, heads, head_dim], bfloat16 or float16; head_dim 64 or 128.
    key, value: [batch, kv_pad, kv_heads, head_dim], same dtype; kv_heads divides heads.
    causal: query i sees keys j <= i.
    scale: logit scale, default head_dim ** -0.5.
    kv_len: keys at kv_len and beyond are padding and masked; default kv_pad.
    block_q: query rows per compute warpgroup, a multiple of 64.
    block_kv: keys per step, a multiple of 64 dividing kv_pad.
    max_concurrent_steps: SMEM ring slots for K and V (>= 2: a load overlaps the math).
    num_compute_warpgroups: 1 or 2 compute warpgroups per thread block; q_len must be a multiple
      of num_compute_warpgroups * block_q.
    ping_pong: with two compute warpgroups, alternate their matmuls and softmaxes (no effect
      with one).
    interpret: run in Mosaic GPU interpret mode (CPU), or pass InterpretGPUParams.

  Returns:
    out [batch, q_len, heads, head_dim] in query's dtype, and lse, float32 [batch, heads, q_len]:
    the natural-log log-sum-exp of each row's scaled logits over the keys it sees.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_pad, kv_heads = key.shape[1], key.shape[2]
  kv_len = kv_pad if kv_len is None else kv_len
  check_inputs(query, key, value, kv_len, block_q, block_kv, max_concurrent_steps,
               num_compute_warpgroups)
  _check_smem(query.dtype, head_dim, block_q, block_kv, max_concurrent_steps,
              num_compute_warpgroups)
  interpret = interpret_params(interpret)
  config = _Config(
      block_q=block_q, block_kv=block_kv, max_concurrent_steps=max_concurrent_steps,
      num_compute_warpgroups=num_compute_warpgroups, kv_len=kv_len,
      kv_blocks=pl.cdiv(kv_len, block_kv), causal=causal,
      scale=head_dim**-0.5 if scale is None else float(scale), groups=heads // kv_heads,
      q_tiles=q_len // (num_compute_warpgroups * block_q), head_dim=head_dim,
      dtype=query.dtype, ping_pong=ping_pong and num_compute_warpgroups == 2,
      interpret=bool(interpret))
  return plgpu.kernel(
      functools.partial(_entry, config=config),
      out_type=(jax.ShapeDtypeStruct(query.shape, query.dtype),
                jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
      grid=(heads, config.q_tiles, batch),
      grid_names=("heads", "q_tiles", "batch"),
      num_threads=num_compute_warpgroups + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=interpret or None,
  )(query, key, value)


def interpret_params(interpret):
  """`interpret` as plgpu.kernel takes it: True becomes the default InterpretGPUParams (from a
  private module, JAX exports no name for it yet, imported only when interpreting); False, None
  or an InterpretGPUParams stay as they are."""
  if interpret is not True:
    return interpret
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def takes_with_default_tiles(dtype, head_dim, q_len, kv_pad) -> bool:
  """Whether `forward` with its default tiles takes inputs of this dtype, head_dim and (padded)
  lengths; the device is the caller's business (`hopper_available`)."""
  return (jnp.dtype(dtype) in SUPPORTED_DTYPES and head_dim in SUPPORTED_HEAD_DIMS
          and q_len % (DEFAULT_COMPUTE_WARPGROUPS * DEFAULT_BLOCK_Q) == 0
          and kv_pad % DEFAULT_BLOCK_KV == 0)


def _entry(q_ref, k_ref, v_ref, out_ref, lse_ref, *, config):
  """Allocate SMEM and barriers for all warpgroups of the block, then run `_kernel`."""
  c = config
  wgs, slots = c.num_compute_warpgroups, c.max_concurrent_steps
  smem = [
      plgpu.SMEM((wgs, c.block_q, c.head_dim), c.dtype, transforms=SWIZZLED),  # Q, then out
      plgpu.SMEM((slots, c.block_kv, c.head_dim), c.dtype, transforms=SWIZZLED),  # K ring
      plgpu.SMEM((slots, c.block_kv, c.head_dim), c.dtype, transforms=SWIZZLED),  # V ring
      plgpu.SMEM((wgs, c.block_q), jnp.float32),  # lse
  ]
  barriers = (
      plgpu.Barrier(num_barriers=wgs),  # Q loaded
      plgpu.Barrier(num_barriers=slots),  # K slot loaded
      plgpu.Barrier(num_barriers=slots),  # V slot loaded
      plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),  # K slot read by every warpgroup
      plgpu.Barrier(num_arrivals=wgs, num_barriers=slots),  # V slot read by every warpgroup
      plgpu.Barrier(num_arrivals=wgs) if c.ping_pong else None,  # rendezvous (`_kv_step`)
  )
  pl.run_scoped(
      lambda smem_refs, barrier_refs: _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, *smem_refs,
                                              *barrier_refs, config=c),
      smem, barriers, collective_axes="wg")


def _kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem, k_smem, v_smem, lse_smem,
            q_loaded, k_loaded, v_loaded, k_free, v_free, rendezvous, *, config):
  c = config
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  # Last query tile first: under causal masking it has the most kv blocks (module docstring).
  q_tile = c.q_tiles - 1 - lax.axis_index("q_tiles")
  block_first_row = q_tile * c.rows_per_block
  # kv blocks the memory warpgroup loads: those some row of this thread block can see.
  block_kv_steps = visible_kv_blocks(c, block_first_row + c.rows_per_block)

  @pl.when(wg < c.num_compute_warpgroups)
  def _compute():
    if c.num_compute_warpgroups > 1:
      plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
    first_row = block_first_row + wg * c.block_q
    _compute_warpgroup(
        c, q_ref.at[batch, pl.ds(first_row, c.block_q), head],
        out_ref.at[batch, pl.ds(first_row, c.block_q), head],
        lse_ref.at[batch, head, pl.ds(first_row, c.block_q)], q_smem.at[wg], lse_smem.at[wg],
        q_loaded.at[wg], k_smem, v_smem, k_loaded, v_loaded, k_free, v_free,
        rendezvous, wg, first_row, block_kv_steps)

  @pl.when(wg == c.num_compute_warpgroups)
  def _memory():
    if c.num_compute_warpgroups > 1:
      plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
    kv_head = lax.div(head, jnp.array(c.groups, head.dtype))

    # Steps past the last load only wait for the last blocks to be read: every thread must follow
    # every phase of a barrier it waits on (the interpreter checks it).
    @pl.loop(0, block_kv_steps + c.max_concurrent_steps)
    def _load(step):
      slot = ring_slot(c, step)
      keys = (batch, pl.ds(step * c.block_kv, c.block_kv), kv_head)
      slot_used = step >= c.max_concurrent_steps  # by step - max_concurrent_steps
      load = step < block_kv_steps

      for gmem, smem, free, loaded in ((k_ref, k_smem, k_free, k_loaded),
                                       (v_ref, v_smem, v_free, v_loaded)):  # K, then V
        @pl.when(slot_used)
        def _(free=free):
          plgpu.barrier_wait(free.at[slot])

        @pl.when(load)
        def _(gmem=gmem, smem=smem, loaded=loaded):
          plgpu.copy_gmem_to_smem(gmem.at[keys], smem.at[slot], loaded.at[slot])


def visible_kv_blocks(config, rows_end):
  """Number of kv blocks that rows [.., rows_end) can see (traced)."""
  if not config.causal:
    return config.kv_blocks
  return jnp.minimum(lax.div(rows_end + config.block_kv - 1, config.block_kv), config.kv_blocks)


def _compute_warpgroup(c, q_gmem, out_gmem, lse_gmem, q_smem, lse_smem, q_loaded,
                       k_smem, v_smem, k_loaded, v_loaded, k_free, v_free, rendezvous, wg,
                       first_row, block_kv_steps):
  """Attention for rows [first_row, first_row + block_q) of one head: the online softmax over
  the kv blocks in the SMEM ring, then out and lse to global memory."""
  plgpu.copy_gmem_to_smem(q_gmem, q_smem, q_loaded)
  plgpu.barrier_wait(q_loaded)
  rows = plgpu.Layout.WGMMA.reduce(1)  # a vector with one value per accumulator row
  carry = (layout_cast(c, jnp.zeros((c.block_q, c.head_dim), jnp.float32),
                       plgpu.Layout.WGMMA),  # unnormalised output
           # Running max of the logits in base 2; -inf is safe: block 0 gives every row a key.
           layout_cast(c, jnp.full((c.block_q,), -jnp.inf, jnp.float32), rows),
           layout_cast(c, jnp.zeros((c.block_q,), jnp.float32), rows))  # sum of exp2

  # Blocks [0, unmasked_steps) are visible to every row; [unmasked_steps, kv_steps) need a mask.
  unmasked_steps = c.kv_len // c.block_kv
  if c.causal:
    unmasked_steps = jnp.minimum(lax.div(first_row + 1, c.block_kv), unmasked_steps)
  kv_steps = visible_kv_blocks(c, first_row + c.block_q)
  # Ping-pong: warpgroup 1 starts one rendezvous ahead of warpgroup 0 (`_kv_step`), which
  # makes up for it at the end; both then meet the barrier equally often.
  if rendezvous is not None:
    pl.when(wg == 1)(lambda: _meet(rendezvous))
  step = functools.partial(_kv_step, c, q_smem, k_smem, v_smem, k_loaded, v_loaded,
                           k_free, v_free, rendezvous, first_row)
  carry = lax.fori_loop(0, unmasked_steps, functools.partial(step, masked=False), carry)
  carry = lax.fori_loop(unmasked_steps, kv_steps, functools.partial(step, masked=True), carry)

  # The memory warpgroup may load blocks past this warpgroup's last one (the other warpgroup's
  # rows see them). Consume their loads and release their slots all the same: the free barriers
  # count an arrival from every warpgroup, and each thread must follow every phase of a barrier
  # to read the next one right.
  @pl.loop(kv_steps, block_kv_steps)
  def _skip(kv_step):
    slot = ring_slot(c, kv_step)
    plgpu.barrier_wait(k_loaded.at[slot])
    plgpu.barrier_arrive(k_free.at[slot])
    _meet(rendezvous)  # the two of a step (`_kv_step`)
    plgpu.barrier_wait(v_loaded.at[slot])
    plgpu.barrier_arrive(v_free.at[slot])
    _meet(rendezvous)

  if rendezvous is not None:
    pl.when(wg == 0)(lambda: _meet(rendezvous))
  acc, m, l = carry
  q_smem[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(c.dtype)
  lse_smem[...] = m * math.log(2.0) + jnp.log(l)  # base 2 back to natural log
  plgpu.commit_smem()  # the register stores above are visible to the TMA engine
  plgpu.copy_smem_to_gmem(q_smem, out_gmem)
  plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
  plgpu.wait_smem_to_gmem(0)  # SMEM must outlive the copies


def _meet(rendezvous):
  """Both compute warpgroups arrive at the ping-pong barrier, then wait for each other; no-op
  without ping-pong (rendezvous None)."""
  if rendezvous is not None:
    plgpu.barrier_arrive(rendezvous)
    plgpu.barrier_wait(rendezvous)


def ring_slot(c, kv_step):
  """The SMEM ring slot of step `kv_step` (traced): the steps take the max_concurrent_steps slots
  in turn."""
  return lax.rem(kv_step, jnp.array(c.max_concurrent_steps, kv_step.dtype))


def _kv_step(c, q_smem, k_smem, v_smem, k_loaded, v_loaded, k_free, v_free, rendezvous,
             first_row, kv_step, carry, *, masked):
  """One online-softmax step over kv block `kv_step`: carry (acc, m, l) -> updated.

  Ping-pong: each warpgroup meets the other twice a step, once after issuing its QK^T wgmma and
  once after its softmax. Warpgroup 1 met once before its first step, so each meeting pairs one
  warpgroup's "QK^T issued" with the other's "softmax done": a softmax starts only once the
  other warpgroup's softmax is done, and a PV wgmma only once the other has issued its QK^T.
  The two softmaxes alternate, each overlapping the other warpgroup's matmuls.
  """
  acc, m, l = carry
  slot = ring_slot(c, kv_step)
  plgpu.barrier_wait(k_loaded.at[slot])
  logits = matmul(c, q_smem, k_smem.at[slot], transpose_b=True,
                  while_running=lambda: _meet(rendezvous))  # [block_q, block_kv]
  plgpu.barrier_arrive(k_free.at[slot])  # the wgmma has finished reading K
  logits *= c.scale * tiling.LOG2_E  # base 2: exp2(x * log2 e) == exp(x)
  if masked:
    shape = (c.block_q, c.block_kv)
    iota = lambda axis: layout_cast(c, lax.broadcasted_iota(jnp.int32, shape, axis),
                                    plgpu.Layout.WGMMA)
    query_index = first_row + iota(0)
    key_index = kv_step * c.block_kv + iota(1)
    visible = key_index < c.kv_len
    if c.causal:
      visible &= query_index >= key_index
    logits = jnp.where(visible, logits, -jnp.inf)
  m_new = jnp.maximum(m, logits.max(axis=1))
  correction = jnp.exp2(m - m_new)
  p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, logits.shape, [0]))
  l = l * correction + p.sum(axis=1)
  if rendezvous is not None:
    plgpu.barrier_arrive(rendezvous)  # softmax done; wait for the other after V is in
  plgpu.barrier_wait(v_loaded.at[slot])
  if rendezvous is not None:
    plgpu.barrier_wait(rendezvous)
  pv = matmul(c, p.astype(c.dtype), v_smem.at[slot], transpose_b=False)  # [block_q, head_dim]
  plgpu.barrier_arrive(v_free.at[slot])
  return acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + pv, m_new, l


def layout_cast(c, x, layout):
  """x in a register layout, for values whose layout Mosaic GPU cannot infer (constants, iotas
  in a loop carry or next to an accumulator). The interpreter has no rule for layout casts and
  no layouts to mind: there x stays as it is."""
  return x if c.interpret else plgpu.layout_cast(x, layout)


def matmul(c, a, b_smem, *, transpose_b, while_running=lambda: None):
  """a @ b (b^T if transpose_b) in float32; a: SMEM ref or register array, b_smem: SMEM ref.
  `while_running()` runs after the wgmma is issued, before waiting for its result.

  On the GPU a wgmma into a fresh zeroed accumulator, not into one pre-loaded with the running
  output: the interpreter does not run `pl.run_state`, which pre-loading needs, and the running
  output absorbs the product with one multiply-add. Interpret mode: module docstring.
  """
  if c.interpret:
    while_running()
    a = a if isinstance(a, jax.Array) else a[...]
    b = b_smem[...]
    # These ordinary SMEM reads stand in for the wgmma's, which go through the async proxy like
    # the TMA writes that later refill the slot: a proxy fence orders them as the GPU's would be
    # (jax 0.11's interpreter tracks the two proxies apart).
    plgpu.commit_smem()
    contract_b = 1 if transpose_b else 0
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                           preferred_element_type=jnp.float32)
  b = plgpu.transpose_ref(b_smem, (1, 0)) if transpose_b else b_smem
  shape = (a.shape[0], b.shape[1])

  def issue_and_read(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    while_running()
    return acc_ref[...]  # waits for the wgmma
  return pl.run_scoped(issue_and_read, plgpu.ACC(shape, jnp.float32))


def check_inputs(query, key, value, kv_len, block_q, block_kv, max_concurrent_steps,
                 num_compute_warpgroups):
  """Raise, naming the argument, on anything the kernel does not handle."""
  if query.ndim != 4 or key.ndim != 4 or key.shape != value.shape:
    raise ValueError(f"query {query.shape}, key {key.shape}, value {value.shape} must be "
                     "[batch, length, heads, head_dim], key and value alike")
  if not query.dtype == key.dtype == value.dtype or query.dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"dtypes {query.dtype}, {key.dtype}, {value.dtype} must be one of "
                     f"{[d.name for d in SUPPORTED_DTYPES]}, all the same")
  batch, q_len, heads, head_dim = query.shape
  if key.shape[0] != batch or key.shape[3] != head_dim or heads % key.shape[2]:
    raise ValueError(f"key {key.shape} must match query {query.shape} in batch and head_dim, "
                     "and its heads must divide the query's")
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim={head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
  if block_q % BLOCK_MULTIPLE or block_kv % BLOCK_MULTIPLE:
    raise ValueError(f"block_q={block_q}, block_kv={block_kv} must be multiples of "
                     f"{BLOCK_MULTIPLE}")
  if num_compute_warpgroups not in (1, 2):
    raise ValueError(f"num_compute_warpgroups={num_compute_warpgroups} must be 1 or 2")
  if q_len % (num_compute_warpgroups * block_q) or key.shape[1] % block_kv:
    raise ValueError(f"q_len={q_len} must be a multiple of num_compute_warpgroups * block_q = "
                     f"{num_compute_warpgroups * block_q} and kv length {key.shape[1]} one of "
                     f"block_kv={block_kv}: the caller pads")
  if not 0 < kv_len <= key.shape[1]:
    raise ValueError(f"kv_len={kv_len} must be in [1, {key.shape[1]}]")
  if max_concurrent_steps < 2:
    raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be >= 2")


def _check_smem(dtype, head_dim, block_q, block_kv, max_concurrent_steps,
                num_compute_warpgroups):
  """Raise if Q, the K and V rings and lse overflow an SM's shared memory (the lowering does not
  check it; the launch would fail on the GPU)."""
  elements = (num_compute_warpgroups * block_q + 2 * max_concurrent_steps * block_kv) * head_dim
  used = elements * jnp.dtype(dtype).itemsize + num_compute_warpgroups * block_q * 4
  if used > SMEM_BYTES:
    raise ValueError(f"block_q={block_q}, block_kv={block_kv}, max_concurrent_steps="
                     f"{max_concurrent_steps} need {used} bytes of shared memory per thread "
                     f"block at head_dim={head_dim}, more than the {SMEM_BYTES} available")

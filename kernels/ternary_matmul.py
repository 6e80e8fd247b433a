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

Four implementations, one signature `(x, x_scale, packed, w_scale) -> float32 [M, N]`:
`ternary_matmul_pallas` (the Pallas kernels below; weights stay packed in memory and are
unpacked one [block_k, block_n] tile at a time inside the kernel: for decode rows),
`ternary_matmul_unpacked` (for prefill rows: W unpacked once to a dense int8 or bf16 [K, N]
matrix, then one XLA dot on the tensor cores / MXU; the kernel would unpack every weight once
per block of rows), `ternary_matmul_reference` (pure jnp, int32, the ground truth) and the
dispatch `ternary_matmul`: on GPU/TPU Pallas up to UNPACKED_PREFILL's rows and the unpacked
dot above; on CPU the reference, because Pallas only interprets there (tests call
`impl="interpret"`). All are exact: integer sums (int32, or float32 sums of integers below
2**24 in the bf16 dot, whose K is bounded for that) before the two scales.

Two kernel layouts, both exact (int32 accumulation; padding is zero bytes = zero weights):
  "gpu" (Triton): grid (M / bm, N / bn, split_k); each program walks its share of the K
    blocks in a loop and keeps the [bm, bn] int32 accumulator in registers. Triton's grid is
    parallel, so K cannot be a sequential grid axis there: with split_k > 1 each share writes
    its own int32 partial sum and XLA adds them (exact), which gives a decode grid more
    programs when N / bn is small. Blocks are powers of two >= 16 (Triton's load shapes and
    int8 dot tiles), so decode rows (M = 1 or 8) are padded to 16.
  "tpu" (Mosaic): grid (M / bm, N / bn, K / bk), K last and sequential ("arbitrary"); the int32
    output block stays in VMEM across K and accumulates, so VMEM holds one K block of x and W
    whatever K is. Blocks: bm a multiple of 32 (int8 sublane tile), bn and bk of 128.
The kernel pads M, N and K / 4 up to block multiples (K / 4 to bk * split_k on GPU) and slices
the result. Padding the activations is cheap; padding the packed weights copies them on every
call, so it happens only when needed: on TPU when N or K / 4 is not a multiple of 128 (TPU
blocks shrink to divisors), on GPU when they are not multiples of the (power of two) blocks:
with the default table, when N is not a multiple of 128 or K of 1024.

Verified without an accelerator only: interpret mode (both layouts, GPU split_k too) and
both unpacked dots equal the reference bit for bit (the dots run on CPU XLA there);
`jax.export` lowers both layouts (Triton IR for CUDA, Mosaic for TPU) at decode and prefill
sizes; the Triton launch takes the table's warps, stages and split_k; `auto` lowers to the
kernel or the dense dot by backend and rows (tests/test_bitnet.py). Once, by hand (not a
test): that Triton IR for the GPU table's tiles, M = 1..2048, compiled to sm_90 code with the
standalone triton 3.9 wheel (int8 mma.sync for decode, wgmma for prefill, no register spills);
XLA's own Triton may differ. Measured once on an H200 (jax 0.11.2, before the unpacked path
and split_k existed), W 8192 x 28672: 0.21 ms at 1 row (1.08x a bf16 dot, 276 GB/s), 1.36x
at 16 rows, 0.12x at 4096 rows. Not checked: Mosaic's compilation; the unpacked dots on a GPU
or TPU (XLA's GEMMs there: the exactness of the bf16 one's float32 accumulation on tensor
cores, and speed); UNPACKED_PREFILL's thresholds; the block table's launch parameters, which
experiments/benchmarks/ternary_matmul.py --sweep times. From the sm_90 code (an estimate, not
a measurement): the decode loop spends ~3 integer instructions per weight unpacking, so at
M = 1 the GPU kernel is likely bound by the INT pipes, not by the 8x fewer weight bytes;
unpacking 4 weights per 32-bit op would need a GPU-specific weight order.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llm_research.kernels import tiling

IMPLS = ("auto", "pallas", "interpret", "reference", "unpacked_int8", "unpacked_bf16")


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


def unpack_plane(packed: jax.Array, plane) -> jax.Array:
  """Bit plane `plane` (0..3, or an int array that broadcasts against `packed`) of packed bytes
  as int8 values in {-1, 0, +1}.

  The bytes may be uint8 or int8 with the same bits: the shift drops the bits above the plane.
  """
  shifted = packed.astype(jnp.int32) << (30 - 2 * plane)  # the plane's 2 bits on top
  return (shifted >> 30).astype(jnp.int8)  # arithmetic shift sign-extends 0b11 to -1


def unpack_weights(packed: jax.Array, dtype=jnp.int8) -> jax.Array:
  """uint8 [..., K / 4, N] -> the ternary weights [..., K, N] as `dtype`, in one elementwise
  pass: the four planes of `packed` side by side are [..., 4, Kq, N], which is [..., K, N] in
  the quarter-plane layout (plane i holds rows i * Kq ... i * Kq + Kq - 1), a free reshape."""
  planes = jnp.arange(4, dtype=jnp.int32)[:, None, None]  # [4, 1, 1]
  values = unpack_plane(packed[..., None, :, :], planes).astype(dtype)  # [..., 4, Kq, N]
  return values.reshape(*packed.shape[:-2], 4 * packed.shape[-2], packed.shape[-1])


def int8_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """int8 a [M, K] @ int8 b [K, N] -> int32 [M, N], exact. Every int8 dot of the project goes
  through here (in Triton and Mosaic kernel code K is a multiple of 16, and it is a plain dot).

  The guard: on an NVIDIA H200 (jax 0.11.2, CUDA 13), XLA's int8 x int8 -> int32 dot returned
  exactly twice the right answer when K was not a multiple of 4 (K = 9, 50 doubled; K = 36,
  200, 4096 exact; eager and jitted; int32 operands exact). No upstream report was found
  (jax-ml/jax and openxla/xla issues searched for wrong int8 dot results); XLA pads int8 GEMM
  operands to multiples of 4 for cuBLAS itself, the first place we would look. Zero-padding K
  to a multiple of 4 is exact (zeros add nothing), and a no-op where K already is one.
  Unexplained by K alone: the interpret-mode kernel was also seen doubling at M=3, K=36, N=17,
  whose tile dots contract over 8; not re-checked on a GPU since. tests/test_bitnet.py keeps a
  minimal reproduction, run on every backend.
  """
  k_pad = tiling.round_up(a.shape[1], 4)
  a, b = tiling.pad_axis(a, 1, k_pad), tiling.pad_axis(b, 0, k_pad)
  return jnp.dot(a, b, preferred_element_type=jnp.int32)


def _rescale(acc, x_scale, w_scale):
  return acc.astype(jnp.float32) * x_scale.astype(jnp.float32)[:, None] \
      * jnp.asarray(w_scale, jnp.float32)


def ternary_matmul_reference(x, x_scale, packed, w_scale):
  """x int8 [M, K], x_scale [M], packed uint8 [K // 4, N], w_scale [] -> float32 [M, N]."""
  _check_inputs(x, x_scale, packed, w_scale)
  quarters = x.reshape(x.shape[0], 4, -1)  # [M, 4, Kq]
  acc = sum(int8_matmul(quarters[:, i], unpack_plane(packed, i)) for i in range(4))  # [M, N]
  return _rescale(acc, x_scale, w_scale)


# bfloat16 holds every int8 activation and ternary weight exactly, and so every product; a
# float32 sum of integers is exact while each partial sum stays within 2**24, and a sum over K
# terms is at most K * 128 in magnitude (x may be -128).
BF16_EXACT_MAX_K = 2**24 // 128
UNPACKED_DOT_DTYPES = {"unpacked_int8": "int8", "unpacked_bf16": "bfloat16"}


@functools.partial(jax.jit, static_argnames="dot_dtype")
def ternary_matmul_unpacked(x, x_scale, packed, w_scale, *, dot_dtype: str = "int8"):
  """The prefill path: W unpacked once to a dense [K, N] matrix, then one XLA dot (on a GPU,
  the tensor cores at full rate); same signature and result as `ternary_matmul_reference`, bit
  for bit.

  dot_dtype "int8": int8 x int8 -> int32 through `int8_matmul`, exact for any K. "bfloat16":
  bf16 x bf16 -> float32, exact for K <= BF16_EXACT_MAX_K (checked), for backends whose bf16
  GEMM is faster than their int8 one. Costs a [K, N] buffer (1 or 2 bytes a weight) per call.
  """
  _check_inputs(x, x_scale, packed, w_scale)
  if dot_dtype not in UNPACKED_DOT_DTYPES.values():
    raise ValueError(f"ternary_matmul: dot_dtype={dot_dtype!r} is not one of "
                     f"{tuple(UNPACKED_DOT_DTYPES.values())}")
  if dot_dtype == "bfloat16" and x.shape[1] > BF16_EXACT_MAX_K:
    raise ValueError(f"ternary_matmul: a bfloat16 dot with float32 sums is exact only for "
                     f"K <= {BF16_EXACT_MAX_K}, got K={x.shape[1]}; use 'unpacked_int8'")
  # The barrier asks XLA to materialise W: fused into the GEMM's operand loads instead, the
  # unpacking would be redone for every tile of output rows, the cost this path avoids. XLA:CPU
  # drops it before fusion (and unpacks straight to float32, still one pass); what XLA:GPU
  # does with it is not checked.
  weights = jax.lax.optimization_barrier(unpack_weights(packed, dot_dtype))  # [K, N]
  if dot_dtype == "int8":
    acc = int8_matmul(x, weights)
  else:
    acc = jnp.dot(x.astype(jnp.bfloat16), weights, preferred_element_type=jnp.float32)
  return _rescale(acc, x_scale, w_scale)


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
  """Tile sizes: rows of x (bm), columns of W (bn), packed rows of W (bk = K / 4 rows); and,
  for the Triton (GPU) kernel only, warps per program, software-pipelining stages and split_k:
  the K loop of each output tile split over that many programs, each writing an int32 partial
  sum that one XLA reduction adds (exact), for more programs where N / bn is below the SMs.

  Not shared with flash attention's `AttentionBlockSizes`: the two kernels tile different axes
  (rows, columns and depth here; query/key lengths, forward and backward, there).
  """

  block_m: int
  block_n: int
  block_k: int
  num_warps: int = 8
  num_stages: int = 3
  split_k: int = 1

  @property
  def tiles(self) -> tuple[int, int, int]:
    return self.block_m, self.block_n, self.block_k


# backend -> regime -> MatmulBlockSizes; "decode" serves M <= its block_m rows, "prefill" the rest
# (on GPU and TPU up to UNPACKED_PREFILL's rows, or when the Pallas kernel is asked for).
# Not timed on hardware (none was available); `experiments/benchmarks/ternary_matmul.py --sweep`
# times GPU decode alternatives. GPU: a decode grid has 128 programs at N = 8192 (an H100 has
# 132 SMs), one per SM. 8 warps: ptxas for sm_90 spilled registers in the prefill tile with 4,
# and each decode thread unpacked twice the bytes; with 8 neither spills (173 and 91 registers).
# TPU: one K step of W is 256 KiB of VMEM (double-buffered, plus ~1 MiB of int32 unpacking
# temporaries), well inside the default scoped VMEM limit.
# CPU (interpret mode): big tiles, since interpret cost grows with the number of tile steps.
BLOCK_SIZES = {
    "gpu": {"decode": MatmulBlockSizes(16, 64, 256), "prefill": MatmulBlockSizes(64, 128, 64)},
    "tpu": {"decode": MatmulBlockSizes(32, 512, 512), "prefill": MatmulBlockSizes(256, 512, 512)},
    "cpu": {"decode": MatmulBlockSizes(16, 256, 512), "prefill": MatmulBlockSizes(128, 256, 512)},
}
TARGETS = ("gpu", "tpu")
_TPU_ALIGN = MatmulBlockSizes(32, 128, 128)  # int8 [32, 128] tiles; int32 output needs [8, 128]


@dataclasses.dataclass(frozen=True)
class UnpackedPrefill:
  """Above `above_rows` rows, `auto` runs `impl` (an UNPACKED_DOT_DTYPES key), not Pallas."""

  above_rows: int
  impl: str


# backend -> UnpackedPrefill. The Pallas kernel unpacks every weight once per block of output
# rows, the unpacked path once per call (one elementwise pass over W, about the time of reading
# W in bf16) and then runs the backend's dense GEMM. Not timed yet; the benchmark's --rows
# compares the paths. GPU: up to 64 rows the kernel's prefill tile unpacks W once too, and
# below ~300 rows a bf16 GEMM is bound by reading W anyway; above 64 the kernel unpacks W
# twice or more. bf16, not int8: XLA's bf16 GEMM is its best-trodden GPU path (K limit:
# BF16_EXACT_MAX_K, beyond which `auto` takes int8). TPU: its prefill tile has 256 rows, and
# the MXU runs int8 natively, at least as fast as bf16 (v5e and later).
# CPU has no entry: `auto` is the reference there, whose four plane dots are one dense dot's
# work without the unpacked copy of W.
UNPACKED_PREFILL = {"gpu": UnpackedPrefill(64, "unpacked_bf16"),
                    "tpu": UnpackedPrefill(512, "unpacked_int8")}


def default_block_sizes(backend: str, m: int) -> MatmulBlockSizes:
  table = BLOCK_SIZES[backend]
  return table["decode"] if m <= table["decode"].block_m else table["prefill"]


def _fit_block(block: int, dim: int, target: str, align: int) -> int:
  """`block` fitted to `dim`. GPU: the smallest power of two >= 16 covering `dim`, if below
  `block`. TPU: the largest multiple of `align` up to `block` that divides `dim` rounded up to
  `align`, so TPU pads a dim to its tile alignment only, never to a whole block."""
  if target == "gpu":
    return tiling.fit_power_of_two(block, dim)
  unit = min(align, block)  # below the alignment only in interpret mode (_check_blocks)
  units = tiling.round_up(dim, unit) // unit
  return unit * next(d for d in range(min(units, block // unit), 0, -1) if units % d == 0)


def _check_blocks(blocks: MatmulBlockSizes, target: str):
  """Block rules of the backend compilers (interpret mode takes any positive blocks)."""
  if target == "gpu":
    ok = all(tiling.is_triton_block(b) for b in blocks.tiles)
    rule = f"powers of two >= {tiling.TRITON_MIN_BLOCK} (Triton)"
  else:
    ok = all(b % a == 0 for b, a in zip(blocks.tiles, _TPU_ALIGN.tiles))
    rule = f"multiples of {_TPU_ALIGN} (Mosaic int8 tiles)"
  if not ok:
    raise ValueError(f"ternary_matmul: {target} blocks must be {rule}, got {blocks}")


def _block_product(x_ref, w_ref, rows):
  """int32 [bm, bn] product of x_ref[:, :, rows] ([4, bm, bk] int8) and w_ref[rows, :]
  ([bk, bn] packed bytes), unpacking one bit plane at a time.

  Through `int8_matmul`: in interpret mode XLA compiles these dots, and interpret mode takes
  any bk; compiled, bk is a multiple of 16 (Triton) or 128 (Mosaic), and it is a plain dot."""
  w = w_ref[rows, :]  # [bk, bn]
  acc = int8_matmul(x_ref[0, :, rows], unpack_plane(w, 0))
  for i in range(1, 4):
    acc += int8_matmul(x_ref[i, :, rows], unpack_plane(w, i))
  return acc


def _gpu_kernel(x_ref, w_ref, o_ref, *, block_k: int):
  # x_ref: [4, bm, Kq] int8; w_ref: [Kq, bn] int8; o_ref: [bm, bn] int32. The refs point into
  # HBM: only the [block_k] slices below are loaded.
  def body(k, acc):
    rows = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    return acc + _block_product(x_ref, w_ref, rows)

  num_k = w_ref.shape[0] // block_k
  o_ref[...] = jax.lax.fori_loop(0, num_k, body, jnp.zeros(o_ref.shape, jnp.int32))


def _tpu_kernel(x_ref, w_ref, o_ref):
  # x_ref: [4, bm, bk] int8; w_ref: [bk, bn] int8; o_ref: [bm, bn] int32, in VMEM for all k.
  @pl.when(pl.program_id(2) == 0)
  def _zero():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.int32)

  o_ref[...] += _block_product(x_ref, w_ref, slice(None))


def _gpu_call(blocks, m_pad, n_pad, kq_pad, interpret):
  """(quarters, weights) -> int32 [M_pad, N_pad]: program (i, j, s) sums K / 4 rows
  s * kq_split ... (s + 1) * kq_split - 1 into partial sum s, and XLA adds the split_k sums."""
  from jax.experimental.pallas import triton as plgpu
  bm, bn, bk = blocks.tiles
  splits = blocks.split_k
  kq_split = kq_pad // splits
  partial_sums = pl.pallas_call(
      functools.partial(_gpu_kernel, block_k=bk),
      out_shape=jax.ShapeDtypeStruct((splits, m_pad, n_pad), jnp.int32),
      grid=(m_pad // bm, n_pad // bn, splits),
      in_specs=[pl.BlockSpec((4, bm, kq_split), lambda i, j, s: (0, i, s)),
                pl.BlockSpec((kq_split, bn), lambda i, j, s: (s, j))],
      out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret)
  return lambda quarters, weights: partial_sums(quarters, weights).sum(axis=0)


def _tpu_call(blocks, m_pad, n_pad, kq_pad, interpret):
  from jax.experimental.pallas import tpu as pltpu
  bm, bn, bk = blocks.tiles
  return pl.pallas_call(
      _tpu_kernel,
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), jnp.int32),
      grid=(m_pad // bm, n_pad // bn, kq_pad // bk),
      in_specs=[pl.BlockSpec((4, bm, bk), lambda i, j, k: (0, i, k)),
                pl.BlockSpec((bk, bn), lambda i, j, k: (k, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "target", "interpret"))
def ternary_matmul_pallas(x, x_scale, packed, w_scale, *, block_sizes: MatmulBlockSizes,
                          target: str = "gpu", interpret: bool = False):
  """The Pallas kernel of `target` ("gpu" or "tpu" layout, see the module docstring); same
  signature and result as `ternary_matmul_reference`.

  Blocks shrink to small dims; M, N and K / 4 are zero-padded to block multiples. Interpret
  mode runs the very blocks the device would, but does not enforce the device's block rules.
  """
  _check_inputs(x, x_scale, packed, w_scale)
  if target not in TARGETS:
    raise ValueError(f"ternary_matmul: target={target!r} is not one of {TARGETS}")
  splits = block_sizes.split_k
  if splits < 1 or (target == "tpu" and splits != 1):
    raise ValueError(f"ternary_matmul: split_k must be >= 1, and 1 on TPU (whose K grid axis "
                     f"is sequential already), got {splits} for target {target!r}")
  (m, _), (kq, n) = x.shape, packed.shape
  kq_split = pl.cdiv(kq, splits)  # the K / 4 rows of one program
  bm, bn, bk = (_fit_block(b, d, target, a)
                for b, d, a in zip(block_sizes.tiles, (m, n, kq_split), _TPU_ALIGN.tiles))
  blocks = dataclasses.replace(block_sizes, block_m=bm, block_n=bn, block_k=bk)
  if not interpret:
    _check_blocks(blocks, target)
  m_pad, n_pad, kq_pad = (tiling.round_up(d, b)
                          for d, b in ((m, bm), (n, bn), (kq, bk * splits)))
  quarters = x.reshape(m, 4, kq).transpose(1, 0, 2)  # [4, M, Kq]: quarter i meets plane i
  quarters = tiling.pad_axis(tiling.pad_axis(quarters, 1, m_pad), 2, kq_pad)
  # Same bits as int8: the dtype the int8 matmul paths of Triton and Mosaic are built around.
  weights = jax.lax.bitcast_convert_type(packed, jnp.int8)  # [Kq, N]
  weights = tiling.pad_axis(tiling.pad_axis(weights, 0, kq_pad), 1, n_pad)  # copies if padded
  call = _gpu_call if target == "gpu" else _tpu_call
  acc = call(blocks, m_pad, n_pad, kq_pad, interpret)(quarters, weights)  # [M_pad, N_pad]
  return _rescale(acc[:m, :n], x_scale, w_scale)


def auto_impl(backend: str, m: int, k: int) -> str:
  """What `impl="auto"` runs for x [m, k] on `backend`: the reference on CPU; on GPU and TPU
  the Pallas kernel up to UNPACKED_PREFILL's rows, its unpacked dot above (int8 where a bf16
  one would not be exact)."""
  if backend not in TARGETS:
    return "reference"
  prefill = UNPACKED_PREFILL[backend]
  if m <= prefill.above_rows:
    return "pallas"
  if prefill.impl == "unpacked_bf16" and k > BF16_EXACT_MAX_K:
    return "unpacked_int8"
  return prefill.impl


def ternary_matmul(x, x_scale, packed, w_scale, *, impl: str = "auto",
                   block_sizes: MatmulBlockSizes | None = None):
  """Dispatch: 'auto' is `auto_impl`'s choice for the backend and the rows of x.

  'pallas' compiles the kernel for the current backend (GPU or TPU), 'interpret' runs it in
  Pallas' interpreter (the GPU layout on CPU), 'unpacked_int8' and 'unpacked_bf16' are
  `ternary_matmul_unpacked` (any backend). `block_sizes` overrides BLOCK_SIZES.
  """
  if impl not in IMPLS:
    raise ValueError(f"ternary_matmul: impl={impl!r} is not one of {IMPLS}")
  backend = jax.default_backend()
  if impl == "auto":
    impl = auto_impl(backend, x.shape[0], x.shape[-1])
  if impl == "reference":
    return ternary_matmul_reference(x, x_scale, packed, w_scale)
  if impl in UNPACKED_DOT_DTYPES:
    return ternary_matmul_unpacked(x, x_scale, packed, w_scale,
                                   dot_dtype=UNPACKED_DOT_DTYPES[impl])
  if impl == "pallas" and backend not in TARGETS:
    raise ValueError(f"ternary_matmul: impl='pallas' needs a GPU or TPU, the backend is "
                     f"{backend!r}; use impl='interpret' or 'reference'")
  target = backend if backend in TARGETS else "gpu"
  blocks = block_sizes or default_block_sizes(backend, x.shape[0])
  return ternary_matmul_pallas(x, x_scale, packed, w_scale, block_sizes=blocks, target=target,
                               interpret=impl == "interpret")

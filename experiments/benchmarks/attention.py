"""Flash attention (kernels/flash_attention.py) against its peers, in the same run.

    python experiments/benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384]
        [--head_dims 64,128] [--batch 1] [--heads 8] [--dtype bfloat16] [--causal]
        [--steps 10] [--mode auto|speed|memory] [--sweep] [--out results.md]

Every table's header names the device, the jax version, the date and the commit
(experiments/report.py). With --out the file is rewritten after each row, so a run cut short by
a time limit keeps the rows it finished.

speed (GPU, TPU): forward and forward+backward TFLOP/s, median of `--steps` after a warm-up
call (wall time around device-synchronised calls, so launch overhead counts), and each peer's
speed relative to ours (> 1: faster than ours). "ours" is the dispatch: on a Hopper GPU its
forward and backward are the Mosaic GPU kernels (flash_attention_mgpu*.py) where they apply;
on GPU "ours, triton backward" pairs that forward with the Triton-layout backward and "ours,
triton" runs the Triton-layout kernels alone. FLOPs: forward
4 * batch * heads * q_len * kv_len * head_dim (two matmuls), backward 2.5x the forward (five
matmuls), causal counted at half. Peers: the XLA reference (the jnp reference, which
materialises the logits); on GPU `jax.nn.dot_product_attention(implementation='cudnn')`, JAX's
Pallas Triton attention (`jax.experimental.pallas.ops.gpu.attention.mha`), JAX's Mosaic GPU
attention (`attention_mgpu`: forward only, its backward has no causal mask; float16 only, so
its inputs are float16; one TuningConfig, block_q 64, block_kv 128, 2 steps in flight,
untuned) and tokamax's `dot_product_attention` with implementation 'mosaic' and 'triton', each
with the backward tokamax pairs with it; on TPU JAX's Pallas TPU flash attention. A peer that
cannot run here (not installed, unsupported GPU or shape, out of memory) says why in its cell.

--sweep (GPU): times our kernels over a small grid of tiles, Triton warps and pipeline stages
per (length, head_dim), each kernel on its own: the forward alone for the forward's
candidates; the backward alone (the vjp of a forward already run) for dq's and dk/dv's, the
other backward kernel at its BLOCK_SIZES["gpu"] entry, so that the two backward winners
combine. The fastest of each kernel is marked and written out as an AttentionBlockSizes to
copy into BLOCK_SIZES; with SWEEP_CANDIDATES, at most 13 configurations (compiles) per
(length, head_dim). On a Hopper it then times the Mosaic GPU kernels over HOPPER_CANDIDATES,
their defaults first: the forward (flash_attention_mgpu) and the backward alone
(flash_attention_mgpu_backward on the forward's residuals), for their DEFAULT_* constants
(lengths must be multiples of 128). On CPU the grid runs in interpret mode (the Hopper kernels
are left out there): a check of the script, not a timing.

memory (the default on CPU, where the kernel runs in interpret mode and is too slow to time):
the jitted forward+backward of ours and of the XLA reference are compiled, not run, and XLA's
`compiled.memory_analysis()` gives the bytes of temporaries; arguments and outputs are the same
for both. In interpret mode the kernels become XLA while-loops over tiles, so the temporaries
are the tiles plus the saved log-sum-exp: the numbers show the algorithm's linear vs quadratic
memory, not a GPU's.

Not measured: the kernels' own time apart from launch and the XLA ops around them (padding,
delta = rowsum(o * do), casts), segment ids, windows and GQA (the tables are causal or full
attention with heads == kv_heads), and accuracy (the tests check it).
"""
import argparse
import dataclasses
import functools
import os
import sys
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp

from llm_research.kernels import flash_attention_mgpu, flash_attention_mgpu_backward
from llm_research.kernels.flash_attention import (BLOCK_SIZES, AttentionBlockSizes, KernelBlocks,
                                                  flash_attention, flash_attention_reference)
from llm_research.metrics import median_seconds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
from report import header  # noqa: E402  (experiments/report.py, beside experiments/benchmarks)

# --sweep's candidates per kernel for head_dim <= 128 (head_dim 256 halves the tiles), each
# timed beside the table's own entry: deeper pipelines (5 stages: Triton's fused-attention
# tutorial's backward), longer walked blocks, more warps; for dq the tiles both backward kernels
# had before they were split (64 x 64, 8 warps, 2 stages at head_dim 128); for dk/dv the
# tutorial's tiles, which spilled registers when compiled off-GPU (BLOCK_SIZES' comment).
# Small on purpose: a compile is ~1-2 s, and two lengths x two head_dims of forward and
# backward must fit in about two minutes on an H100.
SWEEP_CANDIDATES = {
    "forward": [KernelBlocks(128, 64, num_warps=4, num_stages=3),
                KernelBlocks(128, 64, num_warps=8, num_stages=3),
                KernelBlocks(128, 128, num_warps=8, num_stages=2),
                KernelBlocks(64, 64, num_warps=4, num_stages=3)],
    "dq": [KernelBlocks(128, 32, num_warps=4, num_stages=5),
           KernelBlocks(128, 64, num_warps=8, num_stages=2),
           KernelBlocks(64, 64, num_warps=8, num_stages=2)],
    "dkv": [KernelBlocks(32, 128, num_warps=4, num_stages=5),
            KernelBlocks(64, 128, num_warps=8, num_stages=2),
            KernelBlocks(64, 64, num_warps=8, num_stages=3)],
}
# --sweep's variants of the Hopper kernels (the keyword arguments of flash_attention_mgpu.forward
# and flash_attention_mgpu_backward.backward), after their defaults (forward: 2 compute
# warpgroups of 64 rows, ping-pong, 128-key blocks, 2 slots; backward: 2 warpgroups, 64 x 64
# tiles, 2 slots): the fallbacks if ping-pong or the second warpgroup misbehave, and deeper
# rings of smaller blocks (the shared-memory check refuses what does not fit, in its cell).
HOPPER_CANDIDATES = {
    "hopper forward": [{}, {"ping_pong": False}, {"num_compute_warpgroups": 1},
                       {"block_kv": 64, "max_concurrent_steps": 3},
                       {"block_kv": 64, "max_concurrent_steps": 4},
                       {"block_kv": 128, "max_concurrent_steps": 3}],
    "hopper backward": [{}, {"num_compute_warpgroups": 1}, {"max_concurrent_steps": 3},
                        {"block_q": 128}, {"block_kv": 128, "num_compute_warpgroups": 1}],
}


@dataclasses.dataclass(frozen=True)
class Peer:
  """An attention to time: (q, k, v) -> out, all [batch, length, heads, head_dim]."""

  attention: Callable
  dtype: str | None = None  # the input dtype it needs; None: --dtype
  no_backward: str = ""  # why its backward is not timed; "": timed


def attention_flops(batch, heads, length, head_dim, causal, backward):
  forward = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
  return forward * (3.5 if backward else 1.0)


def peers(backend, causal):
  """name -> Peer; ours first, the XLA reference last (the slowest, the likeliest to run out of
  memory, and the first to lose to a time limit). GPU peers import their module when traced,
  so that a missing one fails in its own cells."""
  impls = {"ours": Peer(functools.partial(flash_attention, causal=causal))}
  if backend == "gpu":
    impls["ours, triton backward"] = Peer(functools.partial(flash_attention, causal=causal,
                                                            hopper_backward=False))
    impls["ours, triton"] = Peer(functools.partial(flash_attention, causal=causal,
                                                   hopper_forward=False, hopper_backward=False))
    impls["cudnn"] = Peer(functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                            implementation="cudnn"))
    impls["jax pallas triton (mha)"] = Peer(functools.partial(jax_pallas_mha, causal=causal))
    impls["jax mosaic gpu (attention_mgpu)"] = Peer(
        functools.partial(jax_mosaic_gpu_attention, causal=causal), dtype="float16",
        no_backward="forward only (its backward has no causal mask)")
    for implementation in ("mosaic", "triton"):
      impls[f"tokamax {implementation}"] = Peer(functools.partial(
          tokamax_attention, causal=causal, implementation=implementation))
  if backend == "tpu":
    impls["jax pallas tpu"] = Peer(functools.partial(jax_pallas_tpu, causal=causal))
  impls["xla reference"] = Peer(functools.partial(flash_attention_reference, causal=causal))
  return impls


def jax_pallas_mha(q, k, v, *, causal):
  from jax.experimental.pallas.ops.gpu import attention
  return attention.mha(q, k, v, None, sm_scale=q.shape[-1]**-0.5, causal=causal)


def jax_mosaic_gpu_attention(q, k, v, *, causal):
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                       causal=causal)
  return attention_mgpu.attention(q, k, v, config)


def tokamax_attention(q, k, v, *, causal, implementation):
  _stand_in_for_xprof()
  import tokamax
  return tokamax.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)


def _stand_in_for_xprof():
  """tokamax 0.0.17 imports `xprof.cli.tools.get_kernel_stats_tool` when imported, for its own
  xprof timing mode, which this benchmark does not use; xprof (a 32 MB wheel) does not fit in
  the lent GPU machine's 64 MiB carry beside the other wheels (scripts/gpu_wheels.sh). Where it
  is missing, a stand-in module whose one function raises if called."""
  try:
    import xprof.cli.tools  # noqa: F401
  except ImportError:
    def get_kernel_stats_tool(*args, **kwargs):
      raise RuntimeError("xprof is not installed: a stand-in from experiments/benchmarks/"
                         "attention.py")
    tools = types.ModuleType("xprof.cli.tools")
    tools.get_kernel_stats_tool = get_kernel_stats_tool
    for name in ("xprof", "xprof.cli"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"] = tools


def jax_pallas_tpu(q, k, v, *, causal):
  from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu
  to_bhtd = lambda x: x.swapaxes(1, 2)
  return to_bhtd(jax_tpu.flash_attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), causal=causal,
                                         sm_scale=q.shape[-1]**-0.5))


def forward_and_backward(attention):
  """(q, k, v, dout) -> (dq, dk, dv): the whole training-time cost of one attention call."""
  def f(q, k, v, dout):
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp(dout)
  return f


def inputs(args, length, head_dim, dtype=None):
  shape = (args.batch, length, args.heads, head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, shape, dtype or args.dtype) for key in keys]  # q, k, v, dout


def why(error):
  """An exception as a table cell: its type and the start of its first line."""
  first_line = (str(error).strip().splitlines() or [""])[0][:120]
  return f"n/a: {type(error).__name__}{': ' * bool(first_line)}{first_line}".replace("|", "/")


def timed(fn, steps):
  """Median seconds of fn(), or why it could not run (no cuDNN, out of memory, ...)."""
  try:
    return median_seconds(fn, steps)
  except Exception as e:  # a peer or a config that cannot run here says why, the rest go on
    return why(e)


def speed_rows(args, backend):
  head = ["length", "head_dim", "impl", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd vs ours",
          "fwd+bwd vs ours"]
  rows = []
  for head_dim in args.head_dims:
    for length in args.lengths:
      flops = functools.partial(attention_flops, args.batch, args.heads, length, head_dim,
                                args.causal)
      ours = None  # (fwd, fwd+bwd) seconds of ours, or why not
      for name, peer in peers(backend, args.causal).items():
        q, k, v, dout = inputs(args, length, head_dim, peer.dtype)
        forward = jax.jit(peer.attention)
        grads = jax.jit(forward_and_backward(peer.attention))
        seconds = (timed(lambda: forward(q, k, v), args.steps),
                   peer.no_backward or timed(lambda: grads(q, k, v, dout), args.steps))
        ours = ours or seconds
        cells = [f"{flops(backward) / s / 1e12:.1f}" if isinstance(s, float) else s
                 for backward, s in zip((False, True), seconds)]
        ratios = [f"{mine / s:.2f}x" if isinstance(s, float) and isinstance(mine, float) else ""
                  for mine, s in zip(ours, seconds)]
        rows.append([length, head_dim, name] + cells + ratios)
        yield head, rows


def sweep_rows(args, backend):
  """A row per (length, head_dim, kernel, candidate): its time, the fastest in bold, the table's
  entry labelled; then the winners as AttentionBlockSizes."""
  head = ["length", "head_dim", "kernel", "block_q", "block_k", "warps", "stages", "ms",
          "TFLOP/s"]
  rows = []
  for head_dim in args.head_dims:
    table_entry = BLOCK_SIZES["gpu"][head_dim]
    for length in args.lengths:
      q, k, v, dout = inputs(args, length, head_dim)
      forward_flops = attention_flops(args.batch, args.heads, length, head_dim, args.causal,
                                      backward=False)
      winners = {}
      for kernel, table_blocks in zip(("forward", "dq", "dkv"), table_entry.kernels()):
        results = {}  # KernelBlocks -> seconds or why not
        for blocks in sweep_candidates(table_blocks, kernel, head_dim):
          sizes = dataclasses.replace(table_entry, **{kernel: blocks})
          results[blocks] = time_kernels(args, sizes, kernel, q, k, v, dout)
          print(f"{length} x {head_dim} {kernel} {blocks}: {results[blocks]}", flush=True)
        times = {b: s for b, s in results.items() if isinstance(s, float)}
        winners[kernel] = min(times, key=times.get) if times else table_blocks
        for blocks, seconds in results.items():
          cells = [length, head_dim, kernel, blocks.block_q, blocks.block_k, blocks.num_warps,
                   blocks.num_stages]
          label = " (table)" if blocks == table_blocks else ""
          if isinstance(seconds, str):
            rows.append(cells + [seconds + label, ""])
            continue
          bold = "**" if blocks == winners[kernel] else ""
          work = forward_flops * (1.0 if kernel == "forward" else 2.5)  # backward: 2.5x
          tflops = work / seconds / 1e12
          rows.append(cells + [f"{bold}{seconds * 1e3:.3f}{bold}{label}", f"{tflops:.1f}"])
        yield head, rows
      best = AttentionBlockSizes(**winners)
      rows.append([length, head_dim, "best", f"`{best}`", "", "", "", "", ""])
      yield head, rows
      if backend == "gpu" and flash_attention_mgpu.hopper_available():
        for kernel in HOPPER_CANDIDATES:
          results = {str(variant or "defaults"): time_hopper_kernel(args, kernel, variant, q, k,
                                                                    v, dout)
                     for variant in HOPPER_CANDIDATES[kernel]}
          times = {name: s for name, s in results.items() if isinstance(s, float)}
          fastest = min(times, key=times.get) if times else None
          for name, seconds in results.items():
            cells = [length, head_dim, kernel, f"`{name}`", "", "", ""]
            if isinstance(seconds, str):
              rows.append(cells + [seconds, ""])
              continue
            bold = "**" if name == fastest else ""
            work = forward_flops * (1.0 if kernel == "hopper forward" else 2.5)
            rows.append(cells + [f"{bold}{seconds * 1e3:.3f}{bold}",
                                 f"{work / seconds / 1e12:.1f}"])
          yield head, rows


def sweep_candidates(table_blocks, kernel, head_dim):
  """The table's entry, then SWEEP_CANDIDATES[kernel] (tiles halved for head_dim 256)."""
  shrink = 2 if head_dim > 128 else 1
  halved = [dataclasses.replace(b, block_q=max(16, b.block_q // shrink),
                                block_k=max(16, b.block_k // shrink))
            for b in SWEEP_CANDIDATES[kernel]]
  return list(dict.fromkeys([table_blocks] + halved))


def time_kernels(args, block_sizes, kernel, q, k, v, dout):
  """Seconds of our forward (kernel 'forward') or of our backward alone, or why not."""
  attention = functools.partial(flash_attention, causal=args.causal, block_sizes=block_sizes,
                                hopper_forward=False, hopper_backward=False)  # Triton's tiles
  try:
    if kernel == "forward":
      forward = jax.jit(attention)
      return median_seconds(lambda: forward(q, k, v), args.steps)
    _, vjp = jax.vjp(attention, q, k, v)  # the forward runs here, once
    backward = jax.jit(lambda vjp, dout: vjp(dout))
    return median_seconds(lambda: backward(vjp, dout), args.steps)
  except Exception as e:  # e.g. tiles beyond shared memory: say so, keep sweeping
    return why(e)


def time_hopper_kernel(args, kernel, variant, q, k, v, dout):
  """Seconds of the Hopper forward, or of the Hopper backward alone on the default forward's
  residuals, with `variant`'s keyword arguments; or why not."""
  try:
    if kernel == "hopper forward":
      forward = jax.jit(lambda q, k, v: flash_attention_mgpu.forward(
          q, k, v, causal=args.causal, **variant))
      return median_seconds(lambda: forward(q, k, v), args.steps)
    out, lse = jax.jit(functools.partial(flash_attention_mgpu.forward, causal=args.causal))(
        q, k, v)
    backward = jax.jit(lambda q, k, v, out, dout, lse: flash_attention_mgpu_backward.backward(
        q, k, v, out, dout, lse, causal=args.causal, **variant))
    return median_seconds(lambda: backward(q, k, v, out, dout, lse), args.steps)
  except Exception as e:  # e.g. tiles beyond shared memory: say so, keep sweeping
    return why(e)


def temp_bytes(attention, q, k, v, dout):
  compiled = jax.jit(forward_and_backward(attention)).lower(q, k, v, dout).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def memory_rows(args, backend):
  head = ["length", "head_dim", "ours temp MiB", "xla reference temp MiB", "xla / ours",
          "one [heads, len, len] f32 MiB"]
  impls = peers(backend, args.causal)
  rows = []
  for head_dim in args.head_dims:
    for length in args.lengths:
      shape = jax.ShapeDtypeStruct((args.batch, length, args.heads, head_dim), args.dtype)
      ours = temp_bytes(impls["ours"].attention, shape, shape, shape, shape) / 2**20
      xla = temp_bytes(impls["xla reference"].attention, shape, shape, shape, shape) / 2**20
      logits = args.batch * args.heads * length * length * 4 / 2**20
      rows.append([length, head_dim, f"{ours:.1f}", f"{xla:.1f}", f"{xla / ours:.0f}x",
                   f"{logits:.0f}"])
      yield head, rows


def markdown(head, rows):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--head_dims", default="64,128")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--mode", default="auto", choices=["auto", "speed", "memory"])
  parser.add_argument("--sweep", action="store_true",
                      help="time our kernels over SWEEP_CANDIDATES instead (GPU)")
  parser.add_argument("--out", default="", help="also write the table (markdown) here")
  args = parser.parse_args()
  args.lengths = [int(x) for x in args.lengths.split(",")]
  args.head_dims = [int(x) for x in args.head_dims.split(",")]
  args.dtype = jnp.dtype(args.dtype)

  backend = jax.default_backend()
  mode = ("memory" if backend == "cpu" else "speed") if args.mode == "auto" else args.mode
  mode = "sweep" if args.sweep else mode
  table_rows = {"memory": memory_rows, "speed": speed_rows, "sweep": sweep_rows}[mode]
  note = (["Interpret mode (CPU): these times say nothing about the kernels.", ""]
          if backend == "cpu" and mode != "memory" else [""])
  start = time.perf_counter()
  lines = []
  for head, rows in table_rows(args, backend):
    lines = header(f"Attention {mode}: batch {args.batch}, heads {args.heads} (= kv heads), "
                   f"{args.dtype.name}, causal={args.causal}",
                   "python experiments/benchmarks/attention.py " + " ".join(sys.argv[1:]),
                   time.perf_counter() - start) + note + markdown(head, rows)
    if args.out:
      with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

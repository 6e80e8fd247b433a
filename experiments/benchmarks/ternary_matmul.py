"""Ternary matmul (BitNet b1.58 inference) vs a bf16 jnp.dot of the same shape, same run.

    python experiments/benchmarks/ternary_matmul.py [--shapes 2048x2048,8192x28672]
        [--rows 1,16,64,512,4096] [--impls pallas,unpacked_int8,unpacked_bf16]
        [--blocks 16x64x256[x8x3[x1]]] [--repeats 10] [--sweep] [--out results.md]

For x [rows, K] times W [K, N]: the median time of `ternary_matmul` (int8 x, 2-bit packed W,
exact integer sums, both scales) for each impl, and of `jnp.dot` in bfloat16, each jitted and
warmed up. GB/s is the bytes the op must move (weights + activations + float32 / bf16 output)
over its time, also as a fraction of the device's memory bandwidth measured in the same run
(a jitted `a + 1` over a 512 MiB int32 array: bytes read + written): decode rows are bound by
the weight bytes, 8x fewer for ternary. The impl `auto` would choose is marked. `--impls`
defaults to every path the backend can run compiled (on CPU the reference and the unpacked
dots; Pallas only interprets there). `--blocks BMxBNxBK[xWARPSxSTAGES[xSPLIT_K]]` overrides
the kernel's BLOCK_SIZES table (BK counts packed rows, K / 4; the rest are Triton's launch).

`--sweep` first times the GPU decode grid of each shape (default 8192x28672) at rows 1 and 16:
the Pallas kernel at each SWEEP_TILES entry (block_n, block_k, warps; block_m 16, 3 stages),
then the fastest of those with 2 and 4 stages and split_k 2 and 4; the fastest marked, the
table's entry labelled. 16 compiles per row count, well under a minute per shape on an H100
(an estimate). Then the comparison above, for --rows (default 4096 with --sweep). On CPU the
grid runs in interpret mode, to check the script, not to time it (use a small --shapes there).
The report is rewritten after each table, so a run cut short keeps the tables it finished.
"""
import argparse
import dataclasses
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp

from llm_research.kernels.ternary_matmul import (BLOCK_SIZES, IMPLS, MatmulBlockSizes,
                                                 auto_impl, ternary_matmul)
from llm_research.metrics import median_seconds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
from report import header  # noqa: E402  (experiments/report.py, beside experiments/benchmarks)

# (block_n, block_k, num_warps) of the decode sweep's first pass.
SWEEP_TILES = list(itertools.product((32, 64, 128), (256, 512), (4, 8)))
BANDWIDTH_BYTES = 512 * 2**20


def memory_bandwidth(repeats: int) -> float:
  """Bytes/s of a jitted `a + 1` over an int32 array (read + written): the device's streaming
  bandwidth. An increment rather than a copy, which XLA may turn into no work at all; random
  data, since a GPU may move zeros faster than real data."""
  a = jax.random.randint(jax.random.key(1), (BANDWIDTH_BYTES // 4,), 0, 2**30, jnp.int32)
  increment = jax.jit(lambda a: a + 1)
  return 2 * BANDWIDTH_BYTES / median_seconds(lambda: increment(a), repeats)


def operands(rows: int, k: int, n: int):
  keys = jax.random.split(jax.random.key(0), 3)
  x_int8 = jax.random.randint(keys[0], (rows, k), -127, 128, jnp.int32).astype(jnp.int8)
  x_scale = jnp.full((rows,), 0.01, jnp.float32)
  packed = jax.random.randint(keys[1], (k // 4, n), 0, 256, jnp.int32).astype(jnp.uint8)
  w_bf16 = jax.random.normal(keys[2], (k, n), jnp.bfloat16)
  return x_int8, x_scale, packed, w_bf16


def time_ternary(x_int8, x_scale, packed, impl, blocks, repeats) -> float:
  ternary = jax.jit(lambda x, s, p: ternary_matmul(x, s, p, 0.02, impl=impl,
                                                    block_sizes=blocks))
  return median_seconds(lambda: ternary(x_int8, x_scale, packed), repeats)


def time_dense(x_int8, w_bf16, repeats) -> float:
  dense, x_bf16 = jax.jit(jnp.dot), x_int8.astype(jnp.bfloat16)
  return median_seconds(lambda: dense(x_bf16, w_bf16), repeats)


def ternary_bytes(rows, k, n) -> int:
  return k // 4 * n + rows * k + 4 * rows + 4 * rows * n  # packed W, x, x_scale, output


def dense_bytes(rows, k, n) -> int:
  return 2 * (k * n + rows * k + rows * n)


def markdown(head, rows):
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def compare_tables(args, bandwidth, backend):
  """Per shape, one table: a row per (rows, impl) with its time and GB/s, the bf16 dot's, the
  speedup."""
  head = ["rows", "impl", "ternary ms", "bf16 dot ms", "speedup", "ternary GB/s",
          "of bandwidth", "bf16 GB/s"]
  for k, n in args.shapes:
    table = []
    for rows in args.rows:
      x_int8, x_scale, packed, w_bf16 = operands(rows, k, n)
      t_dense = time_dense(x_int8, w_bf16, args.repeats)
      dense_gbs = dense_bytes(rows, k, n) / t_dense
      chosen = auto_impl(backend, rows, k)
      for impl in args.impls:
        try:
          t = time_ternary(x_int8, x_scale, packed, impl, args.blocks, args.repeats)
        except Exception as e:  # an impl that cannot run here (no Triton, OOM, ...) says why
          table.append([rows, impl, f"n/a: {type(e).__name__}"] + [""] * 5)
          continue
        gbs = ternary_bytes(rows, k, n) / t
        table.append([rows, impl + (" (auto)" if impl == chosen else ""), f"{t * 1e3:.3f}",
                      f"{t_dense * 1e3:.3f}", f"{t_dense / t:.2f}x", f"{gbs / 1e9:.3g}",
                      f"{gbs / bandwidth:.0%}", f"{dense_gbs / 1e9:.3g}"])
        print(f"{k} x {n}: {table[-1]}", flush=True)
    yield [f"W {k} x {n}, blocks {args.blocks or 'table'}:", ""] + markdown(head, table) + [""]


def sweep_tables(args, bandwidth, backend):
  """Per shape and decode rows (1, 16), one table of kernel configs, the fastest in bold."""
  impl = "pallas" if backend in ("gpu", "tpu") else "interpret"
  table_entry = BLOCK_SIZES["gpu"]["decode"]
  for (k, n), rows in itertools.product(args.shapes, (1, 16)):
    x_int8, x_scale, packed, w_bf16 = operands(rows, k, n)
    t_dense = time_dense(x_int8, w_bf16, args.repeats)
    timed = {}  # MatmulBlockSizes -> seconds, or why it did not run

    def time_config(blocks):
      try:
        timed[blocks] = time_ternary(x_int8, x_scale, packed, impl, blocks, args.repeats)
      except Exception as e:  # e.g. a tile beyond shared memory: say so, keep sweeping
        timed[blocks] = f"n/a: {type(e).__name__}"
      print(f"rows {rows}, {k} x {n}: {blocks}: {timed[blocks]}", flush=True)

    for bn, bk, warps in SWEEP_TILES:
      time_config(MatmulBlockSizes(16, bn, bk, num_warps=warps))
    fastest = lambda: min((b for b, t in timed.items() if isinstance(t, float)),
                          key=timed.get, default=None)
    best = fastest()
    if best is not None:
      for change in ({"num_stages": 2}, {"num_stages": 4}, {"split_k": 2}, {"split_k": 4}):
        time_config(dataclasses.replace(best, **change))
    best = fastest()
    table = []
    for blocks, t in timed.items():
      cells = [blocks.block_n, blocks.block_k, blocks.num_warps, blocks.num_stages,
               blocks.split_k]
      if isinstance(t, str):
        table.append(cells + [t, "", "", ""])
        continue
      gbs = ternary_bytes(rows, k, n) / t
      mark = "**" if blocks == best else ""
      label = " (table)" if blocks == table_entry else ""
      table.append(cells + [f"{mark}{t * 1e3:.3f}{mark}{label}", f"{gbs / 1e9:.3g}",
                            f"{gbs / bandwidth:.0%}", f"{t_dense / t:.2f}x"])
    dense_gbs = dense_bytes(rows, k, n) / t_dense
    yield [f"Decode, rows {rows}, W {k} x {n}: bf16 dot {t_dense * 1e3:.3f} ms, "
           f"{dense_gbs / 1e9:.3g} GB/s ({dense_gbs / bandwidth:.0%} of the bandwidth). "
           "Fastest in bold; (table): BLOCK_SIZES' entry.", ""] + markdown(
               ["block_n", "block_k", "warps", "stages", "split_k", "ternary ms", "GB/s",
                "of bandwidth", "vs bf16 dot"], table) + [""]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=None, help="comma-separated KxN weight shapes "
                      "(default 2048x2048,4096x4096,8192x28672; with --sweep 8192x28672)")
  parser.add_argument("--rows", default=None, help="comma-separated activation rows "
                      "(default 1,16,64,512,4096; with --sweep 4096)")
  parser.add_argument("--impls", default=None,
                      help=f"comma-separated, of {IMPLS} (default: all the backend compiles)")
  parser.add_argument("--blocks", default=None,
                      help="BMxBNxBK[xWARPSxSTAGES[xSPLIT_K]] kernel blocks (default: table)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--sweep", action="store_true", help="the decode grid first")
  parser.add_argument("--out", default="", help="also write the report (markdown) here")
  args = parser.parse_args()
  backend = jax.default_backend()
  shapes = args.shapes or ("8192x28672" if args.sweep else "2048x2048,4096x4096,8192x28672")
  args.shapes = [tuple(int(d) for d in s.split("x")) for s in shapes.split(",")]
  rows = args.rows or ("4096" if args.sweep else "1,16,64,512,4096")
  args.rows = [int(r) for r in rows.split(",")]
  accelerated = backend in ("gpu", "tpu")
  args.impls = (args.impls.split(",") if args.impls else
                ["pallas" if accelerated else "reference", "unpacked_int8", "unpacked_bf16"])
  bad = set(args.impls) - set(IMPLS)
  if bad:
    parser.error(f"--impls: {sorted(bad)} not in {IMPLS}")
  args.blocks = args.blocks and MatmulBlockSizes(*(int(b) for b in args.blocks.split("x")))

  start = time.perf_counter()
  bandwidth = memory_bandwidth(args.repeats)
  device = jax.devices()[0]
  sections = [f"Device {device.device_kind} ({backend}); memory bandwidth "
              f"{bandwidth / 1e9:.0f} GB/s (a + 1 over {BANDWIDTH_BYTES >> 20} MiB of int32, "
              f"read + written); peer: bf16 jnp.dot.", ""]
  tables = compare_tables(args, bandwidth, backend)
  if args.sweep:
    tables = itertools.chain(sweep_tables(args, bandwidth, backend), tables)
  for table in tables:
    sections += table
    lines = header("Ternary matmul vs a bf16 dot" + (", decode sweep" if args.sweep else ""),
                   "python experiments/benchmarks/ternary_matmul.py " + " ".join(sys.argv[1:]),
                   time.perf_counter() - start) + sections
    if args.out:
      with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
  print("\n" + "\n".join(lines))


if __name__ == "__main__":
  main()

"""Ternary matmul (BitNet b1.58 inference) vs a bf16 jnp.dot of the same shape, same run.

    python experiments/benchmarks/ternary_matmul.py [--shapes 2048x2048,8192x28672]
        [--rows 1,8,512] [--impl auto|pallas|interpret|reference] [--blocks 16x64x256]
        [--repeats 10]

For x [rows, K] times W [K, N]: the median time of `ternary_matmul` (int8 x, 2-bit packed W,
int32 accumulation, both scales) and of `jnp.dot` in bfloat16, each jitted and warmed up. The
effective bandwidth is the bytes each must move (weights + activations + float32 / bf16
output) over its time: decode rows are bound by the weight bytes, 8x fewer for ternary.
`impl=auto` is the Pallas kernel on GPU/TPU and the jnp reference on CPU. `--blocks BMxBNxBK`
overrides the kernel's BLOCK_SIZES table (BK counts packed rows, K / 4), for tuning.
"""
import argparse

import jax
import jax.numpy as jnp

from llm_research.kernels.ternary_matmul import IMPLS, MatmulBlockSizes, ternary_matmul
from llm_research.metrics import median_seconds

def measure(rows: int, k: int, n: int, impl: str, blocks: MatmulBlockSizes | None,
            repeats: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 3)
  x_int8 = jax.random.randint(keys[0], (rows, k), -127, 128, jnp.int32).astype(jnp.int8)
  x_scale = jnp.full((rows,), 0.01, jnp.float32)
  packed = jax.random.randint(keys[1], (k // 4, n), 0, 256, jnp.int32).astype(jnp.uint8)
  x_bf16 = x_int8.astype(jnp.bfloat16)
  w_bf16 = jax.random.normal(keys[2], (k, n), jnp.bfloat16)
  ternary = jax.jit(lambda x, s, p: ternary_matmul(x, s, p, 0.02, impl=impl,
                                                    block_sizes=blocks))
  dense = jax.jit(jnp.dot)
  t_ternary = median_seconds(lambda: ternary(x_int8, x_scale, packed), repeats)
  t_dense = median_seconds(lambda: dense(x_bf16, w_bf16), repeats)
  ternary_bytes = packed.size + x_int8.size + 4 * x_scale.size + 4 * rows * n
  dense_bytes = 2 * (w_bf16.size + x_bf16.size + rows * n)
  return dict(rows=rows, k=k, n=n, t_ternary=t_ternary, t_dense=t_dense,
              gbs_ternary=ternary_bytes / t_ternary / 1e9, gbs_dense=dense_bytes / t_dense / 1e9,
              w_ternary_mb=packed.size / 2**20, w_dense_mb=2 * w_bf16.size / 2**20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="2048x2048,4096x4096,8192x28672",
                      help="comma-separated KxN weight shapes")
  parser.add_argument("--rows", default="1,8,512", help="comma-separated activation rows")
  parser.add_argument("--impl", default="auto", choices=IMPLS)
  parser.add_argument("--blocks", default=None, help="BMxBNxBK kernel blocks (default: table)")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  blocks = args.blocks and MatmulBlockSizes(*(int(b) for b in args.blocks.split("x")))
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); ternary impl={args.impl}; "
        f"blocks={blocks or 'table'}; peer: bf16 jnp.dot; jax {jax.__version__}\n")
  print("| rows | K x N | ternary (ms) | bf16 dot (ms) | speedup | ternary GB/s | bf16 GB/s "
        "| W ternary (MiB) | W bf16 (MiB) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for shape in args.shapes.split(","):
    k, n = (int(d) for d in shape.split("x"))
    for rows in (int(r) for r in args.rows.split(",")):
      r = measure(rows, k, n, args.impl, blocks, args.repeats)
      print(f"| {rows} | {k} x {n} | {r['t_ternary'] * 1e3:.2f} | {r['t_dense'] * 1e3:.2f} | "
            f"{r['t_dense'] / r['t_ternary']:.2f}x | {r['gbs_ternary']:.1f} | "
            f"{r['gbs_dense']:.1f} | {r['w_ternary_mb']:.1f} | {r['w_dense_mb']:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()

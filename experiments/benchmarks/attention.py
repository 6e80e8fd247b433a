"""Flash attention (kernels/flash_attention.py) against its peers, in the same run.

    python experiments/benchmarks/attention.py [--lengths 1024,2048,4096,8192,16384]
        [--head_dims 64,128] [--batch 1] [--heads 8] [--dtype bfloat16] [--causal]
        [--steps 10] [--mode auto|speed|memory] [--out results.md]

speed (GPU, TPU): forward and forward+backward TFLOP/s, median of `--steps` after a warm-up.
FLOPs: forward 4 * batch * heads * q_len * kv_len * head_dim (two matmuls), backward 2.5x the
forward (five matmuls), causal counted at half. Peers: the XLA reference (the jnp reference,
which materialises the logits), `jax.nn.dot_product_attention(implementation='cudnn')` and
JAX's shipped Pallas attention (`jax.experimental.pallas.ops.gpu.attention.mha`, on TPU
`jax.experimental.pallas.ops.tpu.flash_attention`). A peer that fails says why in its cell.

memory (the default on CPU, where the kernel runs in interpret mode and is too slow to time):
the jitted forward+backward of ours and of the XLA reference are compiled, not run, and XLA's
`compiled.memory_analysis()` gives the bytes of temporaries; arguments and outputs are the same
for both. In interpret mode the kernels become XLA while-loops over tiles, so the temporaries
are the tiles plus the saved log-sum-exp: the numbers show the algorithm's linear vs quadratic
memory, not a GPU's.
"""
import argparse
import datetime
import functools
import time

import jax
import jax.numpy as jnp

from llm_research.kernels.flash_attention import flash_attention, flash_attention_reference
from llm_research.metrics import median_seconds


def attention_flops(batch, heads, length, head_dim, causal, backward):
  forward = 4 * batch * heads * length * length * head_dim * (0.5 if causal else 1.0)
  return forward * (3.5 if backward else 1.0)


def peers(backend, causal):
  """name -> attention(q, k, v) on [batch, length, heads, head_dim] arrays."""
  impls = {
      "ours (pallas)": functools.partial(flash_attention, causal=causal),
      "xla reference": functools.partial(flash_attention_reference, causal=causal),
  }
  if backend == "gpu":
    from jax.experimental.pallas.ops.gpu import attention as jax_gpu
    impls["cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                       implementation="cudnn")
    impls["jax pallas"] = lambda q, k, v: jax_gpu.mha(
        q, k, v, None, sm_scale=q.shape[-1]**-0.5, causal=causal)
  if backend == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention as jax_tpu
    to_bhtd = lambda x: x.swapaxes(1, 2)
    impls["jax pallas"] = lambda q, k, v: to_bhtd(jax_tpu.flash_attention(
        to_bhtd(q), to_bhtd(k), to_bhtd(v), causal=causal, sm_scale=q.shape[-1]**-0.5))
  return impls


def forward_and_backward(attention):
  """(q, k, v, dout) -> (dq, dk, dv): the whole training-time cost of one attention call."""
  def f(q, k, v, dout):
    _, vjp = jax.vjp(attention, q, k, v)
    return vjp(dout)
  return f


def inputs(args, length, head_dim):
  shape = (args.batch, length, args.heads, head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  return [jax.random.normal(key, shape, args.dtype) for key in keys]  # q, k, v, dout

def speed_rows(args, backend):
  header = ["length", "head_dim", "impl", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd+bwd vs ours"]
  rows = []
  for head_dim in args.head_dims:
    for length in args.lengths:
      q, k, v, dout = inputs(args, length, head_dim)
      ours = None
      for name, attention in peers(backend, args.causal).items():
        try:
          forward, grads = jax.jit(attention), jax.jit(forward_and_backward(attention))
          fwd = median_seconds(lambda: forward(q, k, v), args.steps)
          both = median_seconds(lambda: grads(q, k, v, dout), args.steps)
        except Exception as e:  # a peer that cannot run here (no cuDNN, OOM, ...) says why
          rows.append([length, head_dim, name, f"n/a: {type(e).__name__}", "", ""])
          continue
        flops = functools.partial(attention_flops, args.batch, args.heads, length, head_dim,
                                  args.causal)
        ours = ours or both
        rows.append([length, head_dim, name, f"{flops(False) / fwd / 1e12:.1f}",
                     f"{flops(True) / both / 1e12:.1f}", f"{ours / both:.2f}x"])
  return header, rows


def temp_bytes(attention, q, k, v, dout):
  compiled = jax.jit(forward_and_backward(attention)).lower(q, k, v, dout).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def memory_rows(args, backend):
  header = ["length", "head_dim", "ours temp MiB", "xla reference temp MiB", "xla / ours",
            "one [heads, len, len] f32 MiB"]
  impls = peers(backend, args.causal)
  rows = []
  for head_dim in args.head_dims:
    for length in args.lengths:
      shape = jax.ShapeDtypeStruct((args.batch, length, args.heads, head_dim), args.dtype)
      ours = temp_bytes(impls["ours (pallas)"], shape, shape, shape, shape) / 2**20
      xla = temp_bytes(impls["xla reference"], shape, shape, shape, shape) / 2**20
      logits = args.batch * args.heads * length * length * 4 / 2**20
      rows.append([length, head_dim, f"{ours:.1f}", f"{xla:.1f}", f"{xla / ours:.0f}x",
                   f"{logits:.0f}"])
  return header, rows


def markdown(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


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
  parser.add_argument("--out", default="", help="also write the table (markdown) here")
  args = parser.parse_args()
  args.lengths = [int(x) for x in args.lengths.split(",")]
  args.head_dims = [int(x) for x in args.head_dims.split(",")]
  args.dtype = jnp.dtype(args.dtype)

  backend = jax.default_backend()
  mode = ("memory" if backend == "cpu" else "speed") if args.mode == "auto" else args.mode
  start = time.perf_counter()
  header, rows = (memory_rows if mode == "memory" else speed_rows)(args, backend)
  device = jax.devices()[0]
  title = (f"attention {mode}: device {device.device_kind} ({backend}), batch {args.batch}, "
           f"heads {args.heads}, {args.dtype.name}, causal={args.causal}, "
           f"{datetime.date.today()}, {time.perf_counter() - start:.0f} s")
  table = markdown(header, rows)
  print(title + "\n\n" + table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(f"{title}\n\n{table}\n")


if __name__ == "__main__":
  main()

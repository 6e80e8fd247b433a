"""The MoE layer (models/moe.py) vs the dense SwiGLU MLP with the same active parameters, same run.

    python experiments/benchmarks/moe.py [--batch 8] [--length 512] [--embed 512] [--mlp 1024]
        [--experts 8] [--top_k 2] [--capacity_factor 1.25] [--paths dropless,capacity,expert_choice]
        [--dtype auto|float32|bfloat16] [--repeats 10]

Tokens per second of one layer, x [batch, length, embed] -> [batch, length, embed], forward and
forward + backward (gradients of the params and of x, the router's losses included), each
jitted and timed by `metrics.median_seconds`. The MoE layer has `experts` SwiGLU experts of
hidden size `mlp`; each token uses `top_k` of them, so the peer is the dense SwiGLU of hidden
size top_k x mlp (the same FLOPs a token, the router aside). Paths:
  dropless        top-k, the token copies sorted by expert, `jax.lax.ragged_dot` (grouped
                  matmuls on GPU/TPU; XLA:CPU computes it as a dense matmul over every expert)
  capacity        top-k, each expert takes at most ceil(c * k * length / E) copies of a row,
                  dispatch/combine einsums (`--capacity_factor` c)
  expert_choice   each expert takes its ceil(k * length / E) top tokens of a row (capacity
                  factor top_k: top_k experts a token on average, the peer's FLOPs)
`dtype=auto` computes in bfloat16 on accelerators and float32 on CPU (both sides alike).
"""
import argparse
import dataclasses

import jax
import jax.numpy as jnp

from llm_research.metrics import median_seconds
from llm_research.models.mlp import MLPS
from llm_research.models.moe import MoEConfig
from llm_research.models.stack import AUX_LOSS, METRICS, collect_aux_losses
from llm_research.models.transformer import TransformerConfig

PATHS = ("dropless", "capacity", "expert_choice")


def layer_config(args, path: str) -> TransformerConfig:
  """The MoE layer of `path`, or with path="dense" the peer SwiGLU (hidden top_k x mlp)."""
  base = TransformerConfig(vocab_size=1, embed_dim=args.embed, mlp_dim=args.mlp,
                           dtype=args.dtype, attention_impl="xla")
  if path == "dense":
    return dataclasses.replace(base, mlp_dim=args.top_k * args.mlp)
  moe = MoEConfig(num_experts=args.experts, experts_per_token=args.top_k)
  if path == "capacity":
    moe = dataclasses.replace(moe, capacity_factor=args.capacity_factor)
  elif path == "expert_choice":
    moe = dataclasses.replace(moe, router="expert_choice", capacity_factor=float(args.top_k))
  return dataclasses.replace(base, mlp_impl="moe", moe=moe)


def measure(config: TransformerConfig, x: jax.Array, repeats: int) -> dict:
  """Median seconds of the layer's forward and forward + backward on x."""
  layer = MLPS[config.mlp_impl](config)
  params = jax.jit(layer.init)(jax.random.key(1), x)["params"]

  def loss(params, x):
    y, sown = layer.apply({"params": params}, x, mutable=[AUX_LOSS, METRICS])
    return jnp.mean(y.astype(jnp.float32)) + sum(collect_aux_losses(sown).values())

  forward = jax.jit(lambda params, x: layer.apply({"params": params}, x,
                                                  mutable=[AUX_LOSS, METRICS])[0])
  backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return dict(forward=median_seconds(lambda: forward(params, x), repeats),
              backward=median_seconds(lambda: backward(params, x), repeats))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--embed", type=int, default=512)
  parser.add_argument("--mlp", type=int, default=1024, help="hidden size of one expert")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25, help="of the capacity path")
  parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {PATHS}")
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  if args.dtype == "auto":
    args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  paths = args.paths.split(",")
  unknown = sorted(set(paths) - set(PATHS))
  if unknown:
    parser.error(f"--paths: unknown {unknown}; choose from {PATHS}")

  x = jax.random.normal(jax.random.key(0), (args.batch, args.length, args.embed),
                        jnp.dtype(args.dtype))
  tokens = args.batch * args.length
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; x [{args.batch}"
        f", {args.length}, {args.embed}] {args.dtype}; {args.experts} experts of mlp {args.mlp}, "
        f"top-{args.top_k}; peer: dense SwiGLU of mlp {args.top_k * args.mlp}\n")
  dense = measure(layer_config(args, "dense"), x, args.repeats)
  print("| path | pass | MoE (ms) | dense (ms) | MoE tokens/s | dense tokens/s | MoE / dense |")
  print("|---|---|---|---|---|---|---|")
  for path in paths:
    label = {"dropless": f"top-{args.top_k} dropless (ragged_dot)",
             "capacity": f"top-{args.top_k} capacity {args.capacity_factor} (dispatch/combine)",
             "expert_choice": f"expert choice, capacity {float(args.top_k)}"}[path]
    moe = measure(layer_config(args, path), x, args.repeats)
    for name, title in (("forward", "forward"), ("backward", "forward + backward")):
      print(f"| {label} | {title} | {moe[name] * 1e3:.2f} | {dense[name] * 1e3:.2f} | "
            f"{tokens / moe[name]:,.0f} | {tokens / dense[name]:,.0f} | "
            f"{dense[name] / moe[name]:.2f}x |", flush=True)


if __name__ == "__main__":
  main()

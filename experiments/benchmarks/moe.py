"""The MoE layer and a small MoE model (models/moe.py) vs the dense peers with the same active
parameters, measured in the same run, on 1 device and on 8 (fake CPU) devices with expert
parallelism.

    python experiments/benchmarks/moe.py [--devices 1,8] [--batch 4] [--length 256]
        [--embed 256] [--mlp 512] [--experts 8] [--top_k 2] [--capacity_factor 1.25]
        [--layers 2] [--paths dropless,capacity] [--dtype auto|float32|bfloat16] [--repeats 3]
        [--out experiments/results/moe_cpu.md]

Scopes: "layer", one MLP, x [batch, length, embed] -> the same; "model", a whole transformer of
`layers` layers (every one MoE; embed / 64 heads of 64) on random tokens, its training objective
(next-token loss and the router losses). Passes: forward, and forward + backward (the gradients
of every param, and of x for the layer), each jitted and timed by `metrics.median_seconds`.
The MoE side has `experts` SwiGLU experts of hidden size `mlp`, each token using `top_k` of them;
the peer is the dense SwiGLU of hidden size top_k x mlp (the same matmul FLOPs a token, the router
aside). Paths:
  dropless        top-k, copies sorted by expert, `jax.lax.ragged_dot` (grouped matmuls on
                  GPU/TPU; XLA:CPU computes it as a dense matmul over every expert it holds);
                  with experts split over devices, the copies go to their experts' devices by
                  all-to-all (padded to the worst case: XLA:CPU has no ragged_all_to_all)
  capacity        top-k, each expert takes at most ceil(c * k * length / E) copies of a row,
                  dispatch/combine einsums (`--capacity_factor` c), tokens moved by all-to-all
  expert_choice   each expert takes its ceil(k * length / E) top tokens of a row
Each device count runs in its own process (fake CPU devices exist only if set before JAX
starts); with 8 devices the mesh is data=2 x expert=4 (the dense peer: the same mesh, `expert`
splitting rows like a data axis), and the table adds the bytes one device's collectives move in a
forward + backward step (`sharding.collective_bytes` of the compiled program) against the
params' bytes. `dtype=auto`: bfloat16 on accelerators, float32 on CPU (both sides alike).
"""
import argparse
import json
import os
import subprocess
import sys
import time

PATHS = ("dropless", "capacity", "expert_choice")
SCOPES = ("layer", "model")
EXPERT_MESH = {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}  # for 8 devices


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,8", help="device counts, each in its own process")
  parser.add_argument("--batch", type=int, default=8, help="a multiple of every device count")
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--embed", type=int, default=256)
  parser.add_argument("--mlp", type=int, default=512, help="hidden size of one expert")
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25, help="of the capacity path")
  parser.add_argument("--layers", type=int, default=2, help="of the whole model")
  parser.add_argument("--paths", default="dropless,capacity", help=f"comma-separated, of {PATHS}")
  parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="", help="also write the table (markdown) here")
  parser.add_argument("--measure", type=int, default=0,
                      help="internal: measure on this many devices, print JSON rows")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.paths.split(",")) - set(PATHS))
  if unknown:
    parser.error(f"--paths: unknown {unknown}; choose from {PATHS}")
  if any(args.batch % int(count) for count in args.devices.split(",")):
    parser.error(f"--batch={args.batch} must split over every device count of --devices")
  return args


def measure_rows(args) -> list[dict]:
  """Every (scope, path) row on `args.measure` devices, peers included (this process)."""
  import dataclasses

  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from llm_research import sharding, training
  from llm_research.config import base_config
  from llm_research.metrics import median_seconds
  from llm_research.models import Transformer, TransformerConfig
  from llm_research.models.mlp import MLPS
  from llm_research.models.moe import MoEConfig
  from llm_research.models.stack import AUX_LOSS, METRICS, collect_aux_losses

  dtype = args.dtype
  if dtype == "auto":
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  mesh_config = EXPERT_MESH if args.measure > 1 else {"data": 1, "fsdp": 1, "tensor": 1,
                                                      "expert": 1}
  mesh = sharding.make_mesh(mesh_config, jax.devices()[:args.measure])
  rules = sharding.rules_from_config(base_config())
  rows_sharding = sharding.batch_sharding(mesh, rules)

  def config(path: str) -> TransformerConfig:
    """The MoE model of `path`, or with path="dense" the peer (dense MLP of top_k x mlp)."""
    heads = max(1, args.embed // 64)
    base = TransformerConfig(vocab_size=256, num_layers=args.layers, embed_dim=args.embed,
                             num_heads=heads, num_kv_heads=heads, head_dim=64,
                             mlp_dim=args.mlp, dtype=dtype, attention_impl="xla")
    if path == "dense":
      return dataclasses.replace(base, mlp_dim=args.top_k * args.mlp)
    moe = MoEConfig(num_experts=args.experts, experts_per_token=args.top_k,
                    capacity_factor=args.capacity_factor if path == "capacity" else 0.0)
    if path == "expert_choice":
      moe = dataclasses.replace(moe, router="expert_choice", capacity_factor=float(args.top_k))
    return dataclasses.replace(base, mlp_impl="moe", moe=moe)

  def scope_functions(scope: str, cfg: TransformerConfig):
    """(module, its inputs, loss(params, inputs) -> scalar, forward(params, inputs))."""
    shape = (args.batch, args.length)
    if scope == "layer":
      module = MLPS[cfg.mlp_impl](cfg)
      x = jax.random.normal(jax.random.key(0), (*shape, args.embed), jnp.dtype(dtype))
      apply = lambda p, x: module.apply({"params": p}, x, mutable=[AUX_LOSS, METRICS])

      def loss(params, x):
        y, sown = apply(params, x)
        return jnp.mean(y.astype(jnp.float32)) + sum(collect_aux_losses(sown).values())
      return module, x, loss, lambda p, x: apply(p, x)[0]
    module = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length + 1), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": jnp.ones(shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.length), shape)}
    objective = training.model_objective(module)
    return module, batch, lambda p, b: objective(p, b, None)[0], (
        lambda p, b: module.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"]))

  def measure(scope: str, path: str) -> dict:
    cfg = config(path)
    module, inputs, loss, forward = scope_functions(scope, cfg)
    init_inputs = inputs if scope == "layer" else inputs["inputs"]
    boxed = jax.eval_shape(module.init, jax.random.key(1), init_inputs)["params"]
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    inputs = jax.device_put(inputs, rows_sharding)
    with sharding.activate(mesh, rules):
      params = jax.jit(lambda: nn.meta.unbox(module.init(jax.random.key(1), init_inputs)[
          "params"]), out_shardings=shardings)()
      grad_of = (0, 1) if scope == "layer" else 0
      backward = jax.jit(jax.grad(loss, argnums=grad_of))
      forward = jax.jit(forward)
      step = backward.lower(params, inputs).compile()
      row = dict(forward=median_seconds(lambda: forward(params, inputs), args.repeats),
                 backward=median_seconds(lambda: step(params, inputs), args.repeats))
    row["collective_bytes"] = sharding.collective_bytes(step.as_text())
    row["param_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return row

  rows = []
  for scope in SCOPES:
    dense = measure(scope, "dense")
    for path in args.paths.split(","):
      rows.append(dict(devices=args.measure, scope=scope, path=path, moe=measure(scope, path),
                       dense=dense))
  device = jax.devices()[0]
  return [dict(row, device=f"{device.device_kind} ({device.platform})", dtype=dtype)
          for row in rows]


READING = """\
What the numbers mean. Each time is the median of the repeats after a warm-up; the MoE / dense
column is the dense peer's time over the MoE's (above 1x: the MoE is faster). On CPU they say
little about an accelerator: XLA:CPU has no grouped matmul, so `jax.lax.ragged_dot` (the dropless
path) is a dense matmul of every row a device holds against every expert it holds, masked: E
times the work of its token copies on one device, and as much on n expert devices (n padded
buffers of rows against E / n experts); and 8 "devices" are 8 fake ones sharing this machine's
cores, so their times add the collectives' copying to the same cores' work rather than divide
it. Other jobs shared the cores: read the ratios roughly. The bytes are exact (the compiled
program's): one device's collectives in a forward + backward step, by kind. The dropless path's
all-to-all sends every peer a buffer of tokens x min(k, E / n) rows, here all the device's token
copies (dropless needs room for the worst case, and XLA:CPU cannot run `ragged_all_to_all`), so
it moves about n = 4 times the capacity path's; nothing is all-gathered (no expert weight, and
no router values: top_k runs on each device's rows), and the all-reduce is the data-parallel
gradient sum, as the dense peer's (the routers' gradients besides)."""


def megabytes(count: float) -> str:
  return f"{count / 2**20:.2f}"


def table(args, rows: list[dict]) -> list[str]:
  """The markdown table: times, tokens/s and ratio per row; bytes moved where devices > 1."""
  tokens = args.batch * args.length
  label = {"dropless": f"top-{args.top_k} dropless",
           "capacity": f"top-{args.top_k} capacity {args.capacity_factor}",
           "expert_choice": f"expert choice, capacity {float(args.top_k)}"}
  lines = ["| devices | scope | path | pass | MoE (ms) | dense (ms) | MoE tokens/s | "
           "dense tokens/s | MoE / dense | MoE step's collectives (MB a device) | dense's (MB) | "
           "MoE params (MB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    moe, dense = row["moe"], row["dense"]
    for name, title in (("forward", "forward"), ("backward", "forward + backward")):
      moved = ["", "", ""]
      if name == "backward" and row["devices"] > 1:
        moved = [", ".join(f"{kind} {megabytes(size)}"
                           for kind, size in sorted(side["collective_bytes"].items()))
                 for side in (moe, dense)] + [megabytes(moe["param_bytes"])]
      lines.append(
          f"| {row['devices']} | {row['scope']} | {label[row['path']]} | {title} | "
          f"{moe[name] * 1e3:.1f} | {dense[name] * 1e3:.1f} | {tokens / moe[name]:,.0f} | "
          f"{tokens / dense[name]:,.0f} | {dense[name] / moe[name]:.2f}x | " + " | ".join(moved)
          + " |")
  return lines


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.measure:
    if args.measure > 1 and "device_count" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + f" --xla_force_host_platform_device_count={args.measure}")
    print(json.dumps(measure_rows(args)))
    return
  start = time.time()
  rows = []
  for count in (int(c) for c in args.devices.split(",")):
    # Each device count in a fresh process: the fake CPU devices are fixed when JAX starts.
    out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]),
                          f"--measure={count}"], capture_output=True, text=True)
    if out.returncode:
      sys.exit(f"error: the {count}-device measurement failed:\n{out.stderr[-3000:]}")
    rows += json.loads(out.stdout.strip().splitlines()[-1])
  lines = table(args, rows)
  print("\n".join(lines))
  if args.out:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import report  # experiments/report.py
    command = "python experiments/benchmarks/moe.py " + " ".join(argv or sys.argv[1:])
    report.write(args.out, report.header(
        "MoE layer and model vs the dense peers with the same active parameters", command,
        time.time() - start) + ["", f"Device: {rows[0]['device']}, {rows[0]['dtype']}; x "
                                f"[{args.batch}, {args.length}, {args.embed}], {args.experts} "
                                f"experts of mlp {args.mlp}, top-{args.top_k}; dense peer mlp "
                                f"{args.top_k * args.mlp}; model: {args.layers} layers. 8 "
                                f"devices: mesh data=2 x expert=4.", ""] + lines + ["", READING])


if __name__ == "__main__":
  main()

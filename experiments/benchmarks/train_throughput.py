"""Training throughput: tokens/s, step time and MFU of one config's train step.

    python experiments/benchmarks/train_throughput.py --config experiments/quickstart.py \
        [--preset 125m|350m] [--config.train.batch_size=8 ...] [--steps 10] \
        [--compile_depths 4,8,16,32]

Times the jitted, sharded train step on synthetic tokens (the data pipeline is measured by its
own tests), median over `--steps` after a warm-up. The peer, measured in the same run, is the
device's own large-matmul FLOP/s (8192^3 on an accelerator; a 4096^3 one reads low and noisy):
`ratio` is the model's achieved FLOP/s over it. MFU is against the datasheet peak where the
device kind is known (none on CPU). `--compile_depths` compiles the step at several depths with
and without scan over layers: scanned compile time should stay flat.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_research import config as config_lib
from llm_research.metrics import median_seconds, peak_flops_per_device
from llm_research.train import Trainer

# LLaMA-shaped sizes (SwiGLU mlp ~ 8/3 embed, vocab 32k).
PRESETS = {
    "125m": dict(num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12, head_dim=64,
                 mlp_dim=2048),
    "350m": dict(num_layers=24, embed_dim=1024, num_heads=16, num_kv_heads=16, head_dim=64,
                 mlp_dim=2816),
}


class _Vocab:
  """Stands in for a tokenizer: only the vocab size matters for throughput."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


def synthetic_batch(config, seed=0):
  rows, length = config.train.batch_size // jax.process_count(), config.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 255, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}

def matmul_flops_per_s(size: int, dtype) -> float:
  """The peer: a large square matmul's FLOP/s on this device, in the compute dtype."""
  a = jax.random.normal(jax.random.key(1), (size, size), dtype)
  b = jax.random.normal(jax.random.key(2), (size, size), dtype)
  matmul = jax.jit(jnp.dot)
  return 2 * size**3 / median_seconds(lambda: matmul(a, b), 5)


def measure_step(config, vocab_size: int, steps: int) -> dict:
  trainer = Trainer(config, _Vocab(vocab_size))
  state = trainer.init_state()
  batch = synthetic_batch(config)
  start = time.perf_counter()
  state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start

  def one_step():
    nonlocal state
    state, m = trainer.step(state, batch)
    return m
  seconds = median_seconds(one_step, steps)
  tokens = config.train.batch_size * config.data.seq_len
  flops = trainer.model_config.flops_per_token(config.data.seq_len) * tokens
  return dict(params=trainer.model_config.num_params(), step_s=seconds, tokens_per_s=tokens /
              seconds, flops_per_s=flops / seconds, compile_and_first_step_s=first)


def compile_seconds(config, vocab_size: int, depth: int, scan: bool) -> float:
  config = config_lib.with_overrides(config, [f"model.num_layers={depth}",
                                                f"model.scan_layers={scan}"])
  trainer = Trainer(config, _Vocab(vocab_size))
  abstract = trainer.abstract_state()
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), synthetic_batch(config))
  start = time.perf_counter()
  trainer.lower_step(abstract, batch).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="experiments/quickstart.py")
  parser.add_argument("--preset", choices=sorted(PRESETS))
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--compile_depths", default="", help="e.g. 4,8,16,32")
  args, rest = parser.parse_known_args()
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  if len(overrides) != len(rest):
    parser.error(f"unrecognized arguments: {[a for a in rest if not a.startswith('--config.')]}")
  if args.preset:
    overrides = [f"model.{k}={v}" for k, v in PRESETS[args.preset].items()] + overrides
  config = config_lib.load_config(args.config, overrides)

  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}")
  result = measure_step(config, args.vocab_size, args.steps)
  dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
  peer = matmul_flops_per_s(8192 if device.platform != "cpu" else 1024, dtype) \
      * jax.device_count()
  peak = peak_flops_per_device(config.train.peak_flops_per_device)
  mfu = f"{result['flops_per_s'] / (peak * jax.device_count()):.1%}" if peak else "n/a"
  print(f"\nmodel {result['params'] / 1e6:.1f}M params, batch {config.train.batch_size} x "
        f"{config.data.seq_len} tokens, dtype {config.model.dtype}, "
        f"remat {config.model.remat_policy}, mesh {config.mesh.to_dict()}")
  print("| step (ms) | tokens/s | model TFLOP/s | matmul peer TFLOP/s | ratio | MFU | "
        "compile + first step (s) |")
  print("|---|---|---|---|---|---|---|")
  print(f"| {result['step_s'] * 1e3:.1f} | {result['tokens_per_s']:,.0f} | "
        f"{result['flops_per_s'] / 1e12:.3f} | {peer / 1e12:.3f} | "
        f"{result['flops_per_s'] / peer:.2f} | {mfu} | {result['compile_and_first_step_s']:.1f} |")

  if args.compile_depths:
    print("\ncompile time of the train step (s)\n| layers | scan | loop |\n|---|---|---|")
    for depth in [int(d) for d in args.compile_depths.split(",")]:
      scanned = compile_seconds(config, args.vocab_size, depth, True)
      looped = compile_seconds(config, args.vocab_size, depth, False)
      print(f"| {depth} | {scanned:.1f} | {looped:.1f} |", flush=True)


if __name__ == "__main__":
  main()

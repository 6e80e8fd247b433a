"""BitNet b1.58 generation: packed weights through the ternary kernel vs the same model in bf16.

    python experiments/benchmarks/bitnet_generation.py [--preset 1b|tiny] [--batches 1,16]
        [--new_tokens 128] [--prompt_len 16] [--repeats 3] [--out results.md]

One random BitNet model (`--preset`: "1b", 1.03B params with Llama-like widths, for a GPU;
"tiny", which runs on a CPU in under a minute) served two ways by `decode.generate`
(greedy, KV cache, one jitted prefill + decode scan):
  ternary  `pack_params`' output: 2-bit projections through `ternary_matmul` (impl auto:
           the Pallas kernel for decode rows, the unpacked dense dot for prefill rows on
           GPU/TPU; the jnp reference on CPU);
  bf16     the dense model (`linear_impl="dense"`) holding the same weights, dequantized
           (W = t * mean|W|), without BitLinear's norm and int8 activations: the usual peer.
Every other float param (embedding, tied head, norms, scales) is bfloat16 in both, and both
compute in bfloat16. tokens/s = batch * new tokens / the median time of a whole `generate`
call (its prefill of a `--prompt_len` prompt included), after a warm-up that compiles it.
Memory: the params' bytes; on a GPU also the allocator's peak bytes in use after each model's
runs (a high-water mark of the process: the ternary model runs first and its params are freed
before the bf16 model's arrive, so the bf16 figure is its own unless the ternary one was
higher). Params are built and packed on the host CPU so that device peaks are generation's
own; for "1b" that takes ~160 s on 2 busy CPU cores, and host memory peaks near 10 GiB.
"""
import argparse
import dataclasses
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_research.decode import generate
from llm_research.kernels.ternary_matmul import unpack_weights
from llm_research.methods.ternary_packing import abstract_params, pack_params, param_bytes
from llm_research.metrics import median_seconds
from llm_research.models import TransformerConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
from report import header  # noqa: E402  (experiments/report.py, beside experiments/benchmarks)

PRESETS = {
    # 1.03B params (tied embedding): 22 layers of d=2048 with grouped-query attention, SwiGLU
    # 5632, a 32k vocab (TinyLlama's widths); projections from 2048 x 256 to 5632 x 2048.
    "1b": dict(vocab_size=32000, num_layers=22, embed_dim=2048, num_heads=32, num_kv_heads=4,
               head_dim=64, mlp_dim=5632),
    "tiny": dict(vocab_size=256, num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384),
}


def dequantized(dense_target, packed):
  """The packed model's params with each {"packed_kernel", "kernel_scale"} back as a dense
  bf16 "kernel" t * scale, shaped as in `dense_target` (the dense model's abstract params)."""
  if not isinstance(packed, dict):
    return packed
  if "packed_kernel" in packed:
    # bf16 directly (t * scale is exact in it, t being -1, 0 or 1): a 1B model's float32
    # copy would double the host memory this needs.
    scale = packed["kernel_scale"].astype(jnp.bfloat16)[..., None, None]  # [layers] or []
    weights = unpack_weights(packed["packed_kernel"], jnp.bfloat16) * scale  # [..., K, N]
    return {"kernel": weights.reshape(dense_target["kernel"].shape)}
  return {k: dequantized(dense_target[k], packed[k]) for k in packed}


def to_bf16(params):
  """Float leaves to bfloat16; the packed uint8 weights stay as they are."""
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def build_models(preset: str):
  """(config, host params) of the ternary-packed model and of its bf16 twin."""
  bitnet = TransformerConfig(**PRESETS[preset], linear_impl="bitnet", dtype="bfloat16")
  dense = dataclasses.replace(bitnet, linear_impl="dense")
  with jax.default_device(jax.devices("cpu")[0]):
    latent = nn.meta.unbox(jax.jit(bitnet.make_model().init)(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    packed_config, packed = pack_params(bitnet, latent)
    del latent
    dense_params = to_bf16(dequantized(abstract_params(dense), packed))
    packed = to_bf16(packed)
  return {"ternary": (packed_config, packed), "bf16": (dense, dense_params)}


def peak_bytes(device) -> int | None:
  stats = device.memory_stats()  # None on CPU
  return stats and stats.get("peak_bytes_in_use")


def tokens_per_second(config, params, batch: int, args, rng) -> float:
  """New tokens a second of `generate` on `batch` random prompts (their prefill included)."""
  prompts = rng.integers(0, config.vocab_size, (batch, args.prompt_len)).tolist()
  seconds = median_seconds(
      lambda: generate(config, params, prompts, max_new_tokens=args.new_tokens), args.repeats)
  return batch * args.new_tokens / seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
  parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--prompt_len", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="", help="also write the report (markdown) here")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  device = jax.devices()[0]

  start = time.perf_counter()
  models = build_models(args.preset)
  print(f"built and packed on the host in {time.perf_counter() - start:.0f} s", flush=True)
  rng = np.random.default_rng(0)
  results = {}  # model -> {batch: tokens/s}, and its param bytes and peak bytes
  for name in ("ternary", "bf16"):  # ternary first: see the docstring on peak bytes
    config, host_params = models.pop(name)
    params = jax.device_put(host_params, device)
    del host_params
    speeds = {}
    for batch in batches:
      speeds[batch] = tokens_per_second(config, params, batch, args, rng)
      print(f"{name}, batch {batch}: {speeds[batch]:.1f} tokens/s", flush=True)
    results[name] = dict(speeds=speeds, params=param_bytes(params), peak=peak_bytes(device))
    del params

  mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"
  table = ["| model | " + " | ".join(f"tokens/s, batch {b}" for b in batches)
           + " | param MiB | peak MiB |", "|---|" + "---|" * (len(batches) + 2)]
  for name, r in results.items():
    table.append(f"| {name} | " + " | ".join(f"{r['speeds'][b]:.1f}" for b in batches)
                 + f" | {mib(r['params'])} | {mib(r['peak'])} |")
  ternary, bf16 = results["ternary"], results["bf16"]
  table.append("| ternary / bf16 | " + " | ".join(
      f"{ternary['speeds'][b] / bf16['speeds'][b]:.2f}x" for b in batches)
               + f" | {ternary['params'] / bf16['params']:.2f}x | "
               + ("n/a" if ternary["peak"] is None else f"{ternary['peak'] / bf16['peak']:.2f}x")
               + " |")
  sizes = PRESETS[args.preset]
  lines = header(f"BitNet generation: ternary-packed vs bf16, preset {args.preset}",
                 "python experiments/benchmarks/bitnet_generation.py " + " ".join(sys.argv[1:]),
                 time.perf_counter() - start)
  lines += [f"Device {device.device_kind} ({device.platform}); model {sizes}; greedy, prompt "
            f"{args.prompt_len} tokens, {args.new_tokens} new tokens per row; median of "
            f"{args.repeats}.", ""] + table
  text = "\n".join(lines) + "\n"
  print("\n" + text, end="")
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()

"""Float vs BitNet b1.58 transformers of three sizes on the stdlib corpus, same tokens.

    python experiments/bitnet_vs_fp.py --workdir /tmp/bitnet_vs_fp [--sizes s,m,l]
        [--steps 300] [--out experiments/results/bitnet_vs_fp]

Each size trains twice from the same seed on the same batches (byte tokenizer, so no tokenizer
training): `linear_impl=dense` with the cosine schedule, and `linear_impl=bitnet` with the
paper's two-stage schedule (`--bitnet_schedule`). Writes `<out>.md` (validation loss, params,
weight memory float32 / bf16 / packed) and `<out>.png` (validation loss vs size). Packed memory
is that of `pack_params`' output: 2-bit projections, float32 embedding, norms and scales.
Re-running on the same workdir resumes (finished runs are read back from their metrics).
"""
import argparse
import datetime
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.config import base_config
from llm_research.data.tokenizers import ByteTokenizer
from llm_research.methods.ternary_packing import pack_params, param_bytes
from llm_research.training import model_config_from, train_and_evaluate
from report import write

SIZES = {
    "s": dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=176),
    "m": dict(num_layers=3, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
              mlp_dim=352),
    "l": dict(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
              mlp_dim=704),
}


def run_config(size: str, linear_impl: str, args):
  config = base_config()
  config.model.update(**SIZES[size], linear_impl=linear_impl)
  config.data.update(source="stdlib", stdlib_config=args.corpus, tokenizer="byte", seq_len=128)
  schedule = args.bitnet_schedule if linear_impl == "bitnet" else "cosine"
  config.train.update(steps=args.steps, batch_size=16, learning_rate=args.learning_rate,
                      warmup_steps=max(args.steps // 10, 1), schedule=schedule,
                      eval_every=args.steps, eval_batches=16, log_every=max(args.steps // 10, 1),
                      checkpoint_every=args.steps, progress_bar=False)
  return config


def final_eval_loss(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if "eval_loss" in r][-1]["eval_loss"]


def weight_memory(config, vocab_size: int) -> dict:
  """Bytes of the float32 params, as bf16, and packed (shapes only: random init params)."""
  cfg = model_config_from(config, vocab_size)
  params = nn.meta.unbox(jax.jit(cfg.make_model().init)(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  _, packed = pack_params(cfg, params)
  return dict(params=sum(x.size for x in jax.tree.leaves(params)),
              float32_mb=param_bytes(params) / 2**20, bf16_mb=param_bytes(params) / 2**21,
              packed_mb=param_bytes(packed) / 2**20)


def write_results(rows: list[dict], args, seconds: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  lines = [
      "# Float vs BitNet b1.58: validation loss vs size",
      "",
      f"Command: `python experiments/bitnet_vs_fp.py --sizes {args.sizes} --steps {args.steps} "
      f"--corpus {args.corpus}`  ",
      f"Machine: {platform.machine()} {jax.devices()[0].device_kind}, "
      f"{os.cpu_count()} cores; date {datetime.date.today()}; took {seconds / 60:.1f} min.  ",
      f"Data: stdlib `{args.corpus}` corpus, byte tokenizer, seq_len 128, batch 16, same "
      f"batches for both; lr {args.learning_rate}; float: cosine, b1.58: {args.bitnet_schedule}.",
      "",
      "| size | params | float val loss | b1.58 val loss | float32 MiB | bf16 MiB "
      "| packed b1.58 MiB |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['dense']:.3f} | "
                 f"{r['bitnet']:.3f} | {r['float32_mb']:.2f} | {r['bf16_mb']:.2f} | "
                 f"{r['packed_mb']:.2f} |")
  write(args.out + ".md", lines)

  fig, ax = plt.subplots(figsize=(5, 3.5))
  sizes = [r["params"] for r in rows]
  ax.plot(sizes, [r["dense"] for r in rows], "o-", label="float (dense)")
  ax.plot(sizes, [r["bitnet"] for r in rows], "s-", label="BitNet b1.58")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title(f"stdlib corpus, {args.steps} steps")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--sizes", default="s,m,l", help=f"comma-separated, of {sorted(SIZES)}")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--bitnet_schedule", default="two_stage",
                      choices=["two_stage", "cosine", "linear"])
  parser.add_argument("--corpus", default="full", choices=["full", "tiny"])
  parser.add_argument("--out", default="experiments/results/bitnet_vs_fp")
  args = parser.parse_args()
  start = time.perf_counter()
  rows = []
  for size in args.sizes.split(","):
    row = dict(size=size)
    for impl in ("dense", "bitnet"):
      config = run_config(size, impl, args)
      workdir = os.path.join(args.workdir, f"{size}_{impl}")
      train_and_evaluate(config, workdir)
      row[impl] = final_eval_loss(workdir)
    row.update(weight_memory(run_config(size, "bitnet", args), ByteTokenizer.vocab_size))
    rows.append(row)
  write_results(rows, args, time.perf_counter() - start)


if __name__ == "__main__":
  main()

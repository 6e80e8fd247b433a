"""Peak host memory of `llm_research.convert.from_hf` against the checkpoint's size, same run.

    python experiments/benchmarks/convert_memory.py [--layers 8] [--embed 1024] [--mlp 4096]
        [--vocab 32000] [--dtype bfloat16] [--shard_mb 200]

Writes a random Llama-shaped checkpoint (sharded safetensors, `--dtype` on disk) with the
converter's own to_hf, then reads it in a fresh process for each reader and reports that
process's peak resident memory (VmHWM, Linux) above its resident memory after the imports: ours
(from_hf: float32 params on the device, which on CPU is host memory), and, where `transformers` is
installed, the peer `AutoModelForCausalLM.from_pretrained` (float32 too). The floor for a
float32 model in memory is its float32 size, printed beside them.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

READERS = {
    "llm_research from_hf": "from llm_research import convert; convert.from_hf({path!r})",
    "transformers from_pretrained (peer)": (
        "import torch, transformers; transformers.AutoModelForCausalLM.from_pretrained("
        "{path!r}, dtype=torch.float32)"),
}
# Linux: writing 5 to clear_refs resets the process's resident high-water mark (VmHWM), so
# the peak is the read's, not the imports'.
MEASURE = """
def kb(field):
  return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
{imports}
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS:")
{read}
print((kb("VmHWM:") - before) / 1024)
"""


def write_checkpoint(path: str, args) -> int:
  """A random checkpoint in `path`; returns its float32 parameter bytes."""
  from llm_research import convert
  from llm_research.models.transformer import TransformerConfig
  config = TransformerConfig(vocab_size=args.vocab, num_layers=args.layers, embed_dim=args.embed,
                             num_heads=args.embed // 128, num_kv_heads=args.embed // 512,
                             head_dim=128, mlp_dim=args.mlp, tie_embeddings=False)
  abstract = jax.eval_shape(config.make_model().init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) * 0.02,
                        jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, abstract,
                                     is_leaf=lambda x: hasattr(x, "value")))
  convert.to_hf(config, params, path, dtype=args.dtype, max_shard_bytes=args.shard_mb * 2**20)
  return 4 * config.num_params()


def peak_mb(reader: str, path: str) -> float | None:
  imports, read = reader.split("; ", 1) if "; " in reader else ("", reader)
  code = MEASURE.format(imports=imports, read=read.format(path=path))
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if result.returncode:
    print(f"  failed: {result.stderr.strip().splitlines()[-1:]}")
    return None
  return float(result.stdout.split()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--embed", type=int, default=1024)
  parser.add_argument("--mlp", type=int, default=4096)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--shard_mb", type=int, default=200)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as path:
    f32_bytes = write_checkpoint(path, args)
    on_disk = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    print(f"device: {jax.devices()[0].device_kind}; checkpoint {on_disk / 2**20:.0f} MB on disk "
          f"({args.dtype}), {f32_bytes / 2**20:.0f} MB as float32 params")
    print(f"{'reader':40s} {'peak MB above baseline':>24s} {'/ float32 size':>15s}")
    for name, reader in READERS.items():
      peak = peak_mb(reader, path)
      if peak is not None:
        print(f"{name:40s} {peak:24.0f} {peak / (f32_bytes / 2**20):15.2f}")


if __name__ == "__main__":
  main()

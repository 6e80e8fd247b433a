"""Peak host memory of `llm_research.convert.from_hf` against the checkpoint's size, same run.

    python experiments/benchmarks/convert_memory.py [--layers 8] [--embed 1024] [--mlp 4096]
        [--vocab 32000] [--dtype bfloat16] [--shard_mb 200] [--out results.md]

Writes a random Llama-shaped checkpoint (sharded safetensors, `--dtype` on disk) with the
converter's own to_hf, then reads it in a fresh process for each reader and reports that
process's peak resident memory (VmHWM, Linux) above its resident memory after the imports: ours
(from_hf, scanned and looped: float32 params placed on the device, which on CPU is host memory;
and sharded over 8 CPU devices, fsdp=8, each holding an eighth of each param), and, where
`transformers` is installed, the peer `AutoModelForCausalLM.from_pretrained` (float32 too). The
floor for a float32 model in memory is its float32 size, printed beside them; a reader that
built the model on the host before placing it (or stacked the scanned layers there) would need
about twice that.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import header, write  # noqa: E402  (experiments/report.py)

OURS = "from llm_research import convert, sharding"
READERS = {  # name: (imports, the read)
    "llm_research from_hf (scanned)": (OURS, "convert.from_hf({path!r})"),
    "llm_research from_hf (looped)": (OURS, "convert.from_hf({path!r}, scan_layers=False)"),
    # Each device holds an eighth of each param: together, the model once.
    "llm_research from_hf, 8 CPU devices, fsdp=8 (scanned)": (
        "import os; os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'; "
        + OURS, "convert.from_hf({path!r}, mesh=sharding.make_mesh(dict(data=1, fsdp=8, "
        "tensor=1, expert=1)))"),
    "transformers from_pretrained (peer)": (
        "import torch, transformers", "transformers.AutoModelForCausalLM.from_pretrained("
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


def peak_mb(reader: tuple[str, str], path: str) -> float | None:
  imports, read = reader
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
  parser.add_argument("--out", default="", help="also write the report (markdown) here")
  args = parser.parse_args()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as path:
    f32_mb = write_checkpoint(path, args) / 2**20
    on_disk = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) / 2**20
    peaks = {name: peak_mb(reader, path) for name, reader in READERS.items()}
  rows = [f"| {name} | {peak:.0f} | {peak / f32_mb:.2f} |" for name, peak in peaks.items()
          if peak is not None]
  largest_mb = 4 * args.vocab * args.embed / 2**20  # the embedding and the head, float32
  lines = header(f"Peak host memory of a checkpoint conversion: {on_disk:.0f} MB on disk "
                 f"({args.dtype}, shards of {args.shard_mb} MB), {f32_mb:.0f} MB as float32 "
                 "params", "python experiments/benchmarks/convert_memory.py "
                 + " ".join(sys.argv[1:]), time.perf_counter() - start)
  lines += ["", f"A Llama of {args.layers} layers, embed {args.embed}, mlp {args.mlp}, vocab "
            f"{args.vocab} (untied). Peak resident memory of a fresh process reading the "
            "checkpoint, above its memory after the imports; the float32 params themselves "
            "(the output: on CPU the device is the host) are 1.00 of the float32 size.", "",
            "| reader | peak MB above baseline | / float32 size |", "|---|---|---|", *rows, "",
            f"Beyond the params, a reader holds the tensor in flight: the largest here (the "
            f"embedding, the head) is {largest_mb:.0f} MB as float32 ({largest_mb / f32_mb:.2f} "
            "of the float32 size), read from disk and converted, plus the runtime's own "
            "buffers. A reader that put the whole model on the host before placing it would "
            "need twice the float32 size at least."]
  if args.out:
    write(args.out, lines)
  else:
    print("\n".join(lines))


if __name__ == "__main__":
  main()

"""LTE's communication: bytes of collectives per step, LTE against data-parallel training of the
same model, read from the compiled programs (no timing: the bytes XLA will move).

    python experiments/benchmarks/lte_communication.py [--config experiments/quickstart.py] \
        [--devices 8] [--merge_every 1,10,100] [--config.lte.heads=8 ...]

Runs on `--devices` fake CPU devices unless real accelerators are there (then on those), with
the mesh's data axis over all of them. The peer is the ordinary data-parallel step
(`train.method=standard`): it all-reduces every gradient every step. LTE's step is split at its
merge (an after-step conditional): outside it, the heads exchange the metrics' scalars only;
inside it, every T steps, the kernels' update and the replicas' mean are all-reduced. Bytes per
step = outside + inside / T, per device, as the collectives' result sizes in the compiled
program (`sharding.collective_bytes`). One LTE head per device unless --config.lte.heads says
otherwise; the rank by the recipe (heads x rank >= width) unless --config.lte.rank does.
"""
import argparse
import os
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="experiments/quickstart.py")
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (on CPU)")
  parser.add_argument("--merge_every", default="1,10,100", help="values of T in the table")
  args, overrides = parser.parse_known_args(argv)
  return args, [o.removeprefix("--config.") for o in overrides]


def main(argv=None):
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  import jax  # after XLA_FLAGS: the fake devices exist only if set before JAX starts
  import jax.numpy as jnp

  from llm_research import config as config_lib
  from llm_research import sharding
  from llm_research.training import Trainer

  class Vocab:  # only the vocab size matters here
    vocab_size = 4096

  def compiled_text(method_overrides):
    config = config_lib.load_config(args.config, ["mesh.data=-1", *method_overrides,
                                                  *overrides])
    trainer = Trainer(config, Vocab())
    rows, length = config.train.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.int32,
                                     sharding=sharding.batch_sharding(trainer.mesh,
                                                                      trainer.rules))
             for k in ("inputs", "targets", "segment_ids", "positions")}
    return config, trainer, trainer.lower_step(trainer.abstract_state(), batch).compile() \
        .as_text()

  _, trainer, dp_text = compiled_text(["train.method=standard"])
  data_parallel = sum(sharding.collective_bytes(dp_text).values())
  config, lte_trainer, lte_text = compiled_text(["train.method=lte",
                                                 f"lte.heads={jax.device_count()}"])
  outside = sum(sharding.collective_bytes(lte_text, in_conditionals=False).values())
  inside = sum(sharding.collective_bytes(lte_text, in_conditionals=True).values())
  settings = lte_trainer.method.lte
  params = trainer.model_config.num_params()

  device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  print(f"device: {device}; mesh {dict(trainer.mesh.shape)}; {args.config} "
        f"({params / 1e6:.2f}M params, width {getattr(trainer.model_config, 'embed_dim', '?')});"
        f" LTE heads {settings.heads} x rank {settings.rank}, main {settings.main_dtype}")
  print()
  print("| method | T | bytes per step per device | of data parallel |")
  print("|---|---|---|---|")
  print(f"| data parallel (peer) | - | {data_parallel:,} | 1 |")
  for merge_every in (int(t) for t in args.merge_every.split(",")):
    per_step = outside + inside / merge_every
    print(f"| LTE | {merge_every} | {per_step:,.0f} | {per_step / data_parallel:.4f} |")
  print()
  print(f"LTE outside the merge: {outside:,} bytes a step; the merge: {inside:,} bytes "
        f"(params: {4 * params:,} bytes in float32)")


if __name__ == "__main__":
  main()

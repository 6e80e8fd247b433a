"""LTE's heads over 8 fake devices, for tests/test_lte.py.

Imported by the test (one CPU device: the reference) and run as a subprocess on 8 fake devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lte_worker.py OUT.npz

`run` trains the tiny config with 8 LTE heads for STEPS steps (a merge at step 2) under the
mesh its overrides give, and returns the losses, the heads' adapters, the main params and the
heads' layout. The subprocess adds, from the compiled step on mesh data=8, the bytes of its
collectives outside the merge (every step) and inside it (every T steps), and the message of a
head count the mesh cannot spread.
"""
import json
import os
import sys

import jax
import numpy as np

from llm_research import config as config_lib
from llm_research import sharding, training
from llm_research.data import ByteTokenizer

TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_config.py")
STEPS = 3
LTE = ["train.method=lte", "lte.heads=8", "lte.rank=4", "lte.alpha=32", "lte.merge_every=2",
       "train.warmup_steps=0"]


def batches(count: int):
  rng = np.random.default_rng(3)
  for _ in range(count):
    tokens = rng.integers(3, 259, (8, 33), dtype=np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": np.ones((8, 32), np.int32),
           "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32))}


def flatten(tree, prefix="") -> dict:
  return {prefix + training.param_path(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run(overrides=(), collectives=False) -> dict:
  config = config_lib.load_config(TINY_CONFIG, [*LTE, *overrides])
  trainer = training.Trainer(config, ByteTokenizer())
  state = trainer.init_state()
  result = {}
  if collectives:  # bytes per device outside and inside the merge (a conditional)
    batch = sharding.shard_batch(next(batches(1)), trainer.mesh, trainer.rules)
    compiled = trainer.lower_step(state, batch).compile().as_text()
    result["collectives"] = {
        part: sharding.collective_bytes(compiled, in_conditionals=inside)
        for part, inside in (("local_step", False), ("merge", True))}
  losses = []
  for batch in batches(STEPS):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  heads = flatten(state.params.heads, "heads/")
  return {**result, "mesh": dict(trainer.mesh.shape), "losses": losses,
          "layout": {name: [str(x.sharding.spec), list(x.addressable_shards[0].data.shape)]
                     for name, x in heads.items()},
          "arrays": {name: np.asarray(x) for name, x in {
              **heads, **flatten(trainer.model_params(state), "main/")}.items()}}


def refusal() -> str:
  config = config_lib.load_config(TINY_CONFIG, ["train.method=lte", "lte.heads=4",
                                                "mesh.data=8"])
  try:
    training.checked_mesh(config)
  except config_lib.ConfigError as error:
    return str(error)
  return ""


def main(out_path: str):
  assert jax.device_count() == 8, jax.devices()
  result = run(["mesh.data=8"], collectives=True)
  arrays = result.pop("arrays")
  summary = {**result, "refusal": refusal()}
  np.savez(out_path, summary=json.dumps(summary), **arrays)


if __name__ == "__main__":
  main(*sys.argv[1:])

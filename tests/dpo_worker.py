"""DPO train steps on the tiny config's preference pairs under a mesh, for tests/test_dpo.py.

Imported by the test (one CPU device, no gradient accumulation: the reference) and run as a
subprocess on 8 fake devices (data 2 x fsdp 2 x tensor 2, two micro-batches a step):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/dpo_worker.py OUT.npz
"""
import os
import sys

import jax
import numpy as np

from llm_research import config as config_lib
from llm_research import data, training

TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_config.py")
DPO = ["train.method=dpo", "data.source=preferences", "data.seq_len=192",
       "train.warmup_steps=0", "dpo.beta=0.5"]
EIGHT = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=2"]
STEPS = 3


def run(overrides=()) -> dict:
  """STEPS steps of `Trainer.step` (sharded state and batches, the jitted step): the metrics
  of each step and the final policy and reference params, as numpy arrays by name."""
  config = config_lib.load_config(TINY_CONFIG, [*DPO, *overrides])
  tokenizer = data.get_tokenizer(config.data)
  trainer = training.Trainer(config, tokenizer)
  state = trainer.init_state()
  batches = data.make_train_iterator(config.data, tokenizer, global_batch_size=8, seed=0,
                                     process_index=0, process_count=1)
  result = {}
  for step in range(STEPS):
    state, metrics = trainer.step(state, next(batches))
    for name, value in metrics.items():
      result[f"metrics|{name}|{step}"] = np.asarray(value)
  for part in ("policy", "reference"):
    for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state.params, part)):
      result[f"{part}|{training.param_path(path)}"] = np.asarray(leaf)
  return result


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  np.savez(sys.argv[1], **run(EIGHT))

"""Train steps of the tiny config under a mesh, for tests/test_sharding.py.

Imported by the test (one CPU device: the reference) and run as a subprocess on 8 fake devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.npz

The subprocess runs `STEPS` real train steps (`Trainer.step`: sharded init, sharded batches, the
jitted step with its in/out shardings) under each mesh of `MESHES`, and saves per mesh the
losses (and MoE's dropped tokens), the first step's full gradient, the final params, how params
and grads are laid out, the all-gathers and all-to-alls in the compiled step and the bytes its
collectives move; plus the messages of the configs 8 devices cannot run. The one-device side
runs each model variant of `VARIANTS` that a mesh uses.
"""
import json
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_research import config as config_lib
from llm_research import main as cli
from llm_research import sharding, training
from llm_research.data import ByteTokenizer
from llm_research.methods.ternary_packing import pack_params

TINY_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_config.py")
STEPS = 3
# Model variants (overrides of the tiny config), each run on one device as the reference. The
# Pallas flash attention (interpret mode on CPU) takes head_dim 64 at least.
VARIANTS = {
    "xla": [],
    "pallas": ["model.attention_impl=pallas", "model.head_dim=64"],
    # MoE through the capacity path (capacity 16 of 32 tokens a row: some copies dropped).
    "moe": ["model.mlp_impl=moe", "model.moe.num_experts=4", "model.moe.capacity_factor=1.0"],
    # MoE through the dropless path (top-2: tokens exchanged with the experts' devices).
    "moe_dropless": ["model.mlp_impl=moe", "model.moe.num_experts=4"],
}
MESH_3D = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
MESHES = {  # name -> (model variant, overrides); batch_size 8 splits over the batch axes in each
    "data8": ("xla", ["mesh.data=8"]),
    "data2_fsdp2_tensor2": ("xla", MESH_3D),
    "fsdp4_tensor2": ("xla", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]),
    "data4_tensor2_accum2": ("xla", ["mesh.data=-1", "mesh.tensor=2", "train.grad_accum=2"]),
    "data2_fsdp2_tensor2_pallas": ("pallas", MESH_3D),
    "data4_expert2_moe": ("moe", ["mesh.data=4", "mesh.expert=2"]),
    "data2_expert4_moe_dropless": ("moe_dropless", ["mesh.data=2", "mesh.expert=4"]),
    "fsdp2_expert4_moe_dropless": ("moe_dropless", ["mesh.data=1", "mesh.fsdp=2",
                                                    "mesh.expert=4"]),
}
# The XLA attention at the Pallas variant's sizes and mesh: all-gathers the kernel may not exceed.
XLA_YARDSTICK = MESH_3D + ["model.head_dim=64"]
# Leaves whose layout the test checks, by path.
WATCHED = ("embedding", "layers/mlp/gate/kernel", "layers/mlp/down/kernel",
           "layers/attn/query/kernel", "layers/attn/key/kernel", "layers/attn/out/kernel",
           "layers/attn_norm/scale")


def grad_recorder(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, with the last gradient it was given kept in its state: (inner state, grads)."""
  def init(params):
    return inner.init(params), jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    updates, inner_state = inner.update(grads, state[0], params)
    return updates, (inner_state, grads)

  return optax.GradientTransformation(init, update)


def batches(config, count: int):
  """Deterministic packed batches: two documents per row, then some padding."""
  rng = np.random.default_rng(1)
  rows, length = config.train.batch_size, config.data.seq_len
  for _ in range(count):
    tokens = rng.integers(3, 259, (rows, length + 1), dtype=np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for row in range(rows):
      split, end = rng.integers(1, length // 2), rng.integers(length // 2, length + 1)
      segment_ids[row, :split], segment_ids[row, split:end] = 1, 2
      positions[row, :split], positions[row, split:end] = np.arange(split), np.arange(end - split)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
           "positions": positions}


def flatten(tree) -> dict:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run(overrides=()) -> dict:
  """Trains STEPS steps under the mesh `overrides` give; numpy results and layouts."""
  config = config_lib.load_config(TINY_CONFIG, overrides)
  make_optimizer = training.standard.make_optimizer
  training.standard.make_optimizer = lambda tc: grad_recorder(make_optimizer(tc))
  try:
    trainer = training.Trainer(config, ByteTokenizer())
  finally:
    training.standard.make_optimizer = make_optimizer
  state = trainer.init_state()
  first_batch = sharding.shard_batch(next(batches(config, 1)), trainer.mesh, trainer.rules)
  compiled = trainer.lower_step(state, first_batch).compile().as_text()
  init_layout = {name: (str(leaf.sharding.spec), leaf.addressable_shards[0].data.shape)
                 for name, leaf in flatten(state.params).items() if name in WATCHED}
  losses, grads, dropped = [], None, []
  for batch in batches(config, STEPS):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
    dropped.append(float(metrics.get("moe_dropped_tokens", 0)))
    if grads is None:
      grads = flatten(state.opt_state[1])
      grad_layout = {name: str(grads[name].sharding.spec) for name in WATCHED}
      grads = {name: np.asarray(g) for name, g in grads.items()}
  return {"mesh": dict(trainer.mesh.shape), "losses": losses, "grads": grads,
          "params": {name: np.asarray(p) for name, p in flatten(state.params).items()},
          "init_layout": init_layout, "grad_layout": grad_layout,
          "all_gathers": len(re.findall(r"\ball-gather(?:-start)?\(", compiled)),
          "all_to_alls": len(re.findall(r"\ball-to-all(?:-start)?\(", compiled)),
          "all_gather_shapes": re.findall(r"= \(?\w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(",
                                          compiled),
          "collective_bytes": sharding.collective_bytes(compiled),
          "dropped_tokens": dropped}


def packed_logits(mesh_overrides=()) -> np.ndarray:
  """Logits of a tiny BitNet model packed to 2 bits (the ternary matmul runs per device inside
  shard_map under a mesh), on fixed tokens, under the mesh `mesh_overrides` give."""
  config = config_lib.load_config(TINY_CONFIG, ["model.linear_impl=bitnet", *mesh_overrides])
  bitnet = training.model_config_from(config, ByteTokenizer.vocab_size)
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 259, (8, 32)), jnp.int32)
  params = nn.meta.unbox(jax.jit(bitnet.make_model().init)(jax.random.key(0), tokens))["params"]
  packed_config, packed = pack_params(bitnet, jax.device_get(params))
  model = packed_config.make_model()
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  shardings = sharding.logical_shardings(
      jax.eval_shape(model.init, jax.random.key(0), tokens)["params"], mesh, rules)
  with sharding.activate(mesh, rules):
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t),
                    in_shardings=(shardings, sharding.batch_sharding(mesh, rules)))
    return np.asarray(apply(jax.device_put(packed, shardings), tokens))


def dropless_moe_grads(mesh_overrides=()) -> dict:
  """Output and gradients (params and input) of one dropless MoE layer (per device in
  shard_map under a mesh, token copies sent to their experts' devices) on fixed inputs, with a
  zero router: uniform probabilities, so every token's top 2 are experts 0 and 1 (ties: the
  lower index), the exchange's worst case (with one expert a device, each of the first two
  devices gets a copy of every token; the others get none)."""
  from llm_research.models.moe import MoE
  config = config_lib.load_config(TINY_CONFIG, ["model.mlp_impl=moe", "model.moe.num_experts=4",
                                                *mesh_overrides])
  layer = MoE(training.model_config_from(config, ByteTokenizer.vocab_size))
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 32, 32)), jnp.float32)
  probe = jnp.asarray(np.random.default_rng(4).normal(size=(8, 32, 32)), jnp.float32)
  boxed = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
  params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(config)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x) * probe)
  with sharding.activate(mesh, rules):
    rows = sharding.batch_sharding(mesh, rules)
    value, (grads, x_grad) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)),
                                     in_shardings=(shardings, rows))(
        jax.device_put(params, shardings), jax.device_put(x, rows))
  return {"loss": np.asarray(value), "x": np.asarray(x_grad),
          **{name: np.asarray(g) for name, g in flatten(grads).items()}}


def refusals(workdir: str) -> dict:
  """name -> the message of each config that 8 devices cannot run."""
  messages = {}
  for name, overrides in {
      "mesh_3": ["mesh.data=3"],
      "mesh_16": ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2"],
      "batch_12_on_8": ["mesh.data=8", "train.batch_size=12"],
      "micro_batch_4_on_8": ["mesh.data=8", "train.batch_size=8", "train.grad_accum=2"],
      "experts_6_on_expert4": ["mesh.data=2", "mesh.expert=4", "model.mlp_impl=moe",
                               "model.moe.num_experts=6"],
  }.items():
    # Through the CLI, into a workdir that must stay as it is. Were a config not refused, the
    # missing text_dir would be refused instead, with another message.
    overrides += ["data.source=text_dir", "data.text_dir=/nonexistent"]
    try:
      cli.main(["--config", TINY_CONFIG, "--workdir", workdir,
                *(f"--config.{o}" for o in overrides)])
    except SystemExit as error:
      messages[name] = error.code.removeprefix("error: ")
  return messages


def main(out_path: str, workdir: str):
  assert jax.device_count() == 8, jax.devices()
  results = {name: run(VARIANTS[variant] + overrides)
             for name, (variant, overrides) in MESHES.items()}
  arrays, summary = {}, {"refusals": refusals(workdir),
                         "xla_yardstick_all_gathers": run(XLA_YARDSTICK)["all_gathers"]}
  arrays["packed_logits"] = packed_logits(MESH_3D)
  for name, value in dropless_moe_grads(["mesh.data=2", "mesh.expert=4"]).items():
    arrays[f"dropless_moe|{name}"] = value
  for name, result in results.items():
    for kind in ("grads", "params"):
      for leaf, value in result.pop(kind).items():
        arrays[f"{name}|{kind}|{leaf}"] = value
    summary[name] = result
  np.savez(out_path, summary=json.dumps(summary), **arrays)


if __name__ == "__main__":
  main(*sys.argv[1:])

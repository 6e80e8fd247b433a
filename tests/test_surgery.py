"""Checkpoint surgeries: sparse upcycling (methods/upcycle.py) computes the dense model's function
at step 0; depth up-scaling (methods/depth_upscale.py) puts the layers where it promises and
computes what the stacking says; `train.init_from` continues a dense run through the CLI with the
surgery the config implies, reading the source run without touching it; bad input is one line.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TINY_CONFIG
from test_moe import logits_fn, random_params
from test_train import snapshot
from llm_research import main as cli
from llm_research import training
from llm_research.config import load_config
from llm_research.errors import ConfigError
from llm_research.init_from import convert
from llm_research.metrics import read_metrics
from llm_research.methods.depth_upscale import depth_upscale, source_layers
from llm_research.methods.layer_list import join_layers, split_layers
from llm_research.methods.upcycle import upcycle
from llm_research.models import TransformerConfig
from llm_research.models.moe import MoEConfig
from llm_research.models.norms import RMSNorm
from llm_research.models.transformer import Block

VOCAB = 61


def dense(moe: dict | None = None, **overrides) -> TransformerConfig:
  """A tiny transformer (`moe`: its MoE group's fields, for an MoE model)."""
  base = dict(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=48)
  return TransformerConfig(**{**base, "moe": MoEConfig(**(moe or {})), **overrides})


TOKENS = jax.random.randint(jax.random.key(0), (2, 13), 0, VOCAB)


# ---- upcycling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scan, moe_every, top_k, capacity_factor", [
    (True, 2, 2, 0.0), (False, 1, 2, 2.0), (True, 2, 1, 0.0), (False, 1, 1, 4.0)],
    ids=["scanned-every-other-dropless", "looped-every-layer-capacity",
         "top1-straight-through-dropless", "top1-straight-through-capacity"])
def test_upcycled_model_computes_the_dense_function_at_step_0(scan, moe_every, top_k,
                                                              capacity_factor):
  dense_config = dense(scan_layers=scan)
  params = random_params(dense_config, seed=2)
  moe = MoEConfig(num_experts=4, experts_per_token=top_k, every=moe_every,
                  capacity_factor=capacity_factor, top1_weight="straight_through")
  moe_config, moe_params = upcycle(dense_config, params, moe=moe, seed=3)
  assert (moe_config.mlp_impl, moe_config.moe) == ("moe", moe)
  assert moe_config.moe.renormalize_combine
  want = logits_fn(dense_config)(params, TOKENS)
  np.testing.assert_allclose(logits_fn(moe_config)(moe_params, TOKENS), want, rtol=1e-5,
                             atol=1e-5)
  # The experts are the dense MLP's copies, the routers fresh, everything else the same.
  dense_layers, dense_rest = split_layers(dense_config, params)
  moe_layers, moe_rest = split_layers(moe_config, moe_params)
  jax.tree.map(np.testing.assert_array_equal, moe_rest, dense_rest)
  for i, (old, new) in enumerate(zip(dense_layers, moe_layers)):
    jax.tree.map(np.testing.assert_array_equal,
                 {k: v for k, v in new.items() if k != "mlp"},
                 {k: v for k, v in old.items() if k != "mlp"})
    if (i + 1) % moe_every:
      jax.tree.map(np.testing.assert_array_equal, new["mlp"], old["mlp"])
      continue
    for name in ("gate", "up", "down"):
      for e in range(4):
        np.testing.assert_array_equal(new["mlp"][name]["kernel"][e], old["mlp"][name]["kernel"])
    assert new["mlp"]["router"]["kernel"].shape == (32, 4)
    assert 0 < np.std(new["mlp"]["router"]["kernel"]) < 0.1  # small, not zero


@pytest.mark.parametrize("moe", [
    dict(experts_per_token=2, renormalize_combine=False),
    dict(experts_per_token=1, top1_weight="probability")], ids=["top2-unrenormalised", "top1-p"])
def test_upcycled_model_differs_without_combine_weights_summing_to_1(moe):
  """The property above is not free: top-2's weights unrenormalised, or top-1's probability
  (Switch Transformer's weight), sum to less than 1."""
  dense_config = dense()
  params = random_params(dense_config, seed=2)
  moe_config, moe_params = upcycle(dense_config, params,
                                   moe=MoEConfig(num_experts=4, every=2, **moe))
  assert not np.allclose(logits_fn(moe_config)(moe_params, TOKENS),
                         logits_fn(dense_config)(params, TOKENS), atol=1e-3)


@pytest.mark.parametrize("source, params_of, moe, message", [
    (dense(), dense(), dict(num_experts=4, every=3),
     "model.moe.every=3 must divide num_layers=2"),
    (dense(), dense(), dict(num_experts=2, experts_per_token=3),
     "model.moe.experts_per_token=3 must be from 1 to num_experts=2"),
    (dense(lora_rank=2), dense(lora_rank=2), dict(num_experts=4),
     "upcycle: the source has LoRA adapters"),
    (dense(dict(num_experts=2), mlp_impl="moe"), dense(dict(num_experts=2), mlp_impl="moe"),
     dict(num_experts=4), "upcycle: the source has model.mlp_impl='moe'"),
    (dense(embed_dim=16), dense(), dict(num_experts=4),
     "upcycle: the params do not fit the dense config"),
], ids=["moe-every", "k-above-e", "lora", "moe-source", "shapes"])
def test_upcycle_refuses_bad_input_in_one_line(source, params_of, moe, message):
  with pytest.raises(ConfigError, match=message) as raised:
    upcycle(source, random_params(params_of), moe=MoEConfig(**moe))
  assert "\n" not in str(raised.value)


# ---- depth up-scaling ---------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False])
def test_depth_upscaling_places_the_layers_as_solar_does(scan):
  config = dense(num_layers=5, scan_layers=scan)
  params = random_params(config, seed=4)
  new_config, new_params = depth_upscale(config, params, drop=2)
  assert new_config.num_layers == 6 and source_layers(5, 2) == [0, 1, 2, 2, 3, 4]
  old_layers, old_rest = split_layers(config, params)
  new_layers, new_rest = split_layers(new_config, new_params)
  for i, old in enumerate([0, 1, 2, 2, 3, 4]):
    jax.tree.map(np.testing.assert_array_equal, new_layers[i], old_layers[old])
  jax.tree.map(np.testing.assert_array_equal, new_rest, old_rest)
  if scan:  # the stored layout: [layers, ...]
    np.testing.assert_array_equal(new_params["layers"]["mlp"]["up"]["kernel"][3],
                                  params["layers"]["mlp"]["up"]["kernel"][2])


def test_depth_upscaling_with_drop_0_applies_the_layer_stack_twice():
  """The up-scaled model's logits equal blocks 0..n-1, 0..n-1 applied one by one (each a
  Block of the old layer's params), then the final norm and the tied head."""
  config = dense(num_layers=2)
  params = random_params(config, seed=5)
  new_config, new_params = depth_upscale(config, params, drop=0)
  layers, rest = split_layers(config, params)
  block = jax.jit(lambda p, x, pos, seg: Block(config).apply({"params": p}, x, pos, seg))
  x = jnp.take(rest["embedding"], TOKENS, axis=0)
  positions = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)
  for layer in layers + layers:
    x = block(layer, x, positions, jnp.ones_like(TOKENS))
  x = RMSNorm(config.norm_eps).apply({"params": rest["final_norm"]}, x)
  want = jnp.einsum("ble,ve->blv", x, rest["embedding"]) * config.embed_dim**-0.5
  np.testing.assert_allclose(logits_fn(new_config)(new_params, TOKENS), want, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("config, drop, message", [
    (dense(), 2, "depth_upscale: drop=2 must be from 0 to num_layers - 1 = 1"),
    (dense(), -1, "depth_upscale: drop=-1 must be from 0"),
    (dense(dict(num_experts=2, every=4), num_layers=4, mlp_impl="moe"), 1,
     "model.moe.every=4 must divide num_layers=6"),
])
def test_depth_upscaling_refuses_bad_input_in_one_line(config, drop, message):
  with pytest.raises(ConfigError, match=message):
    depth_upscale(config, random_params(config), drop=drop)


def test_convert_composes_upscaling_and_upcycling_and_relays_out():
  """dense, 2 layers scanned -> MoE every other of 4 looped layers: layers [0, 1, 0, 1]."""
  source, target = dense(num_layers=2), dense(dict(num_experts=2, every=2), num_layers=4,
                                              scan_layers=False, mlp_impl="moe")
  params = random_params(source, seed=6)
  converted = convert(source, target, params, seed=0)
  old, _ = split_layers(source, params)
  new, _ = split_layers(target, converted)
  for i, j in enumerate([0, 1, 0, 1]):
    np.testing.assert_array_equal(new[i]["attn"]["query"]["kernel"],
                                  old[j]["attn"]["query"]["kernel"])
    if i % 2:
      np.testing.assert_array_equal(new[i]["mlp"]["gate"]["kernel"][1],
                                    old[j]["mlp"]["gate"]["kernel"])
  with pytest.raises(ConfigError, match="model.embed_dim is 32 there, 48 here"):
    convert(source, dataclasses.replace(target, embed_dim=48), params)


# ---- the CLI: train.init_from --------------------------------------------------------------------

QUICK = ["sample.max_new_tokens=0", "train.eval_batches=1"]


def run_cli(tiny_overrides, workdir, *overrides):
  return cli.main(["--config", TINY_CONFIG, "--workdir", str(workdir),
                   *(f"--config.{o}" for o in [*tiny_overrides, *QUICK, *overrides])])


def run(tiny_overrides, workdir, *overrides):
  """train_and_evaluate, as the CLI calls it (without its sampling and unigram baseline)."""
  config = load_config(TINY_CONFIG, [*tiny_overrides, *QUICK, *overrides])
  return training.train_and_evaluate(config, str(workdir))


def restore_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
  manager.close()
  return state["params"]


@pytest.fixture(scope="module")
def dense_run(tiny_overrides, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dense_run")
  run(tiny_overrides, workdir, "train.steps=2")
  return str(workdir)


UPCYCLE = ["model.mlp_impl=moe", "model.moe.num_experts=4", "model.moe.every=2"]
STEP_0 = ["train.steps=1", "train.learning_rate=0.0"]  # params after the step are those at 0


def test_init_from_upcycles_a_dense_run_that_computes_the_dense_function(
    dense_run, tiny_overrides, tmp_path):
  before = snapshot(dense_run)
  copied, upcycled = tmp_path / "copied", tmp_path / "upcycled"
  run(tiny_overrides, copied, f"train.init_from={dense_run}", *STEP_0)
  run_cli(tiny_overrides, upcycled, f"train.init_from={dense_run}", *STEP_0, *UPCYCLE)
  # Step 1's loss is computed with the step-0 params on the same first batch: the dense params
  # continued as they are, and upcycled.
  (plain,), (moe,) = read_metrics(str(copied)), read_metrics(str(upcycled))
  assert moe["loss"] == pytest.approx(plain["loss"], rel=1e-5)
  assert moe["aux_loss/load_balance"] > 0 and moe["moe_dropped_tokens"] == 0  # dropless
  source = restore_params(dense_run)
  params = restore_params(upcycled)
  np.testing.assert_array_equal(params["layers"]["layer_1"]["mlp"]["up"]["kernel"][0, 3],
                                source["layers"]["mlp"]["up"]["kernel"][1])
  np.testing.assert_array_equal(params["layers"]["layer_0"]["mlp"]["up"]["kernel"][0],
                                source["layers"]["mlp"]["up"]["kernel"][0])
  with open(upcycled / "config.json") as f:
    assert json.load(f)["train"]["init_from"] == dense_run
  assert snapshot(dense_run) == before  # the source run is only read
  # Re-running resumes the new run from its own checkpoint: init_from no longer matters.
  run(tiny_overrides, upcycled, "train.init_from=/nonexistent", *STEP_0, *UPCYCLE)


def test_init_from_depth_upscales_and_upcycles_in_one_go(dense_run, tiny_overrides, tmp_path):
  """2 dense layers -> 4 (drop 0: layers 0, 1, 0, 1), the second of each pair MoE."""
  run(tiny_overrides, tmp_path, f"train.init_from={dense_run}", *STEP_0, *UPCYCLE,
      "model.num_layers=4")
  source, params = restore_params(dense_run), restore_params(tmp_path)
  layers = params["layers"]  # [block, ...]: new layer 2 block + j, a copy of old layer j
  for block in range(2):
    for j in range(2):
      np.testing.assert_array_equal(layers[f"layer_{j}"]["attn"]["out"]["kernel"][block],
                                    source["layers"]["attn"]["out"]["kernel"][j])
    np.testing.assert_array_equal(layers["layer_1"]["mlp"]["down"]["kernel"][block, 2],
                                  source["layers"]["mlp"]["down"]["kernel"][1])


LTE = ["train.method=lte", "lte.heads=2", "lte.rank=4", "lte.merge_every=2"]


def test_init_from_goes_from_and_to_an_lte_run(dense_run, tiny_overrides, tmp_path):
  """An LTE run from a dense run, and a dense run from that LTE run, at a learning rate of 0:
  each evaluates what its source evaluated last (the same model params: a dense run's, or an
  LTE run's main params with the heads merged in)."""
  lte_start, lte_run, back = tmp_path / "lte_start", tmp_path / "lte", tmp_path / "back"
  run(tiny_overrides, lte_start, f"train.init_from={dense_run}", *LTE, *STEP_0)
  (dense_last,), (lte_first,) = read_metrics(dense_run)[-1:], read_metrics(str(lte_start))
  assert lte_first["eval_loss"] == pytest.approx(dense_last["eval_loss"], rel=1e-6)
  # An LTE run that learnt something (3 steps: its heads hold an update the last merge, at
  # step 2, did not), then a standard run from its main params with the heads merged in.
  run(tiny_overrides, lte_run, f"train.init_from={dense_run}", *LTE, "train.steps=3")
  run(tiny_overrides, back, f"train.init_from={lte_run}", *STEP_0)
  (lte_last,), (back_first,) = read_metrics(str(lte_run))[-1:], read_metrics(str(back))
  assert lte_last["step"] == 3 and lte_last["eval_loss"] != lte_first["eval_loss"]
  assert back_first["eval_loss"] == pytest.approx(lte_last["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (["train.init_from=/nonexistent"],
     "train.init_from='/nonexistent' holds no run: /nonexistent/config.json does not exist"),
    (["train.init_from={dense}", "model.embed_dim=48"],
     "train.init_from='{dense}': model.embed_dim is 32 there, 48 here: only model.num_layers"),
    (["train.init_from={dense}", "model.num_layers=3"],
     "train.init_from='{dense}': model.num_layers=3 cannot come from 2 layers"),
    (["train.init_from={dense}", "data.tokenizer=sentencepiece"],
     "train.init_from='{dense}': data.tokenizer is 'byte' there, 'sentencepiece' here"),
    (["train.init_from={dense}", *UPCYCLE, "model.moe.every=3"],
     "model.moe.every=3 must divide num_layers=2"),
], ids=["missing", "embed-dim", "odd-layers", "tokenizer", "moe-every"])
def test_init_from_refuses_an_incompatible_source_in_one_line(overrides, message, dense_run,
                                                              tiny_overrides, tmp_path):
  before = snapshot(dense_run)
  with pytest.raises(SystemExit) as raised:
    run_cli(tiny_overrides, tmp_path / "new", *(o.format(dense=dense_run) for o in overrides))
  assert raised.value.code.startswith("error: "), raised.value.code
  assert message.format(dense=dense_run) in raised.value.code
  assert "\n" not in raised.value.code
  assert not (tmp_path / "new").exists()
  assert snapshot(dense_run) == before

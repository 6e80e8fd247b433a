"""LoRA merge and LTE (LoRA-the-Explorer, llm_research/training/lte.py).

LoRA: merging keeps a dense model's function (and for BitNet folds the adapters into the latent
weights); A's init is LTE's orthogonal one. LTE: a merge moves every head to the heads' mean
(heads that agree do not move) and leaves every head computing the main params' function; with
one head LTE trains exactly like ordinary LoRA on a frozen W (whatever T: W + s (B A - B'A')
stays W_0 + s B A); each head learns from its own share of the batch only; bad settings are one
line naming the key; the CLI resumes an LTE run exactly; 8 heads over 8 fake devices compute
what they compute on one, exchanging nothing but the metrics between merges.
"""
import dataclasses
import functools
import json
import os
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_research import main as cli
from llm_research import sample, training
from llm_research.config import ConfigError
from llm_research.data import ByteTokenizer
from llm_research.methods import lora
from llm_research.training import lte
from llm_research.models import TransformerConfig
from llm_research.models.linear import Linear, LoRA
from test_seams import random_batch
from test_train import StepCounter, assert_same_trajectory, checkpoint_steps, cli_args

SMALL = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
             mlp_dim=48)
TOKENS = jax.random.randint(jax.random.key(7), (2, 12), 0, 64)


@functools.cache
def _apply(cfg):
  return jax.jit(cfg.make_model().apply)


def logits(cfg, params, tokens=TOKENS):
  return np.asarray(_apply(cfg)({"params": params}, tokens))


def random_params(cfg, seed: int = 0):
  """Params of `cfg`'s model with random values everywhere (no init to compile)."""
  abstract = nn.meta.unbox(jax.eval_shape(cfg.make_model().init, jax.random.key(0), TOKENS))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract["params"])
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return 1 + 0.1 * noise
    if name == "embedding":
      return noise
    return 0.15 * noise  # kernels, adapters
  return jax.tree_util.tree_unflatten(treedef, [value(p, x) for p, x in leaves])


@functools.cache
def adapted_model(scan=True):
  """A LoRA model (2 heads of rank 4) and random params: nonzero B, so the adapters matter."""
  cfg = TransformerConfig(**SMALL, lora_rank=4, lora_alpha=8.0, lora_heads=2, scan_layers=scan)
  return cfg, random_params(cfg)


# ---- LoRA ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "looped"])
def test_merged_dense_model_computes_the_adapted_models_function(scan):
  cfg, params = adapted_model(scan=scan)
  merged_cfg, merged = lora.merge(cfg, params)
  assert merged_cfg == dataclasses.replace(cfg, lora_rank=0)
  assert not any("lora" in training.param_path(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(merged))
  want = logits(cfg, params)
  without_adapters = logits(merged_cfg, lora.merge_params(params, 0.0))
  assert np.max(np.abs(want - without_adapters)) > 0.1  # the adapters matter
  np.testing.assert_allclose(logits(merged_cfg, merged), want, rtol=1e-4, atol=1e-4)


def test_bitnet_merge_folds_the_adapters_into_the_latent_weights():
  """Q(W + dW) x is not Q(W) x + dW x; what holds: the latent is the dense merge, and read
  without the quantizer the merged model computes the adapted one's function."""
  dense_cfg, params = adapted_model()
  cfg = dataclasses.replace(dense_cfg, linear_impl="bitnet")
  merged_cfg, merged = lora.merge(cfg, params)
  assert merged_cfg.linear_impl == "bitnet" and merged_cfg.lora_rank == 0
  _, dense_merged = lora.merge(dataclasses.replace(cfg, linear_impl="dense"), params)
  jax.tree.map(np.testing.assert_array_equal, merged, dense_merged)
  dense = lambda c: dataclasses.replace(c, linear_impl="dense")
  np.testing.assert_allclose(logits(dense(merged_cfg), merged), logits(dense(cfg), params),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ConfigError, match="no latent kernel"):
    lora.merge(dataclasses.replace(cfg, linear_impl="ternary_packed"), params)


@pytest.mark.parametrize("fan_in_shape, rank", [((4, 8), 5), ((3,), 6)],
                         ids=["two-input-dims", "rank-above-fan-in"])
def test_adapter_a_is_orthogonal_with_lte_scale_and_b_starts_at_zero(fan_in_shape, rank):
  layer = Linear((7,), ("heads", "head_dim")[:len(fan_in_shape)], ("embed",),
                 lora=LoRA(rank, 16.0, heads=3))
  x = jnp.ones((2, *fan_in_shape))
  params = nn.meta.unbox(layer.init(jax.random.key(0), x))["params"]
  fan_in = int(np.prod(fan_in_shape))
  a = np.asarray(params["lora_a"]).reshape(3, fan_in, rank)
  gram = a @ a.transpose(0, 2, 1) if rank > fan_in else a.transpose(0, 2, 1) @ a
  np.testing.assert_allclose(gram, np.broadcast_to(fan_in / rank * np.eye(gram.shape[-1]),
                                                   gram.shape), atol=1e-5)
  assert not np.allclose(a[0], a[1])  # each head its own
  assert not np.any(params["lora_b"])


# ---- the LTE state: merge ---------------------------------------------------------------------

@functools.cache
def _fresh_lte_state(main_dtype):
  model = TransformerConfig(**SMALL)
  config = lte.LTEConfig(model, heads=3, rank=4, alpha=64.0, merge_every=2,
                         main_dtype=main_dtype)
  return config, lte.init(config, random_params(model), jax.random.key(1))


def lte_state(main_dtype="float32", distinct=True):
  """An LTE state of the small model (3 heads) whose heads have trained (random B_n, perturbed
  A_n and replicas; every head a copy of head 0 unless `distinct`), merged once at init."""
  config, state = _fresh_lte_state(main_dtype)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state.heads)
  rng = np.random.default_rng(2)

  def trained(path, x):
    noise = rng.normal(size=x.shape).astype(np.float32)
    if path[-1].key == "lora_b":
      return x + 0.002 * noise
    return x + 0.05 * noise * (1 if path[-1].key != "lora_a" else 0.3)
  state = state.replace(heads=jax.tree_util.tree_unflatten(
      treedef, [trained(p, x) for p, x in leaves]))
  if not distinct:  # every head a copy of head 0
    state = state.replace(**{part: jax.tree.map(lambda x: np.broadcast_to(x[:1], x.shape),
                                                getattr(state, part))
                             for part in ("heads", "merged")})
  return config, state


def head_logits(config, state):
  model = config.head_model()
  return np.stack([logits(model, lte.head_params(state, n)) for n in range(config.heads)])


def test_a_merge_does_not_move_heads_that_agree():
  """Heads with the same adapters and replicas: the merge folds their update into W and
  subtracts it from their forward (B'A' := BA), so each computes what it computed before. Had
  the forward not subtracted B'A', every head would count its update twice after the merge."""
  config, state = lte_state(distinct=False)
  before = head_logits(config, state)
  plain = logits(config.model, state.main)  # W alone, without what the heads learnt
  assert np.max(np.abs(before - plain[None])) > 0.1
  after = head_logits(config, lte.merge(state))
  np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)


def test_after_a_merge_every_head_computes_the_main_params_function():
  config, state = lte_state()
  before = head_logits(config, state)
  assert np.max(np.abs(before[0] - before[1])) > 0.1  # the heads disagree
  merged = lte.merge(state)
  main = logits(config.model, lte.main_params(state))
  for head in head_logits(config, merged):
    np.testing.assert_allclose(head, main, rtol=1e-4, atol=1e-4)
  # Merging again changes nothing (the heads' update since the merge is zero).
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6),
               lte.merge(merged).main, merged.main)


def test_a_merge_keeps_the_heads_mean_weights_and_averages_the_replicas():
  """Per adapted kernel (numpy, head by head): mean_n (W + s (A_n B_n - A'_n B'_n)) before is W
  after; the replicas become their mean, in main and in every head."""
  config, state = lte_state()
  merged = lte.merge(state)
  s = config.alpha / config.rank
  for path in (("layers", "mlp", "down"), ("layers", "attn", "out"), ("layers", "attn", "key")):
    pick = lambda tree: functools.reduce(lambda node, k: node[k], path, tree)
    w = np.asarray(pick(state.main)["kernel"])  # [layers, *in, *out]
    heads, old = pick(state.heads), pick(state.merged)
    effective = []
    for n in range(config.heads):
      update = 0
      for tree, sign in ((heads, 1), (old, -1)):
        a = np.asarray(tree["lora_a"][n]).reshape(w.shape[0], -1, config.rank)
        b = np.asarray(tree["lora_b"][n]).reshape(w.shape[0], config.rank, -1)
        update = update + sign * s * (a @ b).reshape(w.shape)
      effective.append(w + update)
    np.testing.assert_allclose(pick(merged.main)["kernel"], np.mean(effective, axis=0),
                               rtol=1e-5, atol=1e-6)
  mean_scale = np.mean(state.heads["layers"]["mlp_norm"]["scale"], axis=0)
  np.testing.assert_allclose(merged.main["layers"]["mlp_norm"]["scale"], mean_scale, rtol=1e-6)
  for n in range(config.heads):
    np.testing.assert_allclose(merged.heads["embedding"][n], merged.main["embedding"], rtol=1e-6)
    np.testing.assert_array_equal(merged.merged["layers"]["mlp"]["up"]["lora_b"][n],
                                  state.heads["layers"]["mlp"]["up"]["lora_b"][n])


def test_bfloat16_main_weights_follow_a_float32_master():
  config, state = lte_state(main_dtype="bfloat16")
  kernel = lambda tree: tree["layers"]["mlp"]["up"]["kernel"]
  assert kernel(state.main).dtype == jnp.bfloat16 and kernel(state.master).dtype == jnp.float32
  merged = lte.merge(state)
  _, reference = lte_state()  # the same heads over a float32 W
  want = kernel(lte.merge(reference).main)
  # The master keeps the update exactly; the heads read it rounded to bfloat16.
  np.testing.assert_allclose(kernel(merged.master), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(kernel(merged.main), kernel(merged.master).astype(jnp.bfloat16))
  assert kernel(lte.main_params(state)).dtype == jnp.float32
  np.testing.assert_allclose(kernel(lte.main_params(state)), want, rtol=1e-5, atol=1e-6)


# ---- LTE training -------------------------------------------------------------------------------

# The tiny run with LTE: 4 heads of rank 8 (width 32), merges every 2 steps, bfloat16 main
# weights; no warm-up, so that the first step moves the heads.
LTE_RUN = ("train.method=lte", "lte.merge_every=2", "lte.main_dtype=bfloat16",
           "train.warmup_steps=0", "sample.max_new_tokens=0")


def lte_overrides(*extra):
  return ["train.method=lte", "train.grad_clip=0", "lte.rank=4", "lte.alpha=32",
          "lte.learning_rate=0.01", *extra]


def test_one_head_trains_like_lora_on_a_frozen_w_step_for_step(tiny_config):
  """N = 1, merges at steps 2 and 4: the same losses as ordinary LoRA (W frozen, adapters,
  embedding and norms trained, one learning rate, no clipping), and the same merged model."""
  config = tiny_config(*lte_overrides("lte.heads=1", "lte.merge_every=2"))
  trainer = training.Trainer(config, ByteTokenizer())
  state = trainer.init_state()
  lora_config = tiny_config("model.lora_rank=4", "model.lora_alpha=32", "train.grad_clip=0",
                            "train.trainable=lora_|embedding|scale")
  lora_trainer = training.Trainer(lora_config, ByteTokenizer())
  lora_state = lora_trainer.init_state()

  def with_lte_start(node, main, heads):  # W, replicas and A_0 from the LTE state
    if lora.is_adapted(node):
      return {"kernel": main["kernel"], "lora_a": jnp.expand_dims(heads["lora_a"][0], 1),
              "lora_b": jnp.expand_dims(heads["lora_b"][0], 1)}
    if isinstance(node, dict):
      return {k: with_lte_start(v, main[k], heads[k]) for k, v in node.items()}
    return main
  params = with_lte_start(jax.device_get(lora_state.params), jax.device_get(state.params.main),
                          jax.device_get(state.params.heads))
  lora_state = jax.device_put(lora_state.replace(
      params=params, opt_state=lora_trainer.optimizer.init(params)),
      lora_trainer.state_shardings)
  for step in range(5):
    batch = random_batch(step, rows=8, length=32)
    state, metrics = trainer.step(state, batch)
    lora_state, lora_metrics = lora_trainer.step(lora_state, batch)
    np.testing.assert_allclose(metrics["loss"], lora_metrics["loss"], rtol=1e-5)
  assert float(metrics["loss"]) < float(trainer.step(trainer.init_state(), batch)[1]["loss"])
  lora_model, merged = lora.merge(lora_trainer.model_config, jax.device_get(lora_state.params))
  np.testing.assert_allclose(logits(lora_model, merged, TOKENS % 259),
                             logits(trainer.model_config, trainer.model_params(state),
                                    TOKENS % 259), rtol=1e-4, atol=1e-4)


def test_each_head_learns_from_its_own_share_of_the_batch_only(tiny_config):
  config = tiny_config(*LTE_RUN)  # 4 heads; the programs of the CLI runs below
  trainer = training.Trainer(config, ByteTokenizer())
  batch = random_batch(0, rows=8, length=32)
  changed = {k: v.copy() for k, v in batch.items()}
  changed["inputs"][4:6] = random_batch(1, rows=2, length=32)["inputs"]  # head 2's rows
  init = jax.device_get(trainer.init_state().params)
  one, _ = trainer.step(trainer.init_state(), batch)
  other, _ = trainer.step(trainer.init_state(), changed)
  for n in range(4):
    heads = [jax.tree.map(lambda x: np.asarray(x[n]), s.params.heads) for s in (one, other)]
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), *heads))
    assert any(differs) == (n == 2), n
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b[n]), heads[0], init.heads)
    assert moved["layers"]["mlp"]["down"]["lora_b"] and moved["embedding"], n
  # Between merges W and the merged adapters stay as they are.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(one.params.main), init.main)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(one.params.merged), init.merged)


@pytest.mark.parametrize("overrides, message", [
    (["lte.heads=3"], "train.batch_size=8 cannot be split into lte.heads=3 equal shares"),
    (["lte.rank=20"], "lte.rank=20 is larger than a dim of the layer it adapts: "
                      "layers/attn/key is 32 -> 16"),
    (["lte.heads=1"], "lte.rank=32 (from lte.heads and the width) is larger than a dim"),
    (["model.lora_rank=2"], "model.lora_rank=2 must be 0 with train.method='lte'"),
    (["model.name=nope"], "model.name='nope' is not a registered model"),
    (["lte.main_dtype=float16"], "lte.main_dtype='float16' is not one of"),
    (["lte.heads=2", "train.grad_accum=8"], "a head's share of train.batch_size=8 / lte.heads=2"
                                            " = 4 rows cannot be split into train.grad_accum=8"),
    (["train.method=lora"], "train.method='lora' is not one of ('standard', 'lte'"),
])
def test_bad_lte_settings_are_one_line_naming_the_key(overrides, message, tiny_config):
  with pytest.raises(ConfigError) as raised:
    config = tiny_config("train.method=lte", *overrides)
    training.check_config_values(config)
    training.checked_mesh(config)
  assert str(raised.value).startswith(message), raised.value
  assert "\n" not in str(raised.value)


def test_lte_on_a_model_without_lora_is_refused(tiny_config):
  # "toy" (registered by test_seams, imported above): its Linear layers take no adapters.
  with pytest.raises(ConfigError, match="model.name='toy' has no LoRA adapters"):
    training.check_config_values(tiny_config("train.method=lte", "model.name=toy"))


def test_lte_run_resumes_exactly_after_sigterm_between_merges(tiny_overrides, tmp_path,
                                                              monkeypatch):
  """The tiny run with LTE (LTE_RUN: merges at steps 2, 4, 6) through the CLI: stopped at step
  3 and run again, it continues the uninterrupted run's trajectory; sampling reads its main
  params."""
  reference = tmp_path / "reference"
  cli.main(cli_args(tiny_overrides, reference, *(f"--config.{o}" for o in LTE_RUN)))
  workdir = tmp_path / "run"
  args = cli_args(tiny_overrides, workdir, *(f"--config.{o}" for o in LTE_RUN))

  def preempt(step):
    if step == 3:  # after the merge at 2: the checkpoint's heads differ from their merged values
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch, pytest.raises(SystemExit):
    first = StepCounter(patch, preempt)
    cli.main(args)
  assert first.steps == [1, 2, 3] and checkpoint_steps(workdir) == [3]
  with open(workdir / "checkpoints" / "3" / "state" / "_METADATA") as f:
    saved = json.load(f)["tree_metadata"]
  assert any("master" in key and "heads" not in key for key in saved)  # the LTE state
  second = StepCounter(monkeypatch)
  cli.main(args)
  assert second.steps == [4, 5, 6]
  assert_same_trajectory(workdir, reference)

  _, _, model_config, params, step = sample.load_run(str(workdir))
  assert step == 6 and model_config.lora_rank == 0
  assert set(params) == {"embedding", "final_norm", "layers"}
  assert params["layers"]["mlp"]["up"]["kernel"].dtype == jnp.float32


# ---- heads over 8 devices ----------------------------------------------------------------------

def eight_devices_and_one(directory):
  """(8 devices' summary, their arrays, one device's result): tests/lte_worker.py in a
  subprocess on 8 fake devices while this process computes the one-device reference."""
  import lte_worker
  from conftest import TESTS_DIR, beside_eight_devices
  one = beside_eight_devices([os.path.join(TESTS_DIR, "lte_worker.py"), directory / "eight.npz"],
                             directory / "worker.log", lte_worker.run)
  arrays = dict(np.load(directory / "eight.npz"))
  return json.loads(str(arrays.pop("summary"))), arrays, one


@pytest.mark.slow
def test_heads_over_8_devices_match_one_device_and_talk_only_when_merging(tmp_path):
  """8 heads, one a device (mesh data=8), against the same 8 heads on one device: the same
  losses, heads and main params. From the compiled step on 8 devices: outside the merge (every
  step) the heads all-reduce a few scalars, the metrics; the merge (a conditional, every T
  steps) all-reduces every param once, the kernels' update and the replicas' mean. (Data
  parallelism all-reduces every gradient every step: experiments/benchmarks/lte_communication.py
  prints the ratio.)"""
  summary, arrays, one = eight_devices_and_one(tmp_path)
  assert summary["mesh"]["data"] == 8 and one["mesh"]["data"] == 1
  np.testing.assert_allclose(summary["losses"], one["losses"], rtol=1e-5)
  assert set(arrays) == set(one["arrays"])
  for name, want in one["arrays"].items():  # the heads' adapters and replicas, the main params
    np.testing.assert_allclose(arrays[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
  for name, (spec, shard) in summary["layout"].items():  # one head per device
    assert spec.startswith("P('data'") and shard[0] == 1, (name, spec, shard)

  collectives = {k: sum(v.values()) for k, v in summary["collectives"].items()}
  param_bytes = 4 * sum(x.size for k, x in one["arrays"].items() if k.startswith("main/"))
  assert collectives["local_step"] <= 4 * 32
  assert collectives["merge"] == param_bytes
  assert summary["refusal"].startswith("lte.heads=4 do not fit the mesh axis "
                                       "lte.mesh_axis='data' of 8 devices")


# ---- A's init: no LAPACK QR (issue 20, item 1) ------------------------------------------------

# Four pairs of inits at the quickstart's sizes ([LTE heads x layers, fan_in, rank]) in one jit,
# on at most 2 CPUs: with jnp.linalg.qr (jaxlib 0.10's batched LAPACK on XLA's intra-op pool)
# this hung every time on 2 cores; one pair only sometimes.
_CONCURRENT_INITS = """
import os
if hasattr(os, "sched_setaffinity"):  # XLA's CPU pool has a thread per CPU the process may use
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])
import jax
from llm_research.models.linear import orthogonal_adapter_init
shapes = [(4, 256, 64), (4, 704, 64)] * 4
init_all = jax.jit(lambda key: [orthogonal_adapter_init(k, s)
                                for k, s in zip(jax.random.split(key, len(shapes)), shapes)])
print([a.shape for a in jax.block_until_ready(init_all(jax.random.key(0)))])
"""


def test_orthogonal_adapter_inits_in_one_jit_do_not_deadlock():
  """`train.method=lte` hung in step 1 on 2 cores: every pool thread blocked in a batched LAPACK
  QR waiting for batch chunks queued behind itself. A subprocess, so that a hang fails."""
  import subprocess
  import sys
  try:
    done = subprocess.run([sys.executable, "-c", _CONCURRENT_INITS], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  except subprocess.TimeoutExpired:
    pytest.fail("orthogonal_adapter_init: 8 inits in one jit still running after 120 s "
                "(the LAPACK QR thread-pool deadlock)")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "(4, 704, 64)" in done.stdout


def test_orthogonal_adapter_init_is_jax_orthogonal_without_a_linalg_custom_call():
  """The same draws as nn.initializers.orthogonal (a Gaussian's QR, R's diagonal positive) to
  rounding, both ways round (rank below and above fan_in), with nothing in the compiled init
  that calls out to LAPACK (or any custom call that could wait on XLA's thread pool)."""
  import math
  from llm_research.models.linear import orthogonal_adapter_init
  for shape in [(3, 4, 8, 5), (2, 3, 6), (2, 96, 32)]:
    key = jax.random.key(sum(shape))
    fan_in, rank = math.prod(shape[1:-1]), shape[-1]
    reference = nn.initializers.orthogonal(scale=math.sqrt(fan_in / rank))
    want = jax.vmap(lambda k: reference(k, (fan_in, rank), jnp.float32))(  # eager: one QR at a time
        jax.random.split(key, shape[0])).reshape(shape)
    init = jax.jit(orthogonal_adapter_init, static_argnums=1)
    np.testing.assert_allclose(init(key, shape), want, atol=2e-6 * math.sqrt(fan_in / rank))
    assert "custom_call" not in init.lower(key, shape).as_text()

"""LayerSkip: layer dropout and the early-exit loss in training (off: exactly `standard`), early
exit, and self-speculative decoding (greedy: the full model's output; sampled: its distribution).
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llm_research import decode, main as train_cli, sample, speculative, training
from llm_research.config import base_config, with_overrides
from llm_research.data import ByteTokenizer
from llm_research.errors import ConfigError
from llm_research.models import TransformerConfig
from llm_research.models.stack import LayerPlan, layer_dropout_rate
from llm_research.training.layerskip import exit_weights

from conftest import TINY_CONFIG, beside_eight_devices

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]  # different lengths, right-padded together


def random_model(scan_layers=True, vocab_size=64, num_layers=4, embedding_scale=0.1, seed=0):
  """A random transformer whose layers matter: embeddings scaled down, so a draft of the first
  layers often disagrees with the full model (both outcomes of verification happen)."""
  config = TransformerConfig(vocab_size=vocab_size, num_layers=num_layers, embed_dim=32,
                             num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                             scan_layers=scan_layers)
  params = nn.meta.unbox(jax.jit(config.make_model().init)(
      jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  return config, {**params, "embedding": params["embedding"] * embedding_scale}


@pytest.fixture(scope="module")
def greedy():
  """scan_layers -> (a random model, its greedy continuations of PROMPTS: decode.generate)."""
  models = {scan: random_model(scan) for scan in (True, False)}
  return {scan: (config, params, decode.generate(config, params, PROMPTS, max_new_tokens=14))
          for scan, (config, params) in models.items()}


@pytest.mark.parametrize("scan_layers,exit_layer,draft_tokens",
                         [(True, 1, 3), (True, 3, 1), (False, 2, 5)])
def test_greedy_self_speculation_is_the_full_models_greedy_output(greedy, scan_layers,
                                                                  exit_layer, draft_tokens):
  config, params, want = greedy[scan_layers]
  new, run = speculative.generate(config, params, PROMPTS, exit_layer=exit_layer,
                                  draft_tokens=draft_tokens, max_new_tokens=14)
  assert new == want
  # Both outcomes of verification happened: some drafts rejected, some accepted.
  assert 0 < run["accepted"] < run["drafted"], run
  assert run["rounds"] < 14 and run["tokens"] == 3 * 14


def test_early_exit_is_the_model_of_the_first_layers_and_the_training_exits_agree():
  """The layer-E exit the early-exit loss trains (exit logits, through the shared final norm and
  head) is what early-exit decoding runs: the model of the first E layers."""
  config, params = random_model(num_layers=3)
  tokens = jnp.array([[5, 9, 2, 7], [1, 1, 3, 8]])

  @jax.jit
  def logits_and_exits(params):  # one program: the plain model, its exits, the early-exit models
    apply = lambda config, params, **kw: config.make_model(**kw).apply(
        {"params": params}, tokens, mutable=["intermediates"])
    logits, sown = apply(config, params, plan=LayerPlan(layer_outputs=True))
    early = [apply(*speculative.layer_range(config, params, 0, exit_layer))[0]
             for exit_layer in (1, 2)]
    return apply(config, params)[0], logits, sown["intermediates"]["exit_logits"][0], early

  plain, logits, exits, early = logits_and_exits(params)
  np.testing.assert_array_equal(logits, plain)
  assert exits.shape == (2, 2, 4, 64)
  for exit_layer in (1, 2):
    np.testing.assert_allclose(exits[exit_layer - 1], early[exit_layer - 1], rtol=1e-5,
                               atol=1e-5)


def joint_first_tokens(samples: np.ndarray, vocab: int, count: int) -> np.ndarray:
  """Counts of each sequence of the first `count` tokens: [vocab ** count]."""
  index = np.zeros(len(samples), np.int64)
  for t in range(count):
    index = index * vocab + samples[:, t]
  return np.bincount(index, minlength=vocab**count)


def exact_joint(config, params, prompt, count, **settings) -> np.ndarray:
  """The full model's probability of each sequence of its first `count` tokens after `prompt`
  under the sampling settings: [vocab ** count], in `joint_first_tokens`' order."""
  vocab = config.vocab_size
  sequences = np.array(np.unravel_index(np.arange(vocab**count), (vocab,) * count)).T
  prefixes = sequences[::vocab, :-1]  # every sequence of count - 1 tokens, in order
  tokens = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
  logits = jax.jit(config.make_model().apply)({"params": params}, jnp.asarray(tokens))
  # [prefixes, count, vocab]: token t's distribution after the prompt and t tokens of the prefix
  probs = np.asarray(speculative.distributions(logits[:, len(prompt) - 1:], **settings),
                     np.float64)
  prefix = np.arange(vocab**count) // vocab
  return np.prod([probs[prefix, t, sequences[:, t]] for t in range(count)], axis=0)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
  """The p-value of `counts` under `probs` (cells expected below 5 pooled into one); 0 if a
  sample falls where the probability is 0."""
  if np.any(counts[probs == 0] > 0):
    return 0.0
  counts, probs = counts[probs > 0], probs[probs > 0]
  expected = probs / probs.sum() * counts.sum()
  small = expected < 5
  if small.any():
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
  return float(stats.chisquare(counts, expected).pvalue)


SETTINGS = dict(temperature=0.8, top_k=6, top_p=0.95)  # p and q shaped alike


def test_sampled_self_speculation_keeps_the_full_models_distribution():
  """The first three tokens of 12000 sampled rows against the full model's exact joint
  distribution (chi-square); the draft's own samples, the same test shows, are not that."""
  config, params = random_model(vocab_size=8, num_layers=3, embedding_scale=0.3)
  prompt, rows, count = [3, 1, 4], 12000, 3
  exact = exact_joint(config, params, prompt, count, **SETTINGS)
  assert exact.sum() == pytest.approx(1.0, abs=1e-6)
  new, run = speculative.generate(config, params, [prompt] * rows, exit_layer=1,
                                  draft_tokens=2, max_new_tokens=count, rng=jax.random.key(1),
                                  **SETTINGS)
  assert 0.2 < run["acceptance_rate"] < 0.95, run
  assert chi_square_p_value(joint_first_tokens(np.array(new), 8, count), exact) > 1e-3
  drafted = speculative.early_exit_generate(config, params, [prompt] * rows, exit_layer=1,
                                            max_new_tokens=count, rng=jax.random.key(1),
                                            **SETTINGS)
  assert chi_square_p_value(joint_first_tokens(np.array(drafted), 8, count), exact) < 1e-6


def test_layer_dropout_skips_whole_rows_at_rates_rising_with_depth():
  """Per row and layer, skipped (its exit equals the one before) as often as
  p_max (e^(l ln 2 / (L - 1)) - 1) says: 0, p_max (sqrt 2 - 1), p_max for L = 3."""
  p_max, rows = 0.5, 4000
  expected = [p_max * (np.exp(l * np.log(2) / 2) - 1) for l in range(3)]
  np.testing.assert_allclose([layer_dropout_rate(p_max, l, 3) for l in range(3)], expected,
                             rtol=1e-6)
  tokens = jax.random.randint(jax.random.key(0), (rows, 2), 0, 64)
  for scan_layers in (True, False):
    config, params = random_model(scan_layers, num_layers=3)
    model = config.make_model(plan=LayerPlan(layer_dropout=p_max, layer_outputs=True))
    apply = jax.jit(lambda p, t, k: model.apply({"params": p}, t, rngs={"dropout": k},
                                                mutable=["intermediates"]))
    logits, sown = apply(params, tokens, jax.random.key(1))
    outputs = [*sown["intermediates"]["exit_logits"][0], logits]  # layers 0, 1, 2
    skipped = [np.all(np.asarray(after == before), axis=(1, 2))
               for before, after in zip(outputs, outputs[1:])]  # layers 1, 2
    np.testing.assert_allclose([s.mean() for s in skipped], expected[1:], atol=0.03)


def test_exit_weights_follow_the_papers_scales_and_curricula():
  """e(l) = e_scale sum_{i<=l} i (l < L - 1), e(L - 1) = L - 1 + e_scale sum_{i<=L-2} i; the
  curriculum's layers (the last always), normalised. L = 4, e_scale = 1: e = 0, 1, 3, 6."""
  weights = lambda curriculum, step: np.asarray(exit_weights(
      4, 1.0, curriculum, step, rotation_every=2, total_steps=16))
  np.testing.assert_allclose(weights("none", 5), np.array([0, 1, 3, 6]) / 10, rtol=1e-6)
  np.testing.assert_allclose(weights("rotational", 0), [0, 0, 3 / 9, 6 / 9], rtol=1e-6)
  np.testing.assert_allclose(weights("rotational", 1), [0, 1 / 7, 0, 6 / 7], rtol=1e-6)
  # gradual: one more layer from the last down every T / (2 L) = 2 steps.
  np.testing.assert_allclose(weights("gradual", 1), [0, 0, 0, 1])
  np.testing.assert_allclose(weights("gradual", 2), [0, 0, 1 / 3, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(weights("gradual", 6), np.array([0, 1, 3, 6]) / 10, rtol=1e-6)


def small_config(*overrides):
  return with_overrides(base_config(), [
      "model.num_layers=4", "model.embed_dim=32", "model.num_heads=2", "model.num_kv_heads=2",
      "model.head_dim=16", "model.mlp_dim=48", "data.seq_len=16", "train.batch_size=4",
      "train.warmup_steps=0", "train.learning_rate=0.01", *overrides])


def random_batch(seed, rows=4, length=16):
  tokens = np.random.default_rng(seed).integers(3, 259, (rows, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)}


def test_the_early_exit_objective_is_the_weighted_sum_of_the_exits_losses():
  """Against an independent recomputation: each exit's loss from the model of its first layers
  (speculative.layer_range), weighted by the paper's e~ (rotational, step 1: layers 1 and 3)."""
  config = small_config("train.method=layerskip", "layerskip.early_exit_scale=1.0",
                        "layerskip.curriculum=rotational")
  model_config = training.model_config_from(config, ByteTokenizer().vocab_size)
  method = training.method_class("layerskip")(config, model_config)
  params = nn.meta.unbox(model_config.make_model().init(
      jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  batch = random_batch(0)

  @jax.jit
  def objective_and_exits(params):  # one program
    exits = [speculative.layer_range(model_config, params, 0, exit_layer)
             for exit_layer in (2, 4)]
    return (method.objective(params, batch, None, step=1),
            [config.make_model().apply({"params": p}, batch["inputs"]) for config, p in exits])

  (value, sums), exit_logits = objective_and_exits(params)

  def loss_sum(logits):
    logits = np.asarray(logits, np.float64)
    log_z = np.log(np.exp(logits).sum(-1))
    return -np.sum(np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0] - log_z)

  layer_2, layer_4 = map(loss_sum, exit_logits)
  expected = layer_2 / 7 + layer_4 * 6 / 7
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  np.testing.assert_allclose(sums["nll"], layer_4, rtol=1e-4)
  np.testing.assert_allclose(sums["aux_loss/early_exit"], expected - layer_4, rtol=1e-3)
  np.testing.assert_allclose(sums["mean/exit_loss/1"], layer_2, rtol=1e-4)


def test_layerskip_off_is_standard_bit_for_bit():
  """Defaults (no layer dropout, no early-exit loss): the same model, program and updates."""
  standard = training.Trainer(small_config(), ByteTokenizer())
  layerskip = training.Trainer(small_config("train.method=layerskip"), ByteTokenizer())
  assert layerskip.method.model == standard.method.model
  states = [standard.init_state(), layerskip.init_state()]
  program = lambda trainer, state: str(jax.make_jaxpr(trainer.method.step)(state,
                                                                           random_batch(0)))
  assert program(standard, states[0]) == program(layerskip, states[1])
  for seed in range(2):
    (states[0], want), (states[1], got) = [trainer.step(state, random_batch(seed)) for
                                          trainer, state in zip((standard, layerskip), states)]
    assert got.keys() == want.keys()
    for name in want:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for want, got in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_layerskip_trains_on_the_trainers_mesh(scan_layers):
  """Layer dropout and the early-exit loss together, with gradient accumulation: the losses
  are logged, the params move, and a step is a function of the state (its key) alone."""
  trainer = training.Trainer(small_config(
      "train.method=layerskip", "layerskip.p_max=0.3", "layerskip.early_exit_scale=1.0",
      "layerskip.curriculum=gradual", "train.grad_accum=2", f"model.scan_layers={scan_layers}"),
      ByteTokenizer())
  state = trainer.init_state()
  first, metrics = trainer.step(state, random_batch(0))
  again, _ = trainer.step(trainer.init_state(), random_batch(0))
  assert {"aux_loss/early_exit", "exit_loss/0", "exit_loss/1", "exit_loss/2"} <= set(metrics)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(first.params), jax.tree.leaves(trainer.init_state().params)))


def sharded_steps() -> dict:
  """Two LayerSkip steps (layer dropout, early exits) on this process's devices (8: data 4 x
  fsdp 2): the metrics and final params, flat."""
  trainer = training.Trainer(small_config(
      "train.method=layerskip", "layerskip.p_max=0.3", "layerskip.early_exit_scale=1.0",
      "train.batch_size=8", f"mesh.fsdp={2 if jax.device_count() == 8 else 1}"),
      ByteTokenizer())
  state, out = trainer.init_state(), {}
  for step in range(2):
    state, metrics = trainer.step(state, random_batch(step, rows=8))
    out.update({f"metrics|{k}|{step}": np.asarray(v) for k, v in metrics.items()})
  out.update({f"params|{training.param_path(p)}": np.asarray(x) for p, x in
              jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))})
  return out


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
  """The trainer's mesh over 8 fake devices (data 4 x fsdp 2) takes the steps one device does:
  the same layers dropped for the same rows, the same exits."""
  eight = tmp_path / "eight.npz"
  one = beside_eight_devices([__file__, eight], tmp_path / "worker.log", sharded_steps)
  eight = dict(np.load(eight))
  assert eight.keys() == one.keys()
  for name, value in one.items():
    np.testing.assert_allclose(eight[name], value, rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.fixture(scope="module")
def layerskip_run(tmp_path_factory, tiny_overrides):
  """A tiny run trained briefly with layer dropout and the early-exit loss (3 layers)."""
  workdir = str(tmp_path_factory.mktemp("layerskip") / "run")
  train_cli.main(["--config", TINY_CONFIG, "--workdir", workdir, *(f"--config.{o}" for o in [
      *tiny_overrides, *LAYERSKIP, "train.steps=2", "train.eval_every=2",
      "train.checkpoint_every=2"])])
  return workdir


LAYERSKIP = ["train.method=layerskip", "layerskip.p_max=0.1", "layerskip.early_exit_scale=1.0",
             "model.num_layers=3"]


def test_sample_cli_self_speculates_to_the_greedy_text_and_reports_its_speed(layerskip_run,
                                                                             capsys):
  greedy = ["--workdir", layerskip_run, "--temperature", "0", "--max_new_tokens", "10"]
  want = sample.main(greedy)
  got = sample.main([*greedy, "--self_speculative_exit", "2", "--draft_tokens", "3"])
  assert got == want
  report = capsys.readouterr().out.strip().splitlines()[-1]
  assert report.startswith("self-speculative decoding, exit layer 2, 3 draft tokens: 10 tokens")
  assert "tokens/s, acceptance rate" in report


@pytest.mark.parametrize("flags,message", [
    (["--self_speculative_exit", "0"], "the exit layer 0 of self-speculative decoding must be in "
                                       "1..num_layers - 1 = 2"),
    (["--self_speculative_exit", "3"], "the exit layer 3 of self-speculative decoding"),
    (["--early_exit", "3"], "the exit layer 3 of early exit must be in 1..num_layers - 1 = 2"),
    (["--self_speculative_exit", "1", "--draft_tokens", "0"],
     "--draft_tokens=0 must be at least 1"),
])
def test_sample_cli_refuses_an_exit_layer_the_model_lacks_in_one_line(layerskip_run, flags,
                                                                      message):
  with pytest.raises(SystemExit) as raised:
    sample.main(["--workdir", layerskip_run, *flags])
  assert raised.value.code.startswith(f"error: {message}"), raised.value.code
  assert "\n" not in raised.value.code


@pytest.mark.parametrize("override,message", [
    ("layerskip.p_max=1.0", "layerskip.p_max=1.0 must be in [0, 1)"),
    ("layerskip.p_max=-0.1", "layerskip.p_max=-0.1 must be in [0, 1)"),
    ("layerskip.early_exit_scale=-1.0", "layerskip.early_exit_scale=-1.0 must not be negative"),
    ("layerskip.curriculum=linear", "layerskip.curriculum='linear' is not one of"),
    ("layerskip.rotation_every=0", "layerskip.rotation_every=0 must be at least 1"),
    ("model.num_layers=1", "model.num_layers=1 is too few for LayerSkip"),
])
def test_train_cli_refuses_a_bad_layerskip_value_in_one_line_and_writes_nothing(
    tmp_path, tiny_overrides, override, message):
  workdir = tmp_path / "run"
  with pytest.raises(SystemExit) as raised:
    train_cli.main(["--config", TINY_CONFIG, "--workdir", str(workdir), *(
        f"--config.{o}" for o in [*tiny_overrides, *LAYERSKIP, override])])
  assert raised.value.code.startswith(f"error: {message}"), raised.value.code
  assert "\n" not in raised.value.code
  assert not workdir.exists()


def test_models_without_early_exit_are_refused():
  """bGPT (its own two-level decoding) for all of LayerSkip; an MoE transformer for
  self-speculation (capacity-limited routing depends on the tokens verified together)."""
  from llm_research.models import registry
  bgpt = registry.model_config({"name": "bgpt"}, 257)
  with pytest.raises(ConfigError, match="self-speculative decoding needs a model that exits"):
    speculative.generate(bgpt, {}, PROMPTS, exit_layer=1, max_new_tokens=4)
  with pytest.raises(ConfigError, match="early exit needs a model that exits early"):
    speculative.early_exit_generate(bgpt, {}, PROMPTS, exit_layer=1, max_new_tokens=4)
  config = with_overrides(base_config(), ["model.name=bgpt", "train.method=layerskip",
                                          "layerskip.p_max=0.1"])
  with pytest.raises(ConfigError, match="needs a model that exits early .*model.name='bgpt'"):
    training.method_class("layerskip").check_config(config, bgpt)
  moe = registry.model_config({"name": "transformer", "mlp_impl": "moe",
                               "moe": {"num_experts": 4}}, 64)
  with pytest.raises(ConfigError, match="self-speculative decoding does not support mlp_impl"):
    speculative.generate(moe, {}, PROMPTS, exit_layer=1, max_new_tokens=4)


if __name__ == "__main__":  # the 8-device side of test_eight_devices_match_one
  np.savez(sys.argv[1], **sharded_steps())

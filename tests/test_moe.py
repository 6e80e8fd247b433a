"""Mixture of experts (models/moe.py): routing (capacity in each order, dropping, the kept
copies' weights, expert choice, combine weights) against numpy references, the router's
task-loss gradient for every k, dropless == capacity path, causality of what should be causal,
KV-cache decoding, auxiliary losses, the dropped-token count and router statistics in the train
metrics, parameter counts, bad config values.
"""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_research import training
from llm_research.models import Transformer, TransformerConfig, registry
from llm_research.models import moe
from llm_research.models.moe import MoEConfig
from llm_research.models.stack import AUX_LOSS, METRICS, collect_aux_losses

VOCAB = 61


def tiny_moe(moe: dict | None = None, **overrides) -> TransformerConfig:
  """A tiny MoE transformer: 4 experts, top-2, in every layer; `moe` overrides the MoE group."""
  base = dict(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=48, mlp_impl="moe")
  group = MoEConfig(**{"num_experts": 4, "experts_per_token": 2, **(moe or {})})
  return TransformerConfig(**{**base, "moe": group, **overrides})


def with_moe(cfg: TransformerConfig, **fields) -> TransformerConfig:
  """`cfg` with MoE group fields replaced."""
  return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **fields))


def random_params(cfg, seed=0):
  """Params of `cfg`'s model drawn without compiling its init (most of these tests' time):
  norm scales 1, embedding N(0, 1), every kernel N(0, 0.15^2) (the router too: livelier
  routing than its small init)."""
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 3), int))
  leaves, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes["params"]))
  rng = np.random.default_rng(seed)
  def draw(path, shape):
    name = path[-1].key
    if name == "scale":
      return np.ones(shape.shape, np.float32)
    std = 1.0 if name == "embedding" else 0.15
    return (std * rng.standard_normal(shape.shape)).astype(np.float32)
  return jax.tree_util.tree_unflatten(tree, [draw(p, x) for p, x in leaves])


@functools.cache
def logits_fn(cfg):
  """The jitted forward pass of `cfg` (one per config: tests share the compiled program)."""
  model = Transformer(cfg)
  return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


# Two models the tests share (compiling is most of their time): every layer MoE; and MoE in every
# other of 4 layers (the scan runs over groups of 2).
EVERY_LAYER = tiny_moe()
EVERY_OTHER = tiny_moe(num_layers=4, moe=dict(every=2))


@pytest.fixture(scope="module")
def every_layer_params():
  return random_params(EVERY_LAYER)


@pytest.fixture(scope="module")
def every_other_params():
  return random_params(EVERY_OTHER, seed=1)


def random_probs(seed, shape):
  return jax.nn.softmax(3 * jax.random.normal(jax.random.key(seed), shape), axis=-1)


# ---- routing ------------------------------------------------------------------------------------

def reference_top_k_capacity(probs, k, capacity, renormalize, order="choice_then_score",
                             renormalize_kept=False):
  """numpy: per group, each expert keeps the first `capacity` token copies offered in `order`
  (ties: the earlier copy); {(group, token, expert): combine weight}, number dropped."""
  probs = np.asarray(probs)
  kept, dropped = {}, 0
  for g, group in enumerate(probs):
    copies, totals = [], []  # (sort key, token, expert, weight); each token's weights' sum
    for s, p in enumerate(group):
      experts = np.argsort(-p, kind="stable")[:k]
      scores = p[experts]
      weights = scores / scores.sum() if renormalize and k > 1 else scores
      totals.append(weights.sum())
      for j, (e, score, w) in enumerate(zip(experts, scores, weights)):
        key = {"choice_then_score": (j, -scores[0], s), "choice_then_position": (j, s),
               "score": (-score, s * k + j)}[order]
        copies.append((key, s, e, w))
    taken = {}  # expert -> copies kept so far
    for _, s, e, w in sorted(copies, key=lambda copy: copy[0]):
      if taken.get(e, 0) < capacity:
        taken[e] = taken.get(e, 0) + 1
        kept[(g, s, e)] = w
      else:
        dropped += 1
    if renormalize_kept:
      for s, total in enumerate(totals):
        mine = [key for key in kept if key[:2] == (g, s)]
        scale = total / sum(kept[key] for key in mine) if mine else 0
        for key in mine:
          kept[key] *= scale
  return kept, dropped


def as_assignments(routing):
  """{(group, token, expert): combine weight} of a Routing, checking one token per slot."""
  dispatch, combine = np.asarray(routing.dispatch), np.asarray(routing.combine)
  assert dispatch.sum(axis=1).max() <= 1  # a slot holds at most one token
  g, s, e, _ = np.nonzero(dispatch)
  return {(a, b, c): combine[a, b, c].sum() for a, b, c in zip(g, s, e)}


@pytest.mark.parametrize("k, capacity, renormalize, order, renormalize_kept", [
    (1, 2, True, "choice_then_score", False), (2, 3, True, "choice_then_score", False),
    (2, 5, False, "choice_then_score", True), (3, 4, True, "choice_then_position", True),
    (2, 3, True, "score", False)])
def test_capacity_keeps_the_first_copies_in_its_order_and_counts_the_dropped(
    k, capacity, renormalize, order, renormalize_kept):
  probs = random_probs(0, (3, 10, 4))
  routing = moe.top_k_capacity_routing(probs, k, capacity, renormalize, order=order,
                                       renormalize_kept=renormalize_kept)
  want, dropped = reference_top_k_capacity(probs, k, capacity, renormalize, order,
                                           renormalize_kept)
  got = as_assignments(routing)
  assert dropped > 0  # the case tests dropping
  assert int(routing.dropped) == dropped
  assert set(got) == set(want)
  np.testing.assert_allclose([got[a] for a in want], [want[a] for a in want], rtol=1e-6)


@pytest.mark.parametrize("order, kept", [
    ("choice_then_score", {(0, 1), (1, 0), (1, 2)}),
    ("choice_then_position", {(0, 1), (1, 0), (1, 2)}),
    ("score", {(0, 1), (0, 2), (1, 0)})])
def test_first_choices_are_served_before_second_choices(order, kept):
  """The issue's case, capacity 1: token 0 wants experts 1 then 2, token 1 wants 2 then 0.
  Choice-major orders keep both first choices (token 1's second too: expert 0 is free) and
  drop token 0's second; "score" ranks token 0's second choice (0.45) above token 1's first
  (0.4) and drops the latter."""
  probs = jnp.asarray([[[.05, .5, .45], [.3, .3, .4]]])
  routing = moe.top_k_capacity_routing(probs, 2, 1, True, order=order)
  assert {(s, e) for _, s, e in as_assignments(routing)} == kept
  assert int(routing.dropped) == 1


def test_a_kept_copy_keeps_its_weight_unless_renormalised_over_the_kept():
  """Token 1 (of the case above, "score" order) keeps only its second choice, expert 0
  (renormalised weight .3 / .7): its weight stays 3 / 7, or with `renormalize_kept` is the
  whole 1. Top-1 keeps its probability either way (Switch Transformer's weight)."""
  probs = jnp.asarray([[[.05, .5, .45], [.3, .3, .4]]])
  for renormalize_kept, weight in ((False, 3 / 7), (True, 1.0)):
    routing = moe.top_k_capacity_routing(probs, 2, 1, True, order="score",
                                         renormalize_kept=renormalize_kept)
    assert as_assignments(routing)[(0, 1, 0)] == pytest.approx(weight)
  routing = moe.top_k_capacity_routing(probs, 1, 1, True, renormalize_kept=True)
  assert as_assignments(routing) == pytest.approx({(0, 0, 1): 0.5, (0, 1, 2): 0.4})


def test_expert_choice_takes_exactly_its_capacity_of_its_top_tokens():
  probs = random_probs(1, (2, 12, 4))
  capacity = moe.expert_capacity(12, 4, 1.5)
  assert capacity == 5
  routing = moe.expert_choice_routing(probs, capacity)
  dispatch = np.asarray(routing.dispatch)
  np.testing.assert_array_equal(dispatch.sum(axis=(1, 3)), capacity)  # per group and expert
  np.testing.assert_array_equal(dispatch.sum(axis=1), 1)  # every slot holds one token
  got = as_assignments(routing)
  p = np.asarray(probs)
  for g in range(2):
    for e in range(4):
      top = set(np.argsort(-p[g, :, e], kind="stable")[:capacity])
      assert {s for gg, s, ee in got if gg == g and ee == e} == top
  for (g, s, e), weight in got.items():
    assert weight == pytest.approx(p[g, s, e])
  untaken = 2 * 12 - len({(g, s) for g, s, _ in got})
  assert int(routing.dropped) == untaken


@pytest.mark.parametrize("k, renormalize, top1_weight", [
    (2, True, "probability"), (2, False, "probability"), (1, True, "probability"),
    (1, True, "straight_through"), (2, True, "straight_through")])
def test_combine_weights_are_the_chosen_probabilities_renormalised_if_asked(k, renormalize,
                                                                            top1_weight):
  """Renormalised over the chosen k when k > 1; top-1's weight is its probability, or 1 with
  `top1_weight="straight_through"` (which leaves k > 1 alone)."""
  probs = random_probs(2, (2, 7, 5))
  gates, experts, scores = moe.top_k_gates(probs, k, renormalize, top1_weight)
  np.testing.assert_allclose(scores, np.take_along_axis(np.asarray(probs), experts, -1))
  assert np.all(np.asarray(scores)[..., :-1] >= np.asarray(scores)[..., 1:])
  want = scores / scores.sum(-1, keepdims=True) if renormalize and k > 1 else scores
  if k == 1 and top1_weight == "straight_through":
    want = jnp.ones_like(scores)
  np.testing.assert_allclose(gates, want, rtol=1e-6)
  # Through the capacity path with room for every copy: each token's weights sum as specified.
  routing = moe.top_k_capacity_routing(probs, k, 7, renormalize, top1_weight=top1_weight)
  assert int(routing.dropped) == 0
  np.testing.assert_allclose(np.asarray(routing.combine).sum(axis=(2, 3)),
                             np.asarray(want).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("k, top1_weight", [
    (1, "probability"), (1, "straight_through"), (2, "probability"), (3, "probability")])
def test_the_router_learns_from_the_task_loss_for_every_k(k, top1_weight):
  """The default group (renormalize_combine, dropless), no router loss: the task loss's
  gradient reaches the router, comparable to the experts' (top-1 renormalised would weigh
  every token's expert by p / p = 1, a constant: a router gradient of rounding noise; the
  straight-through weight is 1 in value but keeps p's gradient)."""
  cfg = tiny_moe(dict(experts_per_token=k, load_balance_weight=0.0, router_z_loss_weight=0.0,
                      top1_weight=top1_weight))
  layer = moe.MoE(cfg)
  x = jax.random.normal(jax.random.key(14), (2, 9, 32))
  probe = jax.random.normal(jax.random.key(15), (2, 9, 32))
  params = nn.meta.unbox(layer.init(jax.random.key(16), x)["params"])
  grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) * probe)))(params)
  size = lambda name: float(jnp.linalg.norm(grads[name]["kernel"]))
  assert size("router") > 1e-2 * size("up"), (size("router"), size("up"))


def test_dropless_path_equals_capacity_path_when_nothing_is_dropped():
  x = jax.random.normal(jax.random.key(3), (2, 9, 16))
  probs = random_probs(4, (2, 9, 4))
  keys = jax.random.split(jax.random.key(5), 3)
  gate, up = (jax.random.normal(key, (4, 16, 24)) / 4 for key in keys[:2])
  down = jax.random.normal(keys[2], (4, 24, 16)) / 5
  gates, experts, _ = moe.top_k_gates(probs, 2, True)
  dropless = jax.jit(moe.dropless_experts)(x.reshape(18, 16), gates.reshape(18, 2),
                                           experts.reshape(18, 2), gate, up,
                                           down).reshape(2, 9, 16)
  routing = moe.top_k_capacity_routing(probs, 2, 9, True)
  assert int(routing.dropped) == 0
  capacity = jax.jit(moe.dispatch_experts)(x, routing, gate, up, down)
  np.testing.assert_allclose(dropless, capacity, rtol=1e-5, atol=1e-5)
  # And both equal the per-token definition: sum_k gate_k * expert_k(x).
  gate, up, down = np.asarray(gate), np.asarray(up), np.asarray(down)
  silu = lambda v: v / (1 + np.exp(-v))
  swiglu = lambda e, v: (silu(v @ gate[e]) * (v @ up[e])) @ down[e]
  xs, es, ws = (np.asarray(a).reshape(18, -1) for a in (x, experts, gates))
  want = np.stack([sum(ws[t, j] * swiglu(es[t, j], xs[t]) for j in range(2)) for t in range(18)])
  np.testing.assert_allclose(dropless.reshape(18, 16), want, rtol=1e-5, atol=1e-5)


def test_moe_model_dropless_equals_capacity_with_room_for_every_token(every_layer_params):
  tokens = jax.random.randint(jax.random.key(6), (2, 13), 0, VOCAB)
  roomy = with_moe(EVERY_LAYER, capacity_factor=2.0)  # C = 2 * 2 * 13 / 4 >= 13
  assert moe.expert_capacity(13, 4, 2.0, 2) == 13
  np.testing.assert_allclose(logits_fn(EVERY_LAYER)(every_layer_params, tokens),
                             logits_fn(roomy)(every_layer_params, tokens), rtol=1e-5, atol=1e-5)


# ---- the MoE transformer -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [EVERY_LAYER, EVERY_OTHER,
                                 with_moe(EVERY_LAYER, capacity_factor=2.0)],
                         ids=["dropless", "every-other", "capacity-roomy"])
def test_changing_a_future_token_changes_no_earlier_logit(cfg, every_layer_params,
                                                          every_other_params):
  """Dropless top-k routes each token alone: causal. The capacity path is causal only when no
  copy is dropped (a later token can take an earlier one's slot), here with room for all."""
  params = every_other_params if cfg.moe.every == 2 else every_layer_params
  apply = logits_fn(cfg)
  tokens = jax.random.randint(jax.random.key(7), (2, 13), 0, VOCAB)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % VOCAB)
  a, b = apply(params, tokens), apply(params, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_expert_choice_is_not_causal(every_layer_params):
  """Documented: expert choice ranks a row's tokens together, so a later token changes which
  earlier tokens an expert takes (here: some earlier logit moves)."""
  apply = logits_fn(with_moe(EVERY_LAYER, router="expert_choice", capacity_factor=1.0))
  tokens = jax.random.randint(jax.random.key(8), (2, 13), 0, VOCAB)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % VOCAB)
  a, b = apply(every_layer_params, tokens), apply(every_layer_params, changed)
  assert not np.allclose(a[:, :9], b[:, :9], atol=1e-6)


def test_kv_cache_decoding_equals_the_full_forward_pass(every_other_params):
  """Dropless: one-token steps give the full forward pass's logits (prefill is the same code
  on more tokens: test_model.py checks it for the dense model)."""
  cfg, params = EVERY_OTHER, every_other_params
  tokens = jax.random.randint(jax.random.key(9), (2, 13), 0, VOCAB)
  full = logits_fn(cfg)(params, tokens)
  cached = Transformer(cfg, decode=True, cache_len=16)
  apply = jax.jit(cached.apply, static_argnames="mutable")
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                       jax.eval_shape(cached.init, jax.random.key(0), tokens[:, :1])["cache"])
  positions = jnp.broadcast_to(jnp.arange(13), tokens.shape)
  state, steps = {"cache": cache}, []
  for t in range(13):
    logits, state = apply({"params": params, "cache": state["cache"]}, tokens[:, t:t + 1],
                          positions[:, t:t + 1], mutable=("cache",))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_aux_losses_and_dropped_tokens_reach_the_train_metrics(every_other_params):
  """A zero router: probabilities uniform, every token's top k are experts 0..k-1, so the
  load-balancing loss is exactly 1 and the z-loss log(E)^2 per MoE layer, and with capacity C
  each row drops k (length - C) copies per layer; the train step (2 micro-batches) reports the
  weighted sums, and the count summed over its micro-batches. The router statistics are means
  over tokens and MoE layers: loads 1 / k for experts 0..k-1 and 0 for the others (their
  coefficient of variation sqrt(E / k - 1)), dropped fraction 1 - C / length."""
  cfg = with_moe(EVERY_OTHER, capacity_factor=1.0, load_balance_weight=0.1,
                 router_z_loss_weight=0.01)
  model = Transformer(cfg)
  params = jax.tree.map(lambda x: x, every_other_params)
  router = params["layers"]["layer_1"]["mlp"]["router"]
  router["kernel"] = np.zeros_like(router["kernel"])
  rows, length, k, experts, layers = 4, 12, 2, 4, 2
  capacity = moe.expert_capacity(length, experts, 1.0, k)
  assert capacity == 6
  tokens = jax.random.randint(jax.random.key(10), (rows, length + 1), 0, VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((rows, length), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}
  optimizer = optax.sgd(0.0)
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), rng=jnp.zeros((2,), jnp.uint32))
  step = jax.jit(lambda s, b: training.train_step(
      s, b, objective=training.model_objective(model), optimizer=optimizer,
      schedule=lambda _: 0.0, grad_accum=2))
  _, metrics = step(state, batch)
  assert float(metrics["aux_loss/load_balance"]) == pytest.approx(0.1 * layers, rel=1e-5)
  assert float(metrics["aux_loss/router_z_loss"]) == pytest.approx(
      0.01 * layers * np.log(experts)**2, rel=1e-5)
  # Each of experts 0..k-1 is offered every token of a row and keeps `capacity`.
  assert float(metrics["moe_dropped_tokens"]) == layers * rows * k * (length - capacity)
  loads = [float(metrics[f"moe_load/expert_{e}"]) for e in range(experts)]
  np.testing.assert_allclose(loads, [1 / k] * k + [0] * (experts - k), atol=1e-6)
  assert float(metrics["moe_load_cv"]) == pytest.approx(np.sqrt(experts / k - 1), rel=1e-5)
  assert float(metrics["moe_dropped_fraction"]) == pytest.approx(1 - capacity / length)


def test_parameter_counts_match_the_params():
  for cfg in [tiny_moe(), tiny_moe(dict(every=2), lora_rank=2),
              tiny_moe(dict(num_experts=0), mlp_impl="swiglu")]:
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 3), int))
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(shapes["params"]))
  cfg = tiny_moe(dict(every=2, num_experts=8, experts_per_token=2), num_layers=4)
  dense = dataclasses.replace(cfg, mlp_impl="swiglu", moe=MoEConfig())
  expert_params = 3 * 32 * 48
  # Two MoE layers, each: 7 more experts than the dense MLP and a router (32 x 8).
  assert cfg.num_params() - dense.num_params() == 2 * (7 * expert_params + 32 * 8)
  # FLOPs count the active params: 2 experts and the router per MoE layer.
  assert cfg.flops_per_token(16) - dense.flops_per_token(16) == pytest.approx(
      6 * 2 * (expert_params + 32 * 8))


@pytest.mark.parametrize("bad, message", [
    (dict(mlp_impl="swiglu"), "model.moe.num_experts=4 needs mlp_impl='moe'"),
    (dict(moe=dict(num_experts=0)),
     "model.moe.num_experts=0 must be at least 1 with mlp_impl='moe'"),
    (dict(moe=dict(experts_per_token=5)),
     "model.moe.experts_per_token=5 must be from 1 to num_experts=4"),
    (dict(moe=dict(experts_per_token=0)), "model.moe.experts_per_token=0 must be from 1"),
    (dict(moe=dict(router="switch")), "model.moe.router='switch' is not one of"),
    (dict(moe=dict(capacity_factor=-1.0)), "model.moe.capacity_factor=-1.0 must not be negative"),
    (dict(moe=dict(capacity_order="fifo")), "model.moe.capacity_order='fifo' is not one of"),
    (dict(moe=dict(top1_weight="one")), "model.moe.top1_weight='one' is not one of"),
    (dict(moe=dict(router="expert_choice")),
     "model.moe.capacity_factor=0.0 cannot hold a token: router='expert_choice' needs"),
    (dict(num_layers=3, moe=dict(every=2)), "model.moe.every=2 must divide num_layers=3"),
    (dict(moe=dict(every=0)), "model.moe.every=0 must divide"),
    (dict(moe=dict(load_balance_weight=-0.1)),
     "model.moe.load_balance_weight=-0.1 must not be negative"),
    (dict(linear_impl="bitnet"), "model.linear_impl='bitnet': the experts of mlp_impl='moe'"),
])
def test_bad_moe_config_is_one_line_naming_the_key(bad, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")) as raised:
    tiny_moe(**bad)
  assert "\n" not in str(raised.value)



@pytest.mark.parametrize("router, capacity_factor", [("top_k", 0.0), ("top_k", 0.5),
                                                     ("expert_choice", 0.25)],
                         ids=["dropless", "capacity-dropping", "expert-choice"])
def test_padding_takes_no_expert_and_counts_in_no_router_loss(router, capacity_factor):
  """Padding (segment_ids 0, here the last 5 of 12 tokens of every row) changes nothing of the
  real tokens: their outputs, the router losses and the dropped count are those of the same
  rows with other padding; padding comes out as 0. Dropless, where the real tokens route alone,
  they are also those of the rows cut before the padding."""
  cfg = tiny_moe(dict(router=router, capacity_factor=capacity_factor, load_balance_weight=1.0,
                      router_z_loss_weight=1.0))
  layer = moe.MoE(cfg)
  x = jax.random.normal(jax.random.key(11), (2, 12, 32))
  other = x.at[:, 7:].set(3 * jax.random.normal(jax.random.key(12), (2, 5, 32)))
  segment_ids = jnp.ones((2, 12), jnp.int32).at[:, 7:].set(0)
  params = nn.meta.unbox(layer.init(jax.random.key(13), x)["params"])
  params["router"]["kernel"] = 30 * params["router"]["kernel"]  # lively routing

  @jax.jit
  def apply(x, segment_ids):
    y, sown = layer.apply({"params": params}, x, segment_ids, mutable=[AUX_LOSS, METRICS])
    return y, collect_aux_losses(sown), collect_aux_losses(sown, METRICS)["moe_dropped_tokens"]

  y, losses, dropped = apply(x, segment_ids)
  y_other, losses_other, dropped_other = apply(other, segment_ids)
  np.testing.assert_allclose(y[:, :7], y_other[:, :7], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(y[:, 7:], 0)
  assert len(losses) == (2 if router == "top_k" else 1)  # z-loss; top-k: load balance too
  for name, value in losses.items():
    assert float(value) == pytest.approx(float(losses_other[name]), rel=1e-6)
  assert int(dropped) == int(dropped_other)
  assert (int(dropped) > 0) == (capacity_factor > 0)  # the capacity binds: tokens compete
  if capacity_factor == 0:
    y_cut, losses_cut, _ = apply(x[:, :7], jnp.ones((2, 7), jnp.int32))
    np.testing.assert_allclose(y[:, :7], y_cut, rtol=1e-5, atol=1e-6)
    for name, value in losses_cut.items():
      assert float(losses[name]) == pytest.approx(float(value), rel=1e-5)


def test_the_moe_group_is_its_own_config_section_and_old_flat_keys_still_load(
    tiny_config, tmp_path):
  """`model.moe.*` on the command line; the group's shape keys fix a run's checkpoints; and a
  config.json written when the MoE settings were flat `model.*` keys builds the same model and
  is held against a changed group like a new one."""
  config = tiny_config("model.mlp_impl=moe", "model.moe.num_experts=4", "model.moe.every=2")
  model = training.model_config_from(config, VOCAB)
  assert model.moe == MoEConfig(num_experts=4, every=2)
  assert {"model.moe.num_experts", "model.moe.every"} <= set(training.shape_keys(config))
  old = {k: v for k, v in config.model.to_dict().items() if k != "moe"}
  old.update(num_experts=4, moe_every=2, moe_router="top_k", capacity_factor=0.0)
  assert registry.model_config(old, VOCAB) == model
  (tmp_path / "checkpoints").mkdir()
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**config.to_dict(), "model": old}, f)
  training.checks.check_same_shapes(config, str(tmp_path))  # the same run: accepted
  with pytest.raises(ValueError, match="model.moe.num_experts: 4 there, 8 here"):
    training.checks.check_same_shapes(
        tiny_config("model.mlp_impl=moe", "model.moe.num_experts=8", "model.moe.every=2"),
        str(tmp_path))

"""Early exit and self-speculative decoding (LayerSkip, Elhoushi et al. 2024).

A model trained with LayerSkip (llm_research/training/layerskip.py) predicts the next token
from the output of any layer through its shared final norm and head. Two ways to decode with it:

  early exit              the first E layers, the final norm and the head: `early_exit_generate`
                          (decode.generate on the model of those layers).
  self-speculative        `generate`: the first E layers draft K tokens one at a time, then the
                          remaining layers E..L-1 verify them in one call. The two parts are one
                          model cut at layer E (`layer_range`): the draft's KV cache is the full
                          model's cache of layers 0..E-1, and the verifier continues from the
                          layer-E hidden states the draft saved for its tokens, filling the cache
                          of layers E..L-1. No layer runs twice on a token and no cache is copied.

A round, per row: the draft runs on d_0 (the last token, not yet in the cache) and its own
drafts d_1..d_K, giving draft distributions q_0..q_K and the hidden states h_0..h_K; the verifier
runs on h_0..h_K, giving the full model's p_0..p_K (p_i predicts the token after d_i). Draft d_i
(i = 1..K) is accepted with probability min(1, p_{i-1}(d_i) / q_{i-1}(d_i)) until the first
rejection, at n; the round then adds d_1..d_n and one more token drawn from the normalised
max(0, p_n - q_n) (after n = K accepted drafts: from p_K). Standard speculative sampling (Leviathan
et al. 2023; Chen et al. 2023): every token is distributed as the full model's. At temperature 0
p and q are one-hot at their argmax, which makes the same rule greedy: the output is exactly the
full model's greedy output. Temperature, top_k and top_p shape p and q alike
(`decode.truncated_logits`): the output follows the full model's distribution under those settings,
as `decode.generate` samples it.

Rejected drafts are rolled back by position alone: a row's next round writes its cache slots from
its new position on, and attention reads only slots at or before a query's position
(models/attention.py), so stale slots past it are never read before they are rewritten. Rows move
on by their own accepted counts; a row that has its tokens stops moving.

Models: those whose config has `early_exit` (the transformer, any linear base: dense, BitNet,
packed ternary, LoRA). Not bGPT (its two-level patch and byte decoders), nor an MoE transformer for
self-speculation: expert capacity makes a token's routing depend on the tokens sharing its call,
so verifying K + 1 tokens at once would not compute what one-token decoding computes.
"""
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

from llm_research import decode
from llm_research.errors import ConfigError
from llm_research.methods.layer_list import join_layers, split_layers


def check_exit_layer(config, exit_layer: int, *, speculative: bool) -> None:
  """Refuses a model that cannot exit early (or self-speculate) and an exit layer outside
  1..num_layers - 1, as a ConfigError."""
  what = "self-speculative decoding" if speculative else "early exit"
  name = type(config).__name__
  if not getattr(config, "early_exit", False):
    raise ConfigError(f"{what} needs a model that exits early (the transformer); {name} does not")
  if speculative and config.mlp_impl == "moe":
    raise ConfigError(f"{what} does not support mlp_impl='moe': expert capacity makes a token's "
                      "routing depend on the tokens verified with it")
  if not 1 <= exit_layer <= config.num_layers - 1:
    raise ConfigError(f"the exit layer {exit_layer} of {what} must be in 1..num_layers - 1 = "
                      f"{config.num_layers - 1}")


def layer_range(config, params, start: int, stop: int):
  """(config, params) of the model made of layers start..stop - 1 of `config`'s model, with its
  embedding, final norm and head: for start = 0 the early exit at layer `stop`; for start > 0
  the rest of the model, run on the hidden state of layer `start` (the Transformer's `hidden`)."""
  layers, rest = split_layers(config, params)
  sliced = dataclasses.replace(config, num_layers=stop - start)
  return sliced, join_layers(sliced, layers[start:stop], rest)


def early_exit_generate(config, params, prompts, *, exit_layer: int, **settings):
  """`decode.generate` with the first `exit_layer` layers, the final norm and the head."""
  check_exit_layer(config, exit_layer, speculative=False)
  return decode.generate(*layer_range(config, params, 0, exit_layer), prompts, **settings)


def generate(config, params, prompts: list[list[int]], *, exit_layer: int,
             draft_tokens: int = 4, max_new_tokens: int, rng=None, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None):
  """Self-speculative decoding (the module docstring): like `decode.generate`, drafting
  `draft_tokens` tokens a round with the first `exit_layer` layers. Returns (the new tokens per
  prompt, cut after `eos_id`; stats: "accepted" and "drafted" draft tokens, "acceptance_rate",
  "rounds", "tokens" generated (rows x max_new_tokens, eos or not) in "seconds" of the compiled
  run, compilation excluded)."""
  check_exit_layer(config, exit_layer, speculative=True)
  if draft_tokens < 1:
    raise ConfigError(f"draft_tokens={draft_tokens} must be at least 1")
  tokens, lengths = decode.right_padded(prompts)
  rng = jax.random.key(0) if rng is None else rng
  args = (config, params, tokens, lengths, rng, exit_layer, draft_tokens, max_new_tokens,
          float(temperature), int(top_k), float(top_p))
  run = _speculate.lower(*args).compile()
  start = time.perf_counter()
  new, accepted, drafted, rounds = jax.block_until_ready(run(*args[1:5]))
  seconds = time.perf_counter() - start
  accepted, drafted = int(accepted), int(drafted)
  return decode.cut_after_eos(new[:, :max_new_tokens], eos_id), {
      "accepted": accepted, "drafted": drafted, "rounds": int(rounds),
      "acceptance_rate": accepted / max(drafted, 1), "tokens": len(prompts) * max_new_tokens,
      "seconds": seconds}


def distributions(logits, temperature: float, top_k: int, top_p: float):
  """The next-token distributions [..., vocab] that `decode.sample_logits` samples: one-hot at
  the argmax at temperature 0."""
  if temperature == 0.0:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
  return jax.nn.softmax(decode.truncated_logits(logits, temperature, top_k, top_p), axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9, 10))
def _speculate(config, params, tokens, lengths, rng, exit_layer, draft_tokens, max_new_tokens,
               temperature, top_k, top_p):
  """(new tokens [batch, max_new_tokens + draft_tokens + 1], the first max_new_tokens of each
  row valid; accepted drafts; drafted tokens; rounds)."""
  batch, prompt_len = tokens.shape
  k = draft_tokens
  cache_len = prompt_len + max_new_tokens + k
  draft_config, draft_params = layer_range(config, params, 0, exit_layer)
  verify_config, verify_params = layer_range(config, params, exit_layer, config.num_layers)
  draft = draft_config.make_model(decode=True, cache_len=cache_len)
  verify = verify_config.make_model(decode=True, cache_len=cache_len)
  sample = functools.partial(decode.sample_logits, temperature=temperature, top_k=top_k,
                             top_p=top_p)
  probs = functools.partial(distributions, temperature=temperature, top_k=top_k, top_p=top_p)

  def run_draft(cache, tokens, positions):  # -> (cache, logits, layer-E hidden states)
    logits, updates = draft.apply({"params": draft_params, "cache": cache}, tokens, positions,
                                  mutable=["cache", "intermediates"])
    return updates["cache"], logits, updates["intermediates"]["hidden"][0]

  def run_verify(cache, tokens, positions, hidden):  # -> (cache, the full model's logits)
    logits, updates = verify.apply({"params": verify_params, "cache": cache}, tokens, positions,
                                   hidden=hidden, mutable=["cache"])
    return updates["cache"], logits

  # The prompts through the full model, in its two parts.
  positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
  draft_cache, _, hidden = run_draft(decode.empty_cache(draft, batch), tokens, positions)
  verify_cache, logits = run_verify(decode.empty_cache(verify, batch), tokens, positions, hidden)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  first_rng, rng = jax.random.split(rng)
  token = sample(last, first_rng)
  rows = jnp.arange(batch)
  out = jnp.zeros((batch, max_new_tokens + k + 1), jnp.int32).at[:, 0].set(token)
  slots = jnp.arange(k + 1)

  def draft_step(carry, step_rng):
    cache, token, position = carry
    cache, logits, hidden = run_draft(cache, token[:, None], position[:, None])
    return (cache, sample(logits[:, 0], step_rng), position + 1), (token, logits[:, 0],
                                                                     hidden[:, 0])

  def one_round(state):
    draft_cache, verify_cache, token, position, count, out, accepted, drafted, rounds, rng = state
    rng, draft_rng, accept_rng, next_rng = jax.random.split(rng, 4)
    (draft_cache, _, _), (fed, q_logits, hidden) = jax.lax.scan(
        draft_step, (draft_cache, token, position), jax.random.split(draft_rng, k + 1))
    fed, hidden = fed.T, hidden.swapaxes(0, 1)  # d_0..d_K [batch, k + 1]; h [batch, k + 1, e]
    q = probs(q_logits.swapaxes(0, 1))  # [batch, k + 1, vocab]
    verify_cache, p_logits = run_verify(verify_cache, fed, position[:, None] + slots, hidden)
    p = probs(p_logits)
    drafts = fed[:, 1:]  # [batch, k]
    at = lambda dist: jnp.take_along_axis(dist[:, :k], drafts[..., None], axis=-1)[..., 0]
    # u < p / q without the division (q > 0 at a token drawn from q).
    ok = jax.random.uniform(accept_rng, (batch, k)) * at(q) < at(p)
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1)  # [batch] drafts accepted
    residual = jnp.maximum(p[rows, n] - jnp.where((n < k)[:, None], q[rows, n], 0.0), 0.0)
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p[rows, n])
    following = jax.random.categorical(next_rng, jnp.log(residual), axis=-1)
    emitted = jnp.where(slots == n[:, None], following[:, None],
                        jnp.concatenate([drafts, following[:, None]], axis=1))
    running = count < max_new_tokens
    index = jnp.where((slots <= n[:, None]) & running[:, None], count[:, None] + slots,
                      out.shape[1])  # out of range: dropped
    out = out.at[rows[:, None], index].set(emitted, mode="drop")
    advance = jnp.where(running, n + 1, 0)
    return (draft_cache, verify_cache, jnp.where(running, following, token), position + advance,
            count + advance, out, accepted + jnp.sum(jnp.where(running, n, 0)),
            drafted + k * jnp.sum(running), rounds + 1, rng)

  zero = jnp.zeros((), jnp.int32)
  state = (draft_cache, verify_cache, token, lengths, jnp.ones_like(lengths), out, zero, zero,
           zero, rng)
  state = jax.lax.while_loop(lambda s: jnp.any(s[4] < max_new_tokens), one_round, state)
  return state[5], state[6], state[7], state[8]

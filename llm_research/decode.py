"""KV-cache generation: one prefill of the (right-padded) prompts, then one token per step.

Prompts of different lengths share a batch: each row writes its cache slots at its own
positions, so no left-padding or position shifting is needed. Any registered model generates
here: `config.make_model(decode=True, cache_len=...)` (llm_research.models.registry), unless its
config brings its own `generate(params, prompts, **settings)` (bGPT's two-level caches), which
`generate` then calls. Early exit and self-speculative decoding (LayerSkip) build on this in
speculative.py.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0):
  """Next tokens [batch] from logits [batch, vocab]: greedy at temperature 0, else sampled
  after top-k (0 = off) and nucleus top-p (1 = off) truncation."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1)
  return jax.random.categorical(rng, truncated_logits(logits, temperature, top_k, top_p),
                                axis=-1)


def truncated_logits(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """The logits `sample_logits` draws from at a temperature > 0 ([..., vocab], float32):
  divided by the temperature, -inf outside the top-k and the nucleus top-p."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The smallest set whose mass reaches top_p: keep tokens whose preceding mass is < top_p.
    keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def empty_cache(model, batch_size: int):
  """The zero KV cache of a decoding `model` (built with decode=True) for `batch_size` rows."""
  return jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32)).get("cache", {})))


def generate(config, params, prompts: list[list[int]], *,
             max_new_tokens: int, rng=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None) -> list[list[int]]:
  """Continues each prompt (a list of token ids, at least one) by up to `max_new_tokens` with
  the model of `config` (a registered model config) and its `params`.

  Returns the new tokens per prompt, cut after `eos_id` if it appears.
  """
  own = getattr(config, "generate", None)
  if own is not None:
    return own(params, prompts, max_new_tokens=max_new_tokens, rng=rng,
               temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
  tokens, lengths = right_padded(prompts)
  rng = jax.random.key(0) if rng is None else rng
  new = _generate(config, params, tokens, lengths, rng, max_new_tokens, float(temperature),
                  int(top_k), float(top_p))
  return cut_after_eos(new, eos_id)


def right_padded(prompts: list[list[int]]) -> tuple[jax.Array, jax.Array]:
  """(tokens [batch, longest] with each prompt from slot 0, lengths [batch]) of prompts of at
  least one token each."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt, each of at least one token")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return jnp.asarray(tokens), jnp.asarray(lengths)


def cut_after_eos(new, eos_id: int | None) -> list[list[int]]:
  """The rows of new tokens [batch, n] as lists, each cut after its first `eos_id`."""
  out = []
  for row in np.asarray(new).tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    out.append(row)
  return out


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _generate(config, params, tokens, lengths, rng, max_new_tokens, temperature, top_k, top_p):
  batch, prompt_len = tokens.shape
  model = config.make_model(decode=True, cache_len=prompt_len + max_new_tokens)
  cache = empty_cache(model, batch)
  positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
  logits, updates = model.apply({"params": params, "cache": cache}, tokens, positions,
                                mutable=["cache"])
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  def step(carry, step_rng):
    cache, logits, position = carry
    token = sample(logits, step_rng)
    logits, updates = model.apply({"params": params, "cache": cache}, token[:, None],
                                  position[:, None], mutable=["cache"])
    return (updates["cache"], logits[:, 0], position + 1), token

  _, new_tokens = jax.lax.scan(step, (updates["cache"], last, lengths),
                               jax.random.split(rng, max_new_tokens))
  return new_tokens.T  # [batch, max_new_tokens]

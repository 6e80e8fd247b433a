"""The objective, and the step built on it: gradient accumulation, the update, after-step hooks.

An objective is `objective(params, batch, rng) -> (value, sums)`: the value to differentiate,
summed over the batch's tokens (or rows), and sums to log: "nll" and "count" (what the loss is
averaged over), per auxiliary loss "aux_loss/<name>" that loss times the count, MEAN sums, and
the metrics the model sows (as they are). `model_objective` is the default: the model's own
loss (next-token cross-entropy, or what its config's `loss_sums` says) plus its auxiliary
losses. Sums add over micro-batches (and LTE's heads), so every split of a batch gives the
same logged metrics (`logged_metrics`).
"""
import functools
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from llm_research.models.stack import AUX_LOSS, METRICS, collect_aux_losses
from llm_research.training.optimizer import trainable_mask
from llm_research.training.state import AfterStepHook, TrainState, apply_hooks, step_key

Objective = Callable[..., tuple[jax.Array, dict]]

# A sums key "mean/<name>" is a sum divided by the count when logged, as `<name>` (train)
# and `eval_<name>` (eval): e.g. a classifier's correct rows, logged as accuracy.
MEAN = "mean/"


def target_log_probs(logits, targets):
  """(log p(target), log Z), each [batch, length], of logits [batch, length, vocab]."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_z, log_z


def token_losses(logits, targets, weights, z_loss: float = 0.0):
  """Sums over tokens: (objective, negative log-likelihood, number of tokens)."""
  log_p, log_z = target_log_probs(logits, targets)  # [batch, length]
  nll = -log_p
  weights = weights.astype(jnp.float32)
  nll_sum = jnp.sum(nll * weights)
  return nll_sum + z_loss * jnp.sum(jnp.square(log_z) * weights), nll_sum, jnp.sum(weights)


def token_loss_sums(logits, batch, z_loss):
  """The default loss: next-token cross-entropy over the tokens with segment_ids > 0;
  (objective, {"nll": its sum, "count": tokens})."""
  objective, nll, count = token_losses(logits, batch["targets"], batch["segment_ids"] > 0,
                                       z_loss)
  return objective, {"nll": nll, "count": count}


def batch_losses(params, batch, rng=None, *, model, z_loss: float = 0.0):
  """The model's objective over one batch: (value, sums) as the module docstring says. `rng`
  is the step's key, handed to the model as its "dropout" stream (None in evaluation).

  The model's config may define its own loss, `loss_sums(outputs, batch, z_loss) ->
  (objective, sums)` with "nll", "count" and MEAN sums (e.g. bGPT's classifier); None or
  absent: `token_loss_sums`."""
  chex.assert_equal_shape([batch[k] for k in ("inputs", "targets", "segment_ids", "positions")])
  outputs, variables = model.apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
      mutable=[AUX_LOSS, METRICS], rngs=None if rng is None else {"dropout": rng})
  loss_sums = getattr(getattr(model, "config", None), "loss_sums", None) or token_loss_sums
  return with_sown(*loss_sums(outputs, batch, z_loss), variables)


def with_sown(value, sums: dict, variables):
  """(value, sums) with what the model sowed in `variables` (its apply's mutable collections)
  added: each auxiliary loss times the count, to the value and the sums; each metric to the
  sums."""
  aux = {f"aux_loss/{name}": loss * sums["count"]
         for name, loss in collect_aux_losses(variables).items()}
  return value + sum(aux.values()), {**sums, **aux, **collect_aux_losses(variables, METRICS)}


def model_objective(model, z_loss: float = 0.0) -> Objective:
  """`batch_losses` of `model`: the default objective."""
  return functools.partial(batch_losses, model=model, z_loss=z_loss)


def grads_and_sums(objective: Objective, params, batch, rng):
  """(gradient of the objective's value, its sums)."""
  (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, rng)
  return grads, sums


def accumulated(grads_and_sums_fn: Callable, batch: dict, grad_accum: int, rng):
  """`grads_and_sums_fn(batch, rng)` (a pytree of sums), summed over `grad_accum` micro-batches
  of `batch` under a scan, each with its own key: micro-batch k holds rows k, k + grad_accum,
  ... (each device's rows stay local)."""
  if grad_accum == 1:
    return grads_and_sums_fn(batch, rng)
  # [batch, ...] -> [grad_accum, batch / grad_accum, ...]
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
      batch)
  keys = jax.random.split(rng, grad_accum)

  def accumulate(carry, micro_and_key):
    return jax.tree.map(jnp.add, carry, grads_and_sums_fn(*micro_and_key)), None

  shapes = jax.eval_shape(grads_and_sums_fn, jax.tree.map(lambda x: x[0], micro), keys[0])
  total, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, shapes), (micro, keys))
  return total


def per_count(sums: dict, count) -> dict:
  """Logged metrics from sums: auxiliary losses and MEAN sums divided by the count (the
  latter renamed to their name), metrics as they are."""
  return {k.removeprefix(MEAN): v / count if k.startswith(("aux_loss/", MEAN)) else v
          for k, v in sums.items()}


def logged_metrics(sums: dict, grads, learning_rates: dict) -> dict:
  """A step's metrics from its summed sums (over micro-batches, heads): the loss per count,
  the gradient's norm, the learning rates, and the other sums per `per_count`."""
  sums = dict(sums)
  count = jnp.maximum(sums.pop("count"), 1.0)
  return {"loss": sums.pop("nll") / count, "grad_norm": optax.tree.norm(grads),
          **learning_rates, **per_count(sums, count)}


def frozen_to_zero(grads, trainable: str):
  """Frozen params' gradients as zeros (constants: XLA drops the work that computed them)."""
  return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads,
                      trainable_mask(grads, trainable))


def train_step(state: TrainState, batch: dict, *, objective: Objective, optimizer, schedule,
               grad_accum: int, trainable: str = "", hooks: tuple[AfterStepHook, ...] = ()):
  """One optimizer update on a global batch, optionally in `grad_accum` micro-batches, then
  the after-step hooks that are due: (state, metrics).

  The gradient is that of the objective's mean over the batch (its value summed, divided by
  the whole batch's count), however the batch is split."""
  grads, sums = accumulated(functools.partial(grads_and_sums, objective, state.params), batch,
                            grad_accum, step_key(state))
  count = jnp.maximum(sums["count"], 1.0)
  grads = frozen_to_zero(jax.tree.map(lambda g: g / count, grads), trainable)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  metrics = logged_metrics(sums, grads, {"learning_rate": schedule(state.step)})
  return apply_hooks(new_state, hooks), metrics


def eval_sums(params, batch, *, objective: Objective) -> dict:
  """The "nll", "count" and MEAN sums of one batch (no key: evaluation is deterministic)."""
  _, sums = objective(params, batch, None)
  return {k: v for k, v in sums.items() if k in ("nll", "count") or k.startswith(MEAN)}

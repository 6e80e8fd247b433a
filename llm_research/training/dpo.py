"""DPO, Direct Preference Optimization (Rafailov et al., 2023): `--config.train.method=dpo` on
preference pairs (`data.source='preferences'`: llm_research/data/preferences.py, whose rows
carry each pair's chosen and rejected sequences side by side); the `dpo` section: `beta`.

The loss of a pair (prompt x, chosen y_w, rejected y_l), with the policy pi (the model trained)
and the frozen reference pi_ref:

    z = beta ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)))
    loss = -log sigmoid(z)

log pi(y|x) sums the log-probs of the response's tokens (its eos included; the prompt's are
masked out). beta (log pi(y|x) - log pi_ref(y|x)) is a response's implicit reward, z the pair's
reward margin, and the loss the negative log-likelihood of the preference under the
Bradley-Terry model of those rewards: the objective's "nll", averaged over "count" = pairs (so
over micro-batches and devices alike: a pair never straddles them). Logged per pair: `loss`,
`reward_accuracy` (z > 0), `reward_chosen`, `reward_rejected`, `reward_margin` (z), and the
policy's `logp_chosen`, `logp_rejected`.

The gradient is -beta sigmoid(-z) grad D, D = log pi(y_w|x) - log pi(y_l|x): each pair weighted
by how wrongly its implicit rewards order it. As beta -> 0 (and exactly at z = 0: at step 0,
where pi = pi_ref), the loss -> log 2 and the gradient -> -(beta / 2) grad D, every pair
weighted alike (to first order: loss = log 2 - beta (D - D_ref) / 2 + O(beta^2)).

The state's params (`DPOParams`): `policy`, the model's params (what the optimizer trains,
`train.trainable` selects from, and eval, sampling and `init_from` read), and `reference`, a
copy of the params the run starts from (train.init_from's, else the fresh init), never updated
and without optimizer state. The step is `train_step` on the policy alone, its objective
closing over the reference.

The reference's log-probs are computed in the same step (one forward of the pair's two
sequences, no backward), not precomputed once. In the step they cost about a third more compute
(the policy's forward and backward are about three forwards) and a copy of the params (sharded
like the policy's, smaller than its optimizer moments); in exchange they need no pass over the
data before training, no per-pair store that would have to follow the packing, the shuffle of
every epoch and any change of the data config, and they hold for any source, the eval split and
an exact resume (the reference is in the checkpoint like the rest of the state).

Evaluation: the trainer evaluates the policy with the model's own objective, so `eval_loss` is
its token loss on the held-out chosen texts (prompt included), which says how far DPO moved the
policy from language modelling the preferred data. DPO's own metrics on held-out pairs come from
`pair_logps` (experiments/dpo.py measures them).
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from llm_research.data.preferences import KEYS, REJECTED
from llm_research.errors import ConfigError
from llm_research.models.stack import AUX_LOSS, METRICS
from llm_research.training import checks
from llm_research.training.method import register
from llm_research.training.objective import MEAN, target_log_probs, train_step, with_sown
from llm_research.training.standard import Standard
from llm_research.training.state import apply_hooks


@struct.dataclass
class DPOParams:
  """A DPO run's state params: the trained policy and the frozen reference (the docstring)."""

  policy: Any
  reference: Any


def both_sequences(batch: dict) -> dict:
  """The chosen rows, then the rejected rows: {KEYS: [2 rows, seq_len]}."""
  return {k: jnp.concatenate([batch[k], batch[REJECTED + k]]) for k in KEYS}


def _segment_sums(values, segment_ids):
  """[rows, seq_len + 1]: the sums of `values` [rows, seq_len] per row and segment id, row by
  row (a row's pairs are in it: under a mesh, each device sums its own rows)."""
  per_row = lambda x, ids: jax.ops.segment_sum(x, ids, num_segments=x.shape[0] + 1)
  return jax.vmap(per_row)(values, segment_ids)


def response_logps(logits, sequences: dict):
  """[rows, seq_len + 1]: per row and segment id, the sum of the log-probs of the response's
  targets (0 for a segment id that is not there). logits: [rows, seq_len, vocab]."""
  token, _ = target_log_probs(logits.astype(jnp.float32), sequences["targets"])
  return _segment_sums(jnp.where(sequences["response"] > 0, token, 0.0),
                       sequences["segment_ids"])


def pairs_present(sequences: dict):
  """[rows / 2, seq_len + 1]: 1.0 where a (row, segment id) of the chosen rows is a pair."""
  rows = sequences["response"].shape[0] // 2
  tokens = _segment_sums(sequences["response"][:rows], sequences["segment_ids"][:rows])
  return (tokens > 0).astype(jnp.float32)


def preference_sums(policy_logps, reference_logps, present, beta: float):
  """(value, sums) of DPO's loss from per-pair response log-probs [2 rows, seq_len + 1] (the
  chosen rows, then the rejected ones) and `present` [rows, seq_len + 1]."""
  rows = present.shape[0]
  rewards = beta * (policy_logps - reference_logps)
  chosen, rejected = rewards[:rows], rewards[rows:]
  margin = chosen - rejected  # z
  total = lambda x: jnp.sum(x * present)
  loss = total(-jax.nn.log_sigmoid(margin))
  return loss, {
      "nll": loss, "count": jnp.sum(present),
      MEAN + "reward_accuracy": total(margin > 0), MEAN + "reward_chosen": total(chosen),
      MEAN + "reward_rejected": total(rejected), MEAN + "reward_margin": total(margin),
      MEAN + "logp_chosen": total(policy_logps[:rows]),
      MEAN + "logp_rejected": total(policy_logps[rows:])}


def pair_logps(model, params, batch: dict):
  """(log pi(y_w|x), log pi(y_l|x), present), each [rows, seq_len + 1], of the model with
  `params` on a batch of packed pairs (deterministic: no dropout)."""
  sequences = both_sequences(batch)
  logits = model.apply({"params": params}, sequences["inputs"], sequences["positions"],
                       sequences["segment_ids"])
  logps = response_logps(logits, sequences)
  rows = logps.shape[0] // 2
  return logps[:rows], logps[rows:], pairs_present(sequences)


@register("dpo")
class DPO(Standard):
  """`train.method="dpo"`: the state's params are DPOParams; the optimizer trains the policy."""

  config_section = {"beta": 0.1}  # the paper's beta: how far from the reference rewards reach

  @classmethod
  def check_config(cls, config, model_config) -> None:
    need = lambda ok, key, what: checks.need(config, ok, key, what)
    need(config.dpo.beta > 0, "dpo.beta", "must be positive")
    if config.data.source != "preferences":
      raise ConfigError(f"train.method='dpo' trains on preference pairs: data.source="
                        f"{config.data.source!r} has none (use data.source='preferences')")
    need(config.train.z_loss == 0, "train.z_loss", "is the model objective's: "
         "train.method='dpo' has none (use 0)")

  def objective(self, params: DPOParams, batch, rng):
    """(value, sums) of one batch of pairs: DPO's loss plus the policy's auxiliary losses."""
    sequences = both_sequences(batch)
    apply = lambda p, **kw: self.model.apply({"params": p}, sequences["inputs"],
                                             sequences["positions"], sequences["segment_ids"],
                                             **kw)
    logits, variables = apply(params.policy, mutable=[AUX_LOSS, METRICS],
                              rngs=None if rng is None else {"dropout": rng})
    reference_logits = apply(params.reference)  # deterministic, as pi_ref is a fixed model
    return with_sown(*preference_sums(response_logps(logits, sequences),
                                      response_logps(reference_logits, sequences),
                                      pairs_present(sequences), self.config.dpo.beta),
                     variables)

  def init(self, params, rng):
    del rng  # nothing drawn
    return DPOParams(policy=params, reference=params), self.optimizer.init(params)

  def step(self, state, batch):
    reference, tc = state.params.reference, self.config.train
    objective = lambda policy, b, rng: self.objective(DPOParams(policy, reference), b, rng)
    policy_state, metrics = train_step(
        state.replace(params=state.params.policy), batch, objective=objective,
        optimizer=self.optimizer, schedule=self.schedule, grad_accum=tc.grad_accum,
        trainable=tc.trainable)
    new_state = policy_state.replace(params=state.params.replace(policy=policy_state.params))
    return apply_hooks(new_state, self.hooks), metrics

  def trained(self, params: DPOParams):
    return params.policy

  def model_params(self, params: DPOParams):
    return params.policy

  def model_param_shardings(self, shardings: DPOParams):
    return shardings.policy

"""LayerSkip (Elhoushi et al. 2024, "LayerSkip: Enabling Early Exit Inference and
Self-Speculative Decoding"): `--config.train.method=layerskip`; the `layerskip` section.

Two changes to the model's training, each off by default (the method is then `standard`, with
the same program and the same updates):

  layer dropout    `layerskip.p_max` > 0: in each step every row skips layer l of L (its output
                   is its input) with probability p_l = p_max (e^(l ln 2 / (L - 1)) - 1), from 0
                   at the first layer to p_max at the last, drawn per row and per layer from the
                   step's key (models/stack.py `LayerPlan`; the paper's per-layer schedule, held
                   constant over training).
  early-exit loss  `layerskip.early_exit_scale` (the paper's e_scale) > 0: every layer's output
                   goes through the shared final norm and head, and the objective is
                   sum_l e~(t, l) CE_l, where
                       e(l) = e_scale sum_{i=0..l} i             for l < L - 1,
                       e(L - 1) = L - 1 + e_scale sum_{i=0..L-2} i,
                       e~(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i),
                   scales that rise with depth, normalised over the layers the curriculum C
                   enables at step t (the last layer always):
                       "none"        every layer;
                       "rotational"  layer l when l = t (mod layerskip.rotation_every): every
                                     R-th layer, rotating with the step;
                       "gradual"     layers from the last down, one more every
                                     train.steps / (2 L) steps (all from half of training on).

The objective's "nll" stays the last layer's loss (what eval and the other methods log); the
early-exit loss enters as the auxiliary loss "early_exit", what it adds to that loss
(sum_l e~ CE_l - CE_{L-1}), with each layer's loss logged as `exit_loss/<l>`. Evaluation, sampling
and export use the plain model (no layer dropout): the params are the model's.

Models: a config with `early_exit` (the transformer), of at least two layers, without MoE layer
groups (moe.every > 1: a scanned block holds several layers).

Memory: with the early-exit loss every layer's logits are computed, the curriculum's disabled
layers too (weight 0): [num_layers - 1, batch, length, vocab] float32 per micro-batch beside the
model's own; `train.grad_accum` bounds it. Not yet done: the paper's time curriculum of the
layer dropout rate (here constant over training), and computing only the enabled exits.
"""
import functools

import jax.numpy as jnp

from llm_research.errors import ConfigError
from llm_research.models.stack import AUX_LOSS, METRICS, LayerPlan
from llm_research.training import checks
from llm_research.training.method import register
from llm_research.training.objective import (MEAN, target_log_probs, token_loss_sums,
                                             train_step, with_sown)
from llm_research.training.standard import Standard

CURRICULA = ("none", "rotational", "gradual")


def exit_scales(num_layers: int, e_scale: float):
  """e(l) of the module docstring, [num_layers]: rising with depth."""
  layers = jnp.arange(num_layers, dtype=jnp.float32)
  below = e_scale * layers * (layers + 1) / 2  # e_scale sum_{i <= l} i
  return below.at[-1].set(num_layers - 1 + below[-2])


def active_exits(num_layers: int, curriculum: str, step, *, rotation_every: int,
                 total_steps: int):
  """C(t, l) of the module docstring: [num_layers] booleans, the last layer always on."""
  layers = jnp.arange(num_layers)
  if curriculum == "rotational":
    on = layers % rotation_every == step % rotation_every
  elif curriculum == "gradual":
    enabled = jnp.floor(step * 2 * num_layers / total_steps)  # one layer per T / (2 L) steps
    on = layers >= num_layers - 1 - enabled
  else:
    on = jnp.ones(num_layers, bool)
  return on | (layers == num_layers - 1)


def exit_weights(num_layers: int, e_scale: float, curriculum: str, step, *,
                 rotation_every: int, total_steps: int):
  """e~(t, l): [num_layers] weights of the layers' losses, summing to 1."""
  scales = jnp.where(active_exits(num_layers, curriculum, step, rotation_every=rotation_every,
                                  total_steps=total_steps),
                     exit_scales(num_layers, e_scale), 0.0)
  return scales / jnp.sum(scales)


@register("layerskip")
class LayerSkip(Standard):
  """`train.method="layerskip"`: the model's params, trained with layer dropout and the
  early-exit loss (the module docstring); `standard` when both are off."""

  config_section = {"p_max": 0.0, "early_exit_scale": 0.0, "curriculum": "none",
                    "rotation_every": 2}

  @classmethod
  def check_config(cls, config, model_config) -> None:
    ls = config.layerskip
    need = lambda ok, key, what: checks.need(config, ok, key, what)
    need(0 <= ls.p_max < 1, "layerskip.p_max", "must be in [0, 1) (0 is off)")
    need(ls.early_exit_scale >= 0, "layerskip.early_exit_scale", "must not be negative (0 is off)")
    need(ls.curriculum in CURRICULA, "layerskip.curriculum", f"is not one of {CURRICULA}")
    need(ls.rotation_every >= 1, "layerskip.rotation_every", "must be at least 1")
    if not (ls.p_max > 0 or ls.early_exit_scale > 0):
      return
    if not getattr(model_config, "early_exit", False):
      raise ConfigError(f"train.method='layerskip' needs a model that exits early (the "
                        f"transformer), not model.name={config.model.name!r}")
    need(model_config.num_layers >= 2, "model.num_layers", "is too few for LayerSkip (2 or more)")
    need(model_config.layer_group == 1, "model.moe.every",
         "groups layers in one block: LayerSkip's layer dropout and exits are per layer (use 1)")

  def __init__(self, config, model_config, hooks=()):
    super().__init__(config, model_config, hooks)
    ls = config.layerskip
    self.exit_loss = ls.early_exit_scale > 0
    if ls.p_max > 0 or self.exit_loss:
      self.model = model_config.make_model(
          plan=LayerPlan(layer_dropout=ls.p_max, layer_outputs=self.exit_loss))

  def objective(self, params, batch, rng, *, step):
    """(value, sums) of one batch at train step `step` (the curriculum's t)."""
    if not self.exit_loss:
      return super().objective(params, batch, rng)
    ls, tc = self.config.layerskip, self.config.train
    logits, variables = self.model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
        mutable=[AUX_LOSS, METRICS, "intermediates"],
        rngs=None if rng is None else {"dropout": rng})
    value, sums = with_sown(*token_loss_sums(logits, batch, tc.z_loss), variables)
    exits = variables["intermediates"]["exit_logits"][0]  # [L - 1, batch, length, vocab]
    log_p, _ = target_log_probs(exits, jnp.broadcast_to(batch["targets"], exits.shape[:-1]))
    weights = (batch["segment_ids"] > 0).astype(jnp.float32)
    exit_nll = -jnp.sum(log_p * weights, axis=(1, 2))  # [L - 1]
    scales = exit_weights(self.model_config.num_layers, ls.early_exit_scale, ls.curriculum, step,
                          rotation_every=ls.rotation_every, total_steps=tc.steps)
    early_exit = jnp.sum(scales[:-1] * exit_nll) + (scales[-1] - 1) * sums["nll"]
    return value + early_exit, {**sums, "aux_loss/early_exit": early_exit,
                                **{f"{MEAN}exit_loss/{l}": nll for l, nll in enumerate(exit_nll)}}

  def step(self, state, batch):
    tc = self.config.train
    return train_step(state, batch, objective=functools.partial(self.objective, step=state.step),
                      optimizer=self.optimizer, schedule=self.schedule, grad_accum=tc.grad_accum,
                      trainable=tc.trainable, hooks=self.hooks)

"""Training: the train state, optimizer, jitted step, eval, and the resumable loop."""
import functools
import json
import os
import re
import signal
import time
from typing import Any, Callable, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from llm_research import data, init_from, sharding
from llm_research.checkpoints import Checkpointer
from llm_research.config import ConfigError
from llm_research.metrics import MetricsWriter, peak_flops_per_device
from llm_research.models import registry
from llm_research.models.stack import AUX_LOSS, METRICS, collect_aux_losses


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw key data (uint32), so the checkpoint holds it like any array


class AfterStepHook(NamedTuple):
  """`fn(state) -> state`, run inside the compiled train step after every `every`-th update
  (when the new step is a multiple of `every`); e.g. LTE merges its adapters every T steps."""

  every: int
  fn: Callable[["TrainState"], "TrainState"]


def model_config_from(config, vocab_size: int):
  """The registered model config `config.model` describes (llm_research.models.registry)."""
  return registry.model_config(config.model, vocab_size)


def learning_rate_schedule(tc) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine or linear decay to `final_lr_fraction` of it.

  "two_stage" (BitNet b1.58): the peak until half-way, then a drop to `final_lr_fraction` of
  it, cosine-decayed to zero by the end; weight decay stops at the drop (`weight_decay_schedule`).
  """
  decay_steps = max(tc.steps - tc.warmup_steps, 1)
  final = tc.learning_rate * tc.final_lr_fraction
  if tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tc.learning_rate, decay_steps, alpha=tc.final_lr_fraction)
  elif tc.schedule == "linear":
    decay = optax.linear_schedule(tc.learning_rate, final, decay_steps)
  elif tc.schedule == "two_stage":
    half = max(tc.steps // 2 - tc.warmup_steps, 0)
    decay = optax.join_schedules(
        [optax.constant_schedule(tc.learning_rate),
         optax.cosine_decay_schedule(final, max(tc.steps - tc.steps // 2, 1))], [half])
  else:
    raise ConfigError(f"train.schedule={tc.schedule!r} is not 'cosine', 'linear' or 'two_stage'")
  warmup = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
  return optax.join_schedules([warmup, decay], [tc.warmup_steps])


def weight_decay_schedule(tc):
  """`weight_decay` throughout, except zero from half-way under the two-stage schedule."""
  if tc.schedule != "two_stage":
    return tc.weight_decay
  return lambda step: jnp.where(step < tc.steps // 2, tc.weight_decay, 0.0)


def param_path(path) -> str:
  """'layers/attn/query/kernel' from a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params, pattern: str):
  """True for the params `train.trainable` selects: those whose path ('layers/mlp/up/lora_a')
  matches the regular expression `pattern` (re.search); every param when it is empty."""
  regex = re.compile(pattern) if pattern else None
  # A boxed param (nn.Partitioned, as the optimizer sees it at init) is one leaf: its path
  # is the param's own, not '.../value'.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: regex is None or bool(regex.search(param_path(path))), params,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def make_optimizer(tc) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; weight decay only on matrices (kernels, embedding,
  adapters). Params outside `train.trainable` are frozen: no update, no optimizer state (and
  their gradients count in neither the clipping norm nor grad_norm)."""
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding", "lora_a",
                                                         "lora_b"), params)
  adamw = optax.chain(
      optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                  weight_decay=weight_decay_schedule(tc), mask=decay_mask))
  if not tc.trainable:
    return adamw
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                       trainable_mask(params, tc.trainable))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)


def token_losses(logits, targets, weights, z_loss: float = 0.0):
  """Sums over tokens: (objective, negative log-likelihood, number of tokens)."""
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  nll_sum = jnp.sum(nll * weights)
  return nll_sum + z_loss * jnp.sum(jnp.square(log_z) * weights), nll_sum, jnp.sum(weights)


# A loss-sums key "mean/<name>" is a sum divided by the count when logged, as `<name>` (train)
# and `eval_<name>` (eval): e.g. a classifier's correct rows, logged as accuracy.
MEAN = "mean/"


def token_loss_sums(logits, batch, z_loss):
  """The default objective: next-token cross-entropy over the tokens with segment_ids > 0;
  (objective, {"nll": its sum, "count": tokens})."""
  objective, nll, count = token_losses(logits, batch["targets"], batch["segment_ids"] > 0,
                                       z_loss)
  return objective, {"nll": nll, "count": count}


def _batch_losses(params, model, batch, z_loss):
  """(objective, sums) over one batch's tokens: sums are the NLL, the token count, per
  auxiliary loss the model sows that loss times the token count (so that dividing by the
  whole batch's count weighs micro-batches by their tokens, like the NLL), and the metrics it
  sows (`sow_metric`: counts, summed over micro-batches as they are).

  The model's config may define its own objective, `loss_sums(outputs, batch, z_loss) ->
  (objective, sums)` with "nll", "count" and MEAN sums (e.g. bGPT's classifier); None or
  absent: `token_loss_sums`."""
  chex.assert_equal_shape([batch[k] for k in ("inputs", "targets", "segment_ids", "positions")])
  outputs, variables = model.apply(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
      mutable=[AUX_LOSS, METRICS])
  loss_sums = getattr(getattr(model, "config", None), "loss_sums", None) or token_loss_sums
  objective, sums = loss_sums(outputs, batch, z_loss)
  aux = {f"aux_loss/{name}": value * sums["count"]
         for name, value in collect_aux_losses(variables).items()}
  return objective + sum(aux.values()), {**sums, **aux, **collect_aux_losses(variables, METRICS)}


def train_step(state: TrainState, batch: dict, *, model, optimizer, schedule, grad_accum: int,
               z_loss: float, trainable: str = "", hooks: tuple[AfterStepHook, ...] = ()):
  """One optimizer update on a global batch, optionally in `grad_accum` micro-batches, then
  the after-step hooks that are due.

  The gradient is that of the mean token loss (plus the auxiliary losses) over the whole
  batch, however it is split.
  """
  grads, sums = accumulated(lambda b: _grads_and_sums(state.params, model, b, z_loss), batch,
                            grad_accum)
  count = jnp.maximum(sums.pop("count"), 1.0)
  # Frozen params' gradients are zeros (constants: XLA drops the work that computed them).
  grads = jax.tree.map(lambda g, t: g / count if t else jnp.zeros_like(g), grads,
                       trainable_mask(grads, trainable))
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
  new_state = apply_hooks(new_state, hooks)
  metrics = {"loss": sums.pop("nll") / count, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state.step), **per_count(sums, count)}
  return new_state, metrics


def per_count(sums: dict, count) -> dict:
  """Logged metrics from loss sums: auxiliary losses and MEAN sums divided by the count (the
  latter renamed to their name), metrics as they are."""
  return {k.removeprefix(MEAN): v / count if k.startswith(("aux_loss/", MEAN)) else v
          for k, v in sums.items()}


def accumulated(grads_and_sums: Callable, batch: dict, grad_accum: int):
  """`grads_and_sums(batch)` (a pytree of sums), summed over `grad_accum` micro-batches of
  `batch` under a scan: micro-batch k holds rows k, k + grad_accum, ... (each device's rows stay
  local)."""
  if grad_accum == 1:
    return grads_and_sums(batch)
  # [batch, ...] -> [grad_accum, batch / grad_accum, ...]
  micro = jax.tree.map(
      lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1),
      batch)

  def accumulate(carry, micro_batch):
    return jax.tree.map(jnp.add, carry, grads_and_sums(micro_batch)), None

  shapes = jax.eval_shape(grads_and_sums, jax.tree.map(lambda x: x[0], micro))
  total, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, shapes), micro)
  return total


def apply_hooks(state: TrainState, hooks: tuple[AfterStepHook, ...]) -> TrainState:
  """Runs each hook due at `state.step` (a multiple of its `every`), in order."""
  for hook in hooks:
    state = jax.lax.cond(state.step % hook.every == 0, hook.fn, lambda s: s, state)
  return state


def _grads_and_sums(params, model, batch, z_loss):
  """Gradient of the summed objective, with the sums `_batch_losses` gives."""
  (_, sums), grads = jax.value_and_grad(
      lambda p: _batch_losses(p, model, batch, z_loss), has_aux=True)(params)
  return grads, sums


def eval_step(params, batch, *, model):
  """The NLL, count and MEAN sums of one batch."""
  _, sums = _batch_losses(params, model, batch, 0.0)
  return {k: v for k, v in sums.items() if k in ("nll", "count") or k.startswith(MEAN)}


def data_options(model_config) -> dict:
  """Keyword arguments the model adds to the data iterators (its config's `data_options()`,
  e.g. bGPT's patch_size), else none."""
  options = getattr(model_config, "data_options", None)
  return options() if options else {}


def checked_mesh(config) -> jax.sharding.Mesh:
  """The run's mesh; refuses a batch or micro-batch its data axes cannot split evenly."""
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_batch_size(tc.batch_size, mesh, rules)
  if tc.grad_accum < 1 or tc.batch_size % tc.grad_accum:
    raise ConfigError(f"train.grad_accum={tc.grad_accum} must divide "
                      f"train.batch_size={tc.batch_size}")
  sharding.check_batch_size(
      tc.batch_size // tc.grad_accum, mesh, rules,
      what=f"the micro-batch of train.batch_size={tc.batch_size} / "
           f"train.grad_accum={tc.grad_accum} = {tc.batch_size // tc.grad_accum} rows")
  if tc.method == "lte":  # the heads fit the mesh, and split the batch
    method_class("lte").check_mesh(config, mesh)
  return mesh


def check_config_values(config) -> None:
  """Refuses, naming the key, a `model`, `train`, `data` or `sample` value no run can use;
  cheap, so runs first (the mesh is `checked_mesh`'s)."""
  tc, dc, sc = config.train, config.data, config.sample
  if config.model.get("linear_impl") == "ternary_packed":
    raise ConfigError("model.linear_impl='ternary_packed' is for inference: train with "
                      "'bitnet', then pack the run (python -m llm_research.pack)")

  def need(ok: bool, key: str, what: str) -> None:
    if not ok:
      section, name = key.split(".")
      raise ConfigError(f"{key}={config[section][name]!r} {what}")

  for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
               "checkpoint_every", "keep_checkpoints"):
    need(tc[name] >= 1, f"train.{name}", "must be at least 1")
  for name in ("learning_rate", "warmup_steps", "weight_decay", "grad_clip", "z_loss",
               "peak_flops_per_device"):
    need(tc[name] >= 0, f"train.{name}", "must not be negative")
  need(0 <= tc.final_lr_fraction <= 1, "train.final_lr_fraction", "must be in [0, 1]")
  need(0 <= tc.b1 < 1, "train.b1", "must be in [0, 1)")
  need(0 <= tc.b2 < 1, "train.b2", "must be in [0, 1)")
  learning_rate_schedule(tc)  # an unknown train.schedule is a ConfigError naming it
  try:
    re.compile(tc.trainable)
  except re.error as error:
    raise ConfigError(f"train.trainable={tc.trainable!r} is not a regular expression: "
                      f"{error}") from None
  need(tc.method in METHODS, "train.method", f"is not one of {METHODS}")
  need(dc.source in ("stdlib", "tfds", "text_dir", "bytes"), "data.source",
       "is not 'stdlib', 'tfds', 'text_dir' or 'bytes'")
  need(dc.source != "stdlib" or dc.stdlib_config in ("full", "tiny"), "data.stdlib_config",
       "is not 'full' or 'tiny'")
  need(dc.tokenizer in ("sentencepiece", "byte"), "data.tokenizer",
       "is not 'sentencepiece' or 'byte'")
  # SentencePiece's byte-fallback BPE holds 256 byte pieces and pad, bos, eos, unk, plus one
  # piece per distinct character of the corpus (its exact need shows when it trains).
  need(dc.tokenizer != "sentencepiece" or dc.vocab_size > 260, "data.vocab_size",
       "is too small for data.tokenizer='sentencepiece': its 256 byte pieces and 4 special "
       "pieces leave no room for the corpus's characters (use a few hundred or more)")
  need(dc.seq_len >= 1, "data.seq_len", "must be at least 1")
  need(sc.max_new_tokens >= 0, "sample.max_new_tokens", "must not be negative")
  need(sc.temperature >= 0, "sample.temperature", "must not be negative (0 is greedy)")
  need(sc.top_k >= 0, "sample.top_k", "must not be negative (0 is off)")
  need(0 < sc.top_p <= 1, "sample.top_p", "must be in (0, 1] (1 is off)")
  # The model's own checks (its config class, and the data it takes: `check_data`), at the
  # vocab the tokenizer will have.
  model_config = model_config_from(config, data.pipeline.vocab_size(dc))
  if hasattr(model_config, "check_data"):
    model_config.check_data(dc)
  if dc.source == "bytes":  # rows whose inputs are their targets: the model shifts (bGPT)
    if not getattr(model_config, "supplies_start", False):
      raise ConfigError(f"data.source='bytes' is for a model that predicts each byte from the "
                        f"ones before it by itself (model.name='bgpt'), not "
                        f"model.name={config.model.name!r}")
    data.pipeline.check_byte_config(dc, **data_options(model_config))
  if tc.method == "lte":  # the lte section, for this model
    method_class("lte").check_config(config, model_config)


class Standard:
  """`train.method="standard"`: the model's params trained directly by `train_step`.

  The method seam: a method gives the Trainer its logical-axis `rules`, `init(params_key,
  state_key)` (a boxed TrainState), `step(state, batch) -> (state, metrics)` (hooks included),
  `trained(params)` (the tree train.trainable selects from), `model_params` (None, or a function
  of state.params giving the model's params to eval and sampling) and
  `model_param_shardings(params_shardings)`. `llm_research.methods.lte.LTE` is the other.
  """

  model_params = None  # state.params are the model's params

  def __init__(self, trainer: "Trainer", hooks: tuple[AfterStepHook, ...] = ()):
    tc = trainer.config.train
    self.model, self.optimizer = trainer.model, trainer.optimizer
    self.seq_len = trainer.config.data.seq_len
    self.rules = sharding.rules_from_config(trainer.config)
    self.step = functools.partial(train_step, model=self.model, optimizer=self.optimizer,
                                  schedule=learning_rate_schedule(tc), grad_accum=tc.grad_accum,
                                  z_loss=tc.z_loss, trainable=tc.trainable, hooks=tuple(hooks))

  def init(self, params_key, state_key) -> TrainState:
    params = self.model.init(params_key, jnp.zeros((1, self.seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params), rng=jax.random.key_data(state_key))

  def trained(self, params):
    return params

  def model_param_shardings(self, params_shardings):
    return params_shardings


METHODS = ("standard", "lte")


def method_class(name: str) -> type:
  """The class of `train.method=name` (Standard, or methods/lte.py's LTE)."""
  if name == "lte":
    from llm_research.methods import lte  # lte builds on this module: imported when used
    return lte.LTE
  return Standard


class Trainer:
  """Everything a run needs, built from its config: model, mesh, optimizer, the training
  method (`train.method`), compiled steps.

  `hooks` (AfterStepHook) run inside the compiled step, after the updates they are due at.
  """

  def __init__(self, config, tokenizer, hooks: tuple[AfterStepHook, ...] = ()):
    tc = config.train
    self.config = config
    self.tokenizer = tokenizer
    self.model_config = model_config_from(config, tokenizer.vocab_size)
    self.model = self.model_config.make_model()
    self.mesh = checked_mesh(config)
    self.optimizer = make_optimizer(tc)
    self.method = method_class(tc.method)(self, tuple(hooks))
    self.rules = self.method.rules
    abstract = jax.eval_shape(self._init_boxed)
    trained = nn.meta.unbox(self.method.trained(abstract.params))
    if not any(jax.tree.leaves(trainable_mask(trained, tc.trainable))):
      paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(trained)]
      raise ConfigError(f"train.trainable={tc.trainable!r} matches no param (they are "
                        f"{', '.join(paths[:6])}, ...)")
    self.state_shardings = sharding.logical_shardings(abstract, self.mesh, self.rules)
    self.params_shardings = self.method.model_param_shardings(self.state_shardings.params)
    batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self._train_step = jax.jit(self.method.step,
                               in_shardings=(self.state_shardings, batch_sharding),
                               out_shardings=(self.state_shardings, None), donate_argnums=0)
    self._eval_step = jax.jit(functools.partial(eval_step, model=self.model),
                              in_shardings=(self.params_shardings, batch_sharding))
    self._model_params = None if self.method.model_params is None else jax.jit(
        self.method.model_params, in_shardings=(self.state_shardings.params,),
        out_shardings=self.params_shardings)

  def _init_boxed(self) -> TrainState:
    params_key, state_key = jax.random.split(jax.random.key(self.config.train.seed))
    return self.method.init(params_key, state_key)

  def model_params(self, state: TrainState):
    """The model's params in `state`, which eval and sampling read: `state.params` itself,
    or what the method makes of them (LTE: the main params, merged)."""
    if self._model_params is None:
      return state.params
    with sharding.activate(self.mesh, self.rules):
      return self._model_params(state.params)

  def init_state(self, params=None) -> TrainState:
    """A fresh state, created already sharded (no host holds a full copy); with `params`
    (e.g. another run's, converted: train.init_from), those at step 0 with a fresh optimizer."""
    with sharding.activate(self.mesh, self.rules):
      if params is None:
        return jax.jit(lambda: nn.meta.unbox(self._init_boxed()),
                       out_shardings=self.state_shardings)()
      params = jax.device_put(params, self.state_shardings.params)
      return jax.jit(self._state_with, out_shardings=self.state_shardings)(params)

  def _state_with(self, params) -> TrainState:
    _, state_key = jax.random.split(jax.random.key(self.config.train.seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params), rng=jax.random.key_data(state_key))

  def abstract_state(self) -> TrainState:
    shapes = nn.meta.unbox(jax.eval_shape(self._init_boxed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def step(self, state: TrainState, local_batch: dict):
    with sharding.activate(self.mesh, self.rules):
      return self._train_step(state, sharding.shard_batch(local_batch, self.mesh, self.rules))

  def lower_step(self, state, batch):
    """The train step lowered for these (possibly abstract) arguments: `.compile()` it."""
    with sharding.activate(self.mesh, self.rules):
      return self._train_step.lower(state, batch)

  def evaluate(self, params, num_batches: int) -> dict:
    """Mean loss over the first `num_batches` batches of the validation split (per token, or
    per what the model's objective counts), its perplexity, the MEAN sums' means as
    `eval_<name>`, and, for a model that declares the unit of its loss (`loss_unit`, e.g.
    bGPT's "byte"), `eval_bits_per_<unit>` (the loss / ln 2)."""
    global_batch_size = self.config.train.batch_size
    it = data.make_eval_iterator(
        self.config.data, self.tokenizer, global_batch_size=global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        split=self.config.data.eval_split, **data_options(self.model_config))
    rows = global_batch_size // jax.process_count()
    empty_batch = {k: np.zeros((rows, self.config.data.seq_len), np.int32)
                   for k in ("inputs", "targets", "segment_ids", "positions")}
    totals = {}
    with sharding.activate(self.mesh, self.rules):
      for _ in range(num_batches):
        # Every process runs the same number of steps: one out of data feeds empty rows.
        batch = next(it, None)
        if batch is None:
          batch = empty_batch
        else:  # empty rows of the same keys (e.g. a classifier's labels)
          empty_batch = {k: np.zeros_like(v) for k, v in batch.items()}
        sums = self._eval_step(params, sharding.shard_batch(batch, self.mesh, self.rules))
        totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
    nll, count = totals.pop("nll"), totals.pop("count")
    if count == 0:
      raise ConfigError(f"the {self.config.data.eval_split!r} split (data.eval_split) gave no "
                        "tokens to evaluate on")
    result = {"eval_loss": nll / count, "eval_perplexity": float(np.exp(nll / count)),
              **{f"eval_{k}": v for k, v in per_count(totals, count).items()}}
    unit = getattr(self.model_config, "loss_unit", None)
    if unit:
      result[f"eval_bits_per_{unit}"] = nll / count / np.log(2)
    return result


class _Preemption:
  """Whether to save and stop now. One process: on SIGTERM (how a preempted VM is told).
  Several: JAX's preemption sync, which has its own SIGTERM handler and stops every host at
  the same step."""

  def __init__(self, checkpointer: Checkpointer):
    self._checkpointer = checkpointer
    self._single = jax.process_count() == 1
    self._signalled = False
    if self._single:
      self._previous = signal.signal(signal.SIGTERM, self._set)

  def _set(self, *_):
    self._signalled = True

  def reached(self, step: int) -> bool:
    return self._signalled if self._single else self._checkpointer.reached_preemption(step)

  def close(self):
    if self._single:
      signal.signal(signal.SIGTERM, self._previous)


def shape_keys(config) -> tuple[str, ...]:
  """The keys that fix the shapes of a run's checkpoints (a workdir's run keeps them): the
  model, its shape fields (registry.shape_field), the tokenizer; the training method, and
  LTE's heads, rank and main dtype."""
  lte = ("lte.heads", "lte.rank", "lte.main_dtype") if config.train.method == "lte" else ()
  return (("model.name",) + tuple(f"model.{k}" for k in registry.shape_keys(config.model.name))
          + ("data.tokenizer", "data.vocab_size", "train.method") + lte)


def check_same_shapes(config, workdir: str) -> None:
  """Refuses a config whose checkpoints could not be those already in `workdir`."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(path) as f:
    previous = json.load(f)
  changed = []
  for key in shape_keys(config):
    section, name = key.split(".")
    before, now = previous.get(section, {}).get(name), config[section][name]
    if before is not None and before != now:
      changed.append(f"{key}: {before!r} there, {now!r} here")
  if changed:
    raise ConfigError(f"workdir {workdir!r} holds a run with other shapes ({'; '.join(changed)}): "
                      "use a new --workdir, or the run's own config to resume it")


def train_and_evaluate(config, workdir: str, hooks: tuple[AfterStepHook, ...] = ()) -> dict:
  """Trains per `config` in `workdir`, resuming from its newest good checkpoint.

  Returns the last logged metrics (with the final eval). Saves every `checkpoint_every` steps,
  on SIGTERM and at the end; a resumed run continues the exact trajectory (params, optimizer,
  step, RNG and data position all come from the checkpoint). Writes `workdir/config.json` only
  once the config has passed every check (values, mesh, batch, data, the checkpoints' state),
  so a bad command leaves an existing run's record as it was.

  The first step after a start or resume compiles: its wall time is the first record's
  `compile_time_s`, and `step_time_s`, `tokens_per_s` and `mfu` time only the steps after it.

  A new run with `train.init_from` starts from that run's params (llm_research.init_from).
  """
  tc = config.train
  check_config_values(config)
  check_same_shapes(config, workdir)
  checked_mesh(config)  # before the data and tokenizer, which may take minutes to build
  source = None
  if tc.init_from and not init_from.has_checkpoints(workdir):
    source = init_from.check(config)
  tokenizer = data.get_tokenizer(config.data)
  trainer = Trainer(config, tokenizer, hooks)
  initial_params = None
  if source is not None:
    initial_params = init_from.initial_params(source, trainer.model_config, trainer.mesh,
                                              trainer.rules, seed=tc.seed)
  train_iter = data.make_train_iterator(
      config.data, tokenizer, global_batch_size=tc.batch_size, seed=config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      **data_options(trainer.model_config))
  checkpointer = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoints)
  try:  # a checkpoint that does not fit the config: an error before config.json is written
    state, start = checkpointer.restore_latest(trainer.abstract_state(), train_iter, config)
  except ConfigError:
    checkpointer.close()
    raise
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if state is None:
    state = trainer.init_state(initial_params)
    if source is not None:
      print(f"starting from the params of {source.workdir} (step {source.step})")
  writer = MetricsWriter(workdir)
  writer.truncate_after(start)
  if start >= tc.steps:
    print(f"{workdir} is already at step {start} of train.steps={tc.steps}: nothing to train")

  tokens_per_step = tc.batch_size * config.data.seq_len
  flops_per_step = trainer.model_config.flops_per_token(config.data.seq_len) * tokens_per_step
  peak = peak_flops_per_device(tc.peak_flops_per_device)
  preemption = _Preemption(checkpointer)
  bar = tqdm(total=tc.steps, initial=start, desc="train", disable=not tc.progress_bar
             or jax.process_index() != 0, dynamic_ncols=True)
  record, interval_steps, compile_time = {}, 0, None
  interval_start = time.perf_counter()
  try:
    for step in range(start + 1, tc.steps + 1):
      state, metrics = trainer.step(state, next(train_iter))
      if step == start + 1:  # compiles: timed apart, into the next record's compile_time_s
        jax.block_until_ready(metrics)
        compile_time, interval_start = time.perf_counter() - interval_start, time.perf_counter()
      else:
        interval_steps += 1
      is_last = step == tc.steps
      if step % tc.log_every == 0 or is_last or step % tc.eval_every == 0:
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        record["perplexity"] = float(np.exp(record["loss"]))
        if compile_time is not None:
          record["compile_time_s"], compile_time = compile_time, None
        if interval_steps:  # not for the first step alone: it was all compilation
          seconds = (time.perf_counter() - interval_start) / interval_steps
          record.update(step_time_s=seconds, tokens_per_s=tokens_per_step / seconds)
          if peak:
            record["mfu"] = flops_per_step / seconds / (peak * jax.device_count())
        if step % tc.eval_every == 0 or is_last:
          record.update(trainer.evaluate(trainer.model_params(state), tc.eval_batches))
        writer.write(step, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        interval_start, interval_steps = time.perf_counter(), 0
      bar.update(1)
      preempted = preemption.reached(step)
      if step % tc.checkpoint_every == 0 or is_last or preempted:
        checkpointer.save(step, state, train_iter)
      if preempted:
        checkpointer.wait()
        print(f"stopped by SIGTERM; saved step {step}. Re-run the same command to resume.")
        break
  finally:
    preemption.close()
    bar.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return record


def unigram_baseline(config, tokenizer, *, train_batches: int = 100) -> float:
  """Validation cross-entropy of the unigram distribution of the first `train_batches`
  training batches (add-one smoothed): the loss a model with no context would reach."""
  kwargs = dict(global_batch_size=config.train.batch_size, process_index=jax.process_index(),
                process_count=jax.process_count(),
                **data_options(model_config_from(config, tokenizer.vocab_size)))
  counts = np.ones(tokenizer.vocab_size)
  train_iter = data.make_train_iterator(config.data, tokenizer, seed=config.data.shuffle_seed,
                                       **kwargs)
  for _, batch in zip(range(train_batches), train_iter):
    np.add.at(counts, batch["targets"][batch["segment_ids"] > 0], 1)
  log_probs = np.log(counts / counts.sum())
  nll, n = 0.0, 0
  for _, batch in zip(range(config.train.eval_batches),
                      data.make_eval_iterator(config.data, tokenizer,
                                              split=config.data.eval_split, **kwargs)):
    targets = batch["targets"][batch["segment_ids"] > 0]
    nll, n = nll - log_probs[targets].sum(), n + targets.size
  return nll / max(n, 1)

"""The Trainer: everything a run computes with, built from its config: the model, the mesh,
the training method (`train.method`), the sharded state and the compiled steps; evaluation."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_research import data, sharding
from llm_research.errors import ConfigError
from llm_research.training.checks import checked_mesh, data_options, model_config_from
from llm_research.training.method import method_class
from llm_research.training.objective import eval_sums, model_objective, per_count
from llm_research.training.optimizer import param_path, trainable_mask
from llm_research.training.state import AfterStepHook, TrainState


class Trainer:
  """A run's model, mesh, method and compiled steps (`mesh`: the run's, when already checked).

  `hooks` (AfterStepHook) run inside the compiled step, after the updates they are due at.
  """

  def __init__(self, config, tokenizer, hooks: tuple[AfterStepHook, ...] = (), *, mesh=None):
    tc = config.train
    self.config = config
    self.tokenizer = tokenizer
    self.model_config = model_config_from(config, tokenizer.vocab_size)
    self.model = self.model_config.make_model()
    self.mesh = checked_mesh(config) if mesh is None else mesh
    self.method = method_class(tc.method)(config, self.model_config, tuple(hooks))
    self.optimizer = self.method.optimizer
    self.rules = self.method.rules
    abstract = jax.eval_shape(self._init)
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
    self._eval_step = jax.jit(functools.partial(eval_sums, objective=model_objective(self.model)),
                              in_shardings=(self.params_shardings, batch_sharding))
    self._model_params = jax.jit(self.method.model_params,
                                 in_shardings=(self.state_shardings.params,),
                                 out_shardings=self.params_shardings)

  def _init(self, params=None) -> TrainState:
    """The state at step 0 (boxed in logical axes when the model's params are fresh): the
    model's params from the seed or given, the method's state from them, the run's key."""
    params_key, method_key, run_key = jax.random.split(jax.random.key(self.config.train.seed), 3)
    if params is None:
      params = self.model.init(params_key, jnp.zeros((1, self.config.data.seq_len),
                                                     jnp.int32))["params"]
    state_params, opt_state = self.method.init(params, method_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=state_params, opt_state=opt_state,
                      rng=jax.random.key_data(run_key))

  def model_params(self, state: TrainState):
    """The model's params in `state`, which eval and sampling read: `state.params` itself,
    or what the method makes of them (LTE: the main params, merged)."""
    with sharding.activate(self.mesh, self.rules):
      return self._model_params(state.params)

  def init_state(self, params=None) -> TrainState:
    """A fresh state, created already sharded (no host holds a full copy); with the model's
    `params` (e.g. another run's, converted: train.init_from), the method's state from them at
    step 0 with a fresh optimizer."""
    with sharding.activate(self.mesh, self.rules):
      init = jax.jit(lambda *p: nn.meta.unbox(self._init(*p)), out_shardings=self.state_shardings)
      return init() if params is None else init(jax.device_put(params, self.params_shardings))

  def abstract_state(self) -> TrainState:
    shapes = nn.meta.unbox(jax.eval_shape(self._init))
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

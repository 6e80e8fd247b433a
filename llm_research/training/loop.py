"""The resumable training loop (`train_and_evaluate`), preemption, and the unigram baseline."""
import os
import signal
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from llm_research import data, init_from
from llm_research.checkpoints import Checkpointer
from llm_research.errors import ConfigError
from llm_research.metrics import MetricsWriter, peak_flops_per_device
from llm_research.training.checks import (check_config_values, check_same_shapes, checked_mesh,
                                          data_options, model_config_from)
from llm_research.training.method import DEFAULT_METHOD, method_class
from llm_research.training.state import AfterStepHook
from llm_research.training.trainer import Trainer

# The exit status of `python -m llm_research.main` for a run stopped by SIGTERM after saving
# (sysexits' EX_TEMPFAIL: "try again"): a wrapper that reruns until status 0 resumes it.
PREEMPTED_EXIT_STATUS = 75


class Preempted(Exception):
  """Raised by `train_and_evaluate` when SIGTERM (or JAX's preemption sync) stopped the run,
  once its step is saved: re-running the same call resumes it."""

  def __init__(self, step: int):
    super().__init__(f"stopped by SIGTERM; saved step {step}. Re-run the same command to "
                     "resume.")
    self.step = step


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


def params_from_source(source, trainer, *, seed: int):
  """The params a run of `trainer` starts from when `train.init_from` names `source` (what
  `init_from.check` returned): the source run's newest model params (those its training method
  hands to evaluation) through the surgery to the trainer's model, sharded on its mesh."""
  source_method = method_class(source.config.train.get("method", DEFAULT_METHOD))(
      source.config, source.model_config)
  return init_from.initial_params(source, source_method, trainer.model_config, trainer.mesh,
                                  trainer.rules, seed=seed)


def train_and_evaluate(config, workdir: str, hooks: tuple[AfterStepHook, ...] = ()) -> dict:
  """Trains per `config` in `workdir`, resuming from its newest good checkpoint.

  Returns the last logged metrics (with the final eval). Saves every `checkpoint_every` steps
  and at the end; on SIGTERM saves the step it is at and raises `Preempted`. A resumed run
  continues the exact trajectory (params, optimizer, step, RNG and data position all come from
  the checkpoint). Writes `workdir/config.json` only once the config has passed every check
  (values, mesh, batch, data, the checkpoints' state), so a bad command leaves an existing
  run's record as it was.

  The first step after a start or resume compiles: its wall time is the first record's
  `compile_time_s`, and `step_time_s`, `tokens_per_s` and `mfu` time only the steps after it.

  A new run with `train.init_from` starts from that run's model params (llm_research.init_from),
  whatever the training method of either run.
  """
  tc = config.train
  check_config_values(config)
  check_same_shapes(config, workdir)
  mesh = checked_mesh(config)  # before the data and tokenizer, which may take minutes to build
  source = None
  if tc.init_from and not init_from.has_checkpoints(workdir):
    source = init_from.check(config)
  tokenizer = data.get_tokenizer(config.data)
  trainer = Trainer(config, tokenizer, hooks, mesh=mesh)
  initial_params = None
  if source is not None:
    initial_params = params_from_source(source, trainer, seed=tc.seed)
  train_iter = data.make_train_iterator(
      config.data, tokenizer, global_batch_size=tc.batch_size, seed=config.data.shuffle_seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      **data_options(trainer.model_config))
  data.load_source(config.data, config.data.eval_split)  # empty: an error now, not at eval
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
  else:
    print(f"resuming {workdir} from its checkpoint at step {start}")
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
        raise Preempted(step)
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

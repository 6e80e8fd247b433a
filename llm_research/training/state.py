"""The train state, and after-step hooks: functions of it run inside the compiled step."""
from typing import Any, Callable, NamedTuple

import jax
from flax import struct


@struct.dataclass
class TrainState:
  """What a checkpoint holds besides the data position. `params` and `opt_state` are the
  method's (the model's params for `standard`; LTE's heads, merged adapters and main weights).
  `rng` is the run's key as raw key data (uint32, so the checkpoint holds it like any array):
  step s draws its keys from `step_key(state)`, the same on a resumed run."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def step_key(state: TrainState) -> jax.Array:
  """The key of the step `state` is about to take: a function of the run's key and the step
  alone, so a resumed run draws the keys the uninterrupted one would (dropout, layer dropout)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


class AfterStepHook(NamedTuple):
  """`fn(state) -> state`, run inside the compiled train step after every `every`-th update
  (when the new step is a multiple of `every`); e.g. LTE merges its adapters every T steps."""

  every: int
  fn: Callable[[TrainState], TrainState]


def apply_hooks(state: TrainState, hooks: tuple[AfterStepHook, ...]) -> TrainState:
  """Runs each hook due at `state.step` (a multiple of its `every`), in order."""
  for hook in hooks:
    state = jax.lax.cond(state.step % hook.every == 0, hook.fn, lambda s: s, state)
  return state

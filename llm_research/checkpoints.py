"""Orbax checkpoints: a training run's (train state and the data iterator's position), and an
inference run's (params alone, `save_params` / `restore_params`).

A training checkpoint that cannot be restored (corrupt or partial) is refused with a message,
moved aside to `<workdir>/corrupt_checkpoints/<step>` (`<step>.1`, `<step>.2`, ... if the same
step was refused before; nothing is deleted) and the previous one is used. A damaged params
checkpoint is a `ConfigError` (pack the run again).
"""
import logging

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from llm_research.config import ConfigError


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self.workdir = epath.Path(workdir)
    self.manager = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def save(self, step: int, state, data_iterator) -> None:
    """Saves (asynchronously if so configured) the state and the data position at `step`."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice (multi-host safe)."""
    return self.manager.reached_preemption(step)

  def restore_latest(self, abstract_state, data_iterator=None):
    """(state, step) from the newest checkpoint that restores, or (None, 0) if there is none.

    `abstract_state` gives shapes, dtypes and shardings, so params come back already sharded;
    the data iterator, if given, is moved to the saved position in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # orbax raises many types for a damaged checkpoint
        self._quarantine(step, error)
        continue
      return restored.state, step
    return None, 0

  def _quarantine(self, step: int, error: Exception) -> None:
    target = self.workdir / "corrupt_checkpoints" / str(step)
    for n in range(1, 1000):  # a step refused before (e.g. corrupted again after a resume)
      if not target.exists():
        break
      target = self.workdir / "corrupt_checkpoints" / f"{step}.{n}"
    logging.error("checkpoint at step %d is corrupt or partial and is refused (%s); "
                  "moved to %s, trying the previous one", step, _describe(error), target)
    print(f"refusing corrupt checkpoint at step {step} ({type(error).__name__}); "
          f"moved to {target}; falling back to the previous checkpoint", flush=True)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.workdir / "checkpoints" / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _params_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(epath.Path(workdir).absolute() / "checkpoints",
                               item_names=("params",))


def save_params(workdir: str, step: int, params) -> None:
  """Writes `params` alone (no optimizer state, no data position) as `workdir`'s checkpoint
  `step`, and waits until it is on disk."""
  manager = _params_manager(workdir)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  manager.close()


def restore_params(workdir: str, abstract_params):
  """(params, step) of `workdir`'s newest params checkpoint, shaped like `abstract_params`."""
  manager = _params_manager(workdir)
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise ConfigError(f"{workdir!r} has no params checkpoint")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
  except Exception as error:  # orbax raises many types for a damaged checkpoint
    raise ConfigError(f"{workdir!r}: the params checkpoint at step {step} cannot be restored "
                      f"({_describe(error)})") from None
  finally:
    manager.close()
  return restored.params, step


def _describe(error: Exception) -> str:
  """'Type: first line of the message' (orbax's messages can run to pages)."""
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"

"""Orbax checkpoints: a training run's (train state and the data iterator's position), and an
inference run's (params alone, `save_params` / `restore_params`).

Restoring never loses a run. A checkpoint whose train state does not fit the config (another
optimizer state, other shapes: read from orbax's metadata, before any array) is a `ConfigError`
naming the paths that differ, with every file left where it was. A checkpoint that cannot be
read (corrupt or partial) is moved aside to `<workdir>/corrupt_checkpoints/<step>` (`<step>.1`,
... if the same step was refused before; nothing is deleted) once an older one has restored.
If none of a workdir's checkpoints can be read, nothing is moved: a `ConfigError` says so and
what to do. A damaged params checkpoint is a `ConfigError` (pack the run again). Readers
(`Checkpointer(read_only=True)`, `restore_params`) create and move nothing.
"""
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from llm_research.errors import ConfigError


class Checkpointer:
  """A run's checkpoints. `read_only` (a reader: sample, pack) changes nothing in the workdir:
  it creates no `checkpoints/` and moves no unreadable checkpoint aside (it still restores the
  newest readable one)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.workdir = epath.Path(workdir).absolute()  # orbax refuses relative paths
    self.read_only = read_only
    # Not orbax's own read_only option: it logs warnings on every open, and create=False is
    # all a reader needs from it (a reader never saves).
    self.manager = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                             enable_async_checkpointing=async_save),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def save(self, step: int, state, data_iterator) -> None:
    """Saves (asynchronously if so configured) the state and the data position at `step`."""
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got a preemption notice (multi-host safe)."""
    return self.manager.reached_preemption(step)

  def restore_latest(self, abstract_state, data_iterator=None, config=None):
    """(state, step) from the newest checkpoint that restores, or (None, 0) if there is none.

    `abstract_state` gives shapes, dtypes and shardings, so params come back already sharded;
    the data iterator, if given, is moved to the saved position in place. Raises `ConfigError`,
    with nothing moved, if the newest readable checkpoint does not fit `abstract_state` (naming
    the differing paths, and with `config` the keys changed since the workdir's config.json),
    or if checkpoints exist and none can be read. Unreadable checkpoints newer than the one
    restored are moved to `corrupt_checkpoints/`.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    steps = sorted(self.manager.all_steps(), reverse=True)
    unreadable = []  # (step, error) of the checkpoints that failed, newest first
    for step in steps:
      try:
        saved = self._saved_state_metadata(step)
      except Exception as error:  # orbax raises many types for a damaged checkpoint
        unreadable.append((step, error))
        continue
      difference = describe_difference(saved, abstract_state)
      if difference:
        changed = changed_config_keys(config, self.workdir / "config.json") if config else ""
        raise ConfigError(
            f"checkpoint {step} in {self.workdir / 'checkpoints'} does not fit this config: "
            f"{difference}{changed}. Resume with the run's own config ({self.workdir}/config.json "
            "holds it), or use a new --workdir; nothing in the workdir was changed")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # orbax raises many types for a damaged checkpoint
        unreadable.append((step, error))
        continue
      for bad_step, bad_error in unreadable:
        self._quarantine(bad_step, bad_error, restored=step)
      return restored.state, step
    if unreadable:
      failures = "; ".join(f"step {s}: {_describe(e, limit=100)}" for s, e in unreadable)
      advice = ("this run has nothing to read" if self.read_only else
                f"To start this run over from step 0, move {self.workdir / 'checkpoints'} aside "
                f"(e.g. to {self.workdir / 'corrupt_checkpoints'}/all) and run the same command "
                "again, or use a new --workdir")
      raise ConfigError(
          f"none of the {len(steps)} checkpoints in {self.workdir / 'checkpoints'} can be "
          f"restored ({failures}); nothing was moved: {advice}")
    return None, 0

  def _saved_state_metadata(self, step: int):
    """The train state's tree of array metadata at `step`, read without restoring arrays."""
    metadata = self.manager.item_metadata(step).state
    tree = getattr(metadata, "tree", metadata)
    if not jax.tree.leaves(tree):
      raise ValueError(f"no array metadata in {self.workdir / 'checkpoints' / str(step)}")
    return tree

  def _quarantine(self, step: int, error: Exception, *, restored: int) -> None:
    if self.read_only:
      print(f"skipping corrupt checkpoint at step {step} ({type(error).__name__}); reading the "
            f"checkpoint at step {restored}", flush=True)
      return
    target = self.workdir / "corrupt_checkpoints" / str(step)
    for n in range(1, 1000):  # a step refused before (e.g. corrupted again after a resume)
      if not target.exists():
        break
      target = self.workdir / "corrupt_checkpoints" / f"{step}.{n}"
    logging.error("checkpoint at step %d is corrupt or partial and is refused (%s); "
                  "moved to %s; resuming from step %d", step, _describe(error), target, restored)
    print(f"refusing corrupt checkpoint at step {step} ({type(error).__name__}); "
          f"moved to {target}; resuming from the checkpoint at step {restored}", flush=True)
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


# Names of the train state's top-level fields in messages.
_PARTS = {"params": "params", "opt_state": "optimizer state", "step": "step", "rng": "RNG"}


def _flat_shapes(tree) -> dict:
  """{'a.b.0.c': shape, ...} of the arrays of `tree` (abstract arrays, or orbax's metadata);
  empty nodes (optax's EmptyState, which orbax saves as None) map to None."""
  is_empty = lambda x: x is None or (isinstance(x, (tuple, list, dict)) and not x)
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_empty)[0]:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    flat[name] = None if is_empty(leaf) else tuple(leaf.shape)
  return flat


def describe_difference(saved, abstract_state, *, most: int = 4) -> str:
  """'' if the saved metadata tree has the paths and shapes of `abstract_state`, else one line
  per part (params, optimizer state, ...) naming the paths only on either side and the shapes
  that differ."""
  there, here = _flat_shapes(saved), _flat_shapes(abstract_state)

  def listed(paths):
    return ", ".join(paths[:most]) + (f" and {len(paths) - most} more" if len(paths) > most
                                      else "")

  parts = []
  for part, title in _PARTS.items():
    mine = lambda names: sorted(n for n in names if n.split(".")[0] == part)
    only_there, only_here = mine(set(there) - set(here)), mine(set(here) - set(there))
    shapes = [f"{n} {there[n]} there, {here[n]} here" for n in mine(set(there) & set(here))
              if there[n] != here[n]]
    details = ([f"only in the checkpoint: {listed(only_there)}"] if only_there else []) + \
        ([f"only in this config: {listed(only_here)}"] if only_here else []) + \
        ([f"shapes: {listed(shapes)}"] if shapes else [])
    if details:
      parts.append(f"the {title} ({part}) differs ({'; '.join(details)})")
  others = sorted(n for n in set(there) ^ set(here) if n.split(".")[0] not in _PARTS)
  if others:
    parts.append(f"the train state differs ({listed(others)})")
  return "; ".join(parts)


def changed_config_keys(config, path) -> str:
  """'; config keys changed since the run: key: old there, new here, ...' against the config
  saved at `path` (config.json), or '' if there is none or nothing changed."""
  if not os.path.isfile(path):
    return ""
  with open(path) as f:
    before = _flat_dict(json.load(f))
  now = _flat_dict(json.loads(config.to_json_best_effort()))
  changed = [f"{k}: {before.get(k)!r} there, {now.get(k)!r} here"
             for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
  return f"; config keys changed since the run: {', '.join(changed)}" if changed else ""


def _flat_dict(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat_dict(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _params_manager(workdir: str, *, create: bool) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(epath.Path(workdir).absolute() / "checkpoints",
                               item_names=("params",),
                               options=ocp.CheckpointManagerOptions(create=create))


def holds_params_only(workdir: str) -> bool:
  """True for an inference run (`save_params`'s: llm_research.pack's, llm_research.convert's):
  its newest checkpoint holds params alone, no train state."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) \
      else []
  return bool(steps) and os.path.isdir(os.path.join(directory, str(max(steps)), "params"))


def save_params(workdir: str, step: int, params) -> None:
  """Writes `params` alone (no optimizer state, no data position) as `workdir`'s checkpoint
  `step`, and waits until it is on disk."""
  manager = _params_manager(workdir, create=True)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
  manager.wait_until_finished()
  manager.close()


def restore_params(workdir: str, abstract_params):
  """(params, step) of `workdir`'s newest params checkpoint, shaped like `abstract_params`."""
  manager = _params_manager(workdir, create=False)  # a reader creates nothing
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


def _describe(error: Exception, limit: int = 300) -> str:
  """'Type: first line of the message' (orbax's messages can run to pages)."""
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"

"""What the fair-test experiments share: training runs kept in a workdir and read back by a re-run,
a deadline past which no run starts, and the statistics over seeds.

A run's `result.json` (written once it has finished) holds its validation curve ([step,
eval_loss] pairs), its training-loss curve ([step, loss]) and its wall seconds; its existence is
the mark of a finished run. An unfinished run's workdir resumes from its newest checkpoint. Two
scripts may share runs (experiments/upcycling.py and depth_upscaling.py share the dense ones):
while one trains a run its `training.lock` names the process, and the other waits for the result.
"""
import datetime
import json
import math
import os
import time

import numpy as np

from llm_research.metrics import read_metrics
from llm_research.training import train_and_evaluate


# data.shuffle_tokens for the fair tests on the stdlib corpus: with the default window, short
# rows drift with the long files being read, and a run's validation loss with them (by up to 0.3
# nats/byte between evaluations at rows of 64 bytes, README's data section).
STDLIB_SHUFFLE_TOKENS = 2 ** 22


def finished(workdir: str) -> dict | None:
  """The run's result, if it finished."""
  path = os.path.join(workdir, "result.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run of `config` in `workdir` and keeps its result there."""
  start = time.perf_counter()
  train_and_evaluate(config, workdir)
  records = read_metrics(workdir)
  result = dict(curve=[[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r],
                train_curve=[[r["step"], r["loss"]] for r in records if "loss" in r],
                seconds=time.perf_counter() - start)
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f)
  return result


def train_once(config, workdir: str, poll_seconds: float = 10.0) -> dict:
  """`train`, unless a live process holds the run's lock: then its result, once written. A lock
  left by a process that has died is taken over (its run resumes from its checkpoint)."""
  os.makedirs(workdir, exist_ok=True)
  lock = os.path.join(workdir, "training.lock")
  while True:
    try:
      handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      if (result := finished(workdir)) is not None:
        return result
      if not alive(lock):
        os.remove(lock)
        continue
      time.sleep(poll_seconds)
  os.write(handle, str(os.getpid()).encode())
  os.close(handle)
  try:  # the holder before may have finished it between our look and the lock
    return finished(workdir) or train(config, workdir)
  finally:
    os.remove(lock)


def alive(lock: str) -> bool:
  """Whether the process a lock file names is running (an unreadable lock: assume so)."""
  try:
    with open(lock) as f:
      os.kill(int(f.read()), 0)
  except ProcessLookupError:
    return False
  except (OSError, ValueError):
    return True
  return True


def final_loss(result: dict) -> float:
  return result["curve"][-1][1]


class Runner:
  """Trains runs unless finished, and does not start one that would end past `deadline` (a Unix
  time, or None), recording it as missing. A run's seconds are estimated from its `cost` (any
  unit that grows with its compute, e.g. params x steps) at the highest seconds per unit cost of
  the runs finished so far: an overestimate for large runs, whose fixed costs (compilation,
  start-up) weigh less."""

  def __init__(self, deadline: float | None = None):
    self.deadline = deadline
    self.runs, self.missing, self.seconds = {}, [], 0.0
    self._seconds_per_cost = 0.0

  def get(self, key, config, workdir: str, cost: float = 1.0) -> dict | None:
    """The result of the run `key` (any hashable name) of `config` in `workdir`: read back,
    trained now, or None if it would end past the deadline. `config` may be a function of no
    arguments, called only if the run is trained."""
    if key in self.runs or key in self.missing:
      return self.runs.get(key)
    result = finished(workdir)
    if result is None:
      if self.deadline is not None and time.time() + self._seconds_per_cost * cost > self.deadline:
        self.missing.append(key)
        return None
      result = train_once(config() if callable(config) else config, workdir)
      print(f"{key}: val loss {final_loss(result):.4f} in {result['seconds']:.0f} s", flush=True)
    self.seconds += result["seconds"]
    self._seconds_per_cost = max(self._seconds_per_cost, result["seconds"] / cost)
    self.runs[key] = result
    return result


def mean_sd(values) -> tuple[float, float]:
  """Mean and sample standard deviation (nan for one value)."""
  values = list(values)
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def beyond_spread(paired_gaps) -> bool:
  """Whether the mean of paired per-seed gaps is positive and more than twice its standard error
  over the seeds (two seeds at least): the fair tests' bar for an effect."""
  gaps = list(paired_gaps)
  mean, sd = mean_sd(gaps)
  return len(gaps) >= 2 and mean > 2 * sd / math.sqrt(len(gaps))


def describe(value: tuple[float, float], digits: int = 3) -> str:
  """'mean +- sd' (the mean alone where sd is nan)."""
  mean, sd = value
  return f"{mean:.{digits}f}" + ("" if math.isnan(sd) else f" +- {sd:.{digits}f}")


def tail_drop(curves: list, tail: float) -> float:
  """The validation loss's mean drop over the last `tail` fraction of the steps, over curves of
  [step, loss] pairs (positive: still falling)."""
  drops = []
  for curve in curves:
    steps, losses = np.array(curve).T
    drops.append(np.interp(steps[-1] * (1 - tail), steps, losses) - losses[-1])
  return float(np.mean(drops))


def deadline_timestamp(text: str | None) -> float | None:
  """The Unix time of today's HH:MM UTC (None for None)."""
  if text is None:
    return None
  hours, minutes = map(int, text.split(":"))
  now = datetime.datetime.now(datetime.timezone.utc)
  return now.replace(hour=hours, minute=minutes, second=0, microsecond=0).timestamp()

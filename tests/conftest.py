"""Shared fixtures: a tiny experiment config on the tiny stdlib corpus, built once per session."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

TESTS_DIR = os.path.dirname(__file__)
TINY_CONFIG = os.path.join(TESTS_DIR, "tiny_config.py")


def pytest_configure(config):
  """One JAX compilation cache for the session, shared with subprocesses through the environment.

  Every run of the tiny config builds a fresh Trainer whose (identical) programs would otherwise
  compile again, in this process and in the CLI subprocesses; with the cache each compiles once.
  Set JAX_COMPILATION_CACHE_DIR yourself to keep a cache between sessions.
  """
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    cache_dir = tempfile.mkdtemp(prefix="llm_research_jax_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    config.add_cleanup(lambda: shutil.rmtree(cache_dir, ignore_errors=True))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  import jax  # pylint: disable=g-import-not-at-top (after the environment is set)
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory):
  """(data_dir, cache_dir) shared by every test that runs the tiny config."""
  return (str(tmp_path_factory.mktemp("tensorflow_datasets")),
          str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_overrides(data_dirs):
  """Command-line overrides that point the tiny config at the session's data dirs."""
  data_dir, cache_dir = data_dirs
  return [f"data.data_dir={data_dir}", f"data.cache_dir={cache_dir}"]


@pytest.fixture
def tiny_config(tiny_overrides):
  """A fresh tiny ConfigDict (see tests/tiny_config.py); `tiny_config(*overrides)`."""
  from llm_research.config import load_config
  return lambda *overrides: load_config(TINY_CONFIG, [*tiny_overrides, *overrides])


def beside_eight_devices(worker_args, log_path, here):
  """Runs `python <worker_args>` on 8 fake CPU devices in a subprocess (this process already has
  its single device) while `here()` runs in this process; `here()`'s result once the worker
  exited cleanly, else an assertion error with the end of its log."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  with open(log_path, "w+") as log:
    worker = subprocess.Popen([sys.executable, *map(str, worker_args)], env=env, stdout=log,
                              stderr=log)
    try:
      result = here()
      worker.wait(timeout=540)
    finally:
      worker.kill()
      worker.wait()
    log.seek(0)
    assert worker.returncode == 0, log.read()[-6000:]
  return result



def preempted_then_resumed(config, workdir: str, monkeypatch, *, at: int = 2) -> None:
  """Trains `config` in `workdir` with a real SIGTERM (through the run's own handler) after
  step `at`, checks the run stopped there, saved, then trains it again to the end (resumed)."""
  from llm_research import training
  from llm_research.metrics import read_metrics
  real_step = training.Trainer.step

  def step_then_sigterm(trainer, state, batch):
    state, metrics = real_step(trainer, state, batch)
    if int(state.step) == at:
      os.kill(os.getpid(), signal.SIGTERM)
    return state, metrics

  with monkeypatch.context() as patch, pytest.raises(training.Preempted):
    patch.setattr(training.Trainer, "step", step_then_sigterm)
    training.train_and_evaluate(config, workdir)
  assert [r["step"] for r in read_metrics(workdir)][-1] == at
  training.train_and_evaluate(config, workdir)

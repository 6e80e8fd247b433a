"""Multi-host: two local processes (2 fake CPU devices each, gloo collectives) train the tiny
config through the CLI into one shared workdir, and compute what one process computes on the
same global batches.

What "the same" means: each process reads only its own documents (records
`process_index::process_count`) and packs them into its own rows, so the global batch of a
2-process run is [process 0's rows; process 1's rows], not the batch a 1-process run of the same
config would draw. The reference is therefore one process training the same config on exactly
those global batches (both processes' iterators, built here, concatenated) and evaluating on
both processes' validation rows: the losses, gradient norms and eval losses must agree.
"""
import os
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from conftest import TINY_CONFIG
from llm_research import data, training
from llm_research.metrics import read_metrics

NUM_PROCESSES = 2
TIMEOUT_S = 420


def launch(workdir, tiny_overrides, logs_dir):
  """Starts the processes of one multi-host run; returns [(Popen, log path)]."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = []
  for i in range(NUM_PROCESSES):
    log_path = os.path.join(logs_dir, f"process_{i}.log")
    with open(log_path, "w") as log:
      procs.append((subprocess.Popen(
          [sys.executable, "-m", "llm_research.main", "--config", TINY_CONFIG,
           "--workdir", str(workdir), *(f"--config.{o}" for o in tiny_overrides),
           "--config.mesh.data=2", "--config.mesh.fsdp=2",
           "--coordinator_address", f"localhost:{port}", "--num_processes", str(NUM_PROCESSES),
           "--process_id", str(i)], env=env, stdout=log, stderr=subprocess.STDOUT), log_path))
  return procs


def wait_all(procs, deadline):
  """Waits for every process; on a failure or the deadline, kills them all (no hung CI)."""
  try:
    while any(p.poll() is None for p, _ in procs):
      if any(p.returncode not in (None, 0) for p, _ in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  logs = ""
  for i, (p, path) in enumerate(procs):
    with open(path) as f:
      logs += f"--- process {i} (exit {p.returncode}) ---\n{f.read()[-4000:]}\n"
  assert all(p.returncode == 0 for p, _ in procs), logs
  return logs


def merged(iterators, rows_each, seq_len):
  """Global batches: the processes' local batches stacked, empty rows for one that ran out."""
  empty = {k: np.zeros((rows_each, seq_len), np.int32)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  while True:
    batches = [next(it, None) for it in iterators]
    if all(b is None for b in batches):
      return
    yield {k: np.concatenate([(b or empty)[k] for b in batches]) for k in empty}


def one_process_reference(config, monkeypatch) -> dict:
  """{step: metrics} of one process (one device) training on the 2-process global batches."""
  tc = config.train
  tokenizer = data.get_tokenizer(config.data)
  kwargs = dict(global_batch_size=tc.batch_size, process_count=NUM_PROCESSES)
  rows_each = tc.batch_size // NUM_PROCESSES
  batches = merged([data.make_train_iterator(config.data, tokenizer, process_index=i,
                                             seed=config.data.shuffle_seed, **kwargs)
                    for i in range(NUM_PROCESSES)], rows_each, config.data.seq_len)
  monkeypatch.setattr(data, "make_eval_iterator", lambda data_config, tokenizer, **_: merged(
      [data.pipeline.make_eval_iterator(data_config, tokenizer, process_index=i, **kwargs)
       for i in range(NUM_PROCESSES)], rows_each, data_config.seq_len))

  trainer = training.Trainer(config, tokenizer)
  state, records = trainer.init_state(), {}
  for step in range(1, tc.steps + 1):
    state, metrics = trainer.step(state, next(batches))
    records[step] = {k: float(v) for k, v in metrics.items()}
    if step % tc.eval_every == 0 or step == tc.steps:
      records[step].update(trainer.evaluate(state.params, tc.eval_batches))
  return records


def test_two_processes_train_like_one_on_the_same_global_batches(tiny_config, tiny_overrides,
                                                                 tmp_path, monkeypatch):
  config = tiny_config("sample.max_new_tokens=0")
  data.get_tokenizer(config.data)  # build the corpus before the processes race to
  data.load_source(config.data, "train")
  workdir = tmp_path / "run"
  procs = launch(workdir, [*tiny_overrides, "sample.max_new_tokens=0"], tmp_path)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    reference = one_process_reference(config, monkeypatch)  # meanwhile, in this process
  finally:
    logs = wait_all(procs, deadline)
  assert "devices: 4 x cpu, processes: 2" in logs

  records = read_metrics(str(workdir))
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1)), logs
  for r in records:
    want = reference[r["step"]]
    assert r["learning_rate"] == pytest.approx(want["learning_rate"], rel=1e-6)
    for key in ("loss", "grad_norm", "eval_loss"):
      assert (key in r) == (key in want), (r["step"], key)
      if key in want:
        assert r[key] == pytest.approx(want[key], rel=1e-5), (r["step"], key)
  assert records[-1]["loss"] < records[0]["loss"]

  # One shared record: both processes' data positions in every checkpoint.
  for step in (3, 6):
    saved = sorted(os.listdir(workdir / "checkpoints" / str(step) / "data"))
    assert [f for f in saved if f.endswith(".json")] == ["process_0-of-2.json",
                                                          "process_1-of-2.json"]
  assert os.path.isfile(workdir / "config.json")

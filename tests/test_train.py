"""Training end to end: the CLI's run record, exact resumption after SIGTERM / SIGKILL / a corrupt
checkpoint (and in a relative workdir), gradient accumulation, clear errors for bad input (values,
a checkpoint the config does not fit, no readable checkpoint), the peak-FLOPs table, and sampling
a trained run.

Every run here uses the tiny config (tests/tiny_config.py: 6 steps, eval at 3 and 6, checkpoints
at 3 and 6). The session's compilation cache (conftest.py) makes runs after the first cheap.
"""
import functools
import glob
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import TESTS_DIR, TINY_CONFIG
from sharding_worker import grad_recorder
from llm_research import main as cli
from llm_research import sample, training
from llm_research.data.stdlib_corpus import split_of
from llm_research.metrics import peak_flops_per_device, read_metrics
from llm_research.models import Transformer, registry

# Every metric the tiny run computes that must repeat exactly on resumption (timings aside).
TRAJECTORY_KEYS = ("loss", "grad_norm", "learning_rate", "eval_loss")


def cli_args(tiny_overrides, workdir, *extra):
  return ["--config", TINY_CONFIG, "--workdir", str(workdir),
          *(f"--config.{o}" for o in tiny_overrides), *extra]


def trajectory(workdir) -> dict:
  """{key: [(step, value), ...]} from a run's metrics.jsonl."""
  records = read_metrics(str(workdir))
  return {k: [(r["step"], r[k]) for r in records if k in r] for k in TRAJECTORY_KEYS}


def assert_same_trajectory(workdir, reference_workdir):
  got, want = trajectory(workdir), trajectory(reference_workdir)
  for key in TRAJECTORY_KEYS:
    assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key
    np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in want[key]],
                               rtol=1e-6, atol=0, err_msg=key)


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints"))
                if name.isdigit())


def snapshot(workdir) -> dict:
  """relative path -> sha256 of every file below `workdir`, or "folder" (an empty one too)."""
  files = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    elif os.path.isdir(path):
      files[os.path.relpath(path, workdir)] = "folder"
  return files


def tensorboard_scalars(workdir, tag) -> dict:
  """{step: value} of one scalar tag, read from the TFRecord event files (no TF needed)."""
  from tensorboardX.proto import event_pb2
  values = {}
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    with open(path, "rb") as f:
      blob = f.read()
    offset = 0
    while offset < len(blob):
      (length,) = struct.unpack_from("<Q", blob, offset)
      event = event_pb2.Event.FromString(blob[offset + 12:offset + 12 + length])
      offset += 12 + length + 4  # length, its crc, the record, its crc
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = value.simple_value
  return values


class StepCounter:
  """Wraps Trainer.step: counts the steps a run trains, and runs `hook(step)` after each."""

  def __init__(self, monkeypatch, hook=None):
    self.steps = []
    real_step = training.Trainer.step

    def step(trainer, state, batch):
      new_state, metrics = real_step(trainer, state, batch)
      self.steps.append(int(new_state.step))
      if hook is not None:
        hook(self.steps[-1])
      return new_state, metrics

    monkeypatch.setattr(training.Trainer, "step", step)


@pytest.fixture(scope="module")
def reference_run(tiny_overrides, tmp_path_factory):
  """The tiny run, uninterrupted, through the CLI: (workdir, the metrics main returned)."""
  workdir = str(tmp_path_factory.mktemp("reference_run"))
  return workdir, cli.main(cli_args(tiny_overrides, workdir))


def test_cli_run_leaves_config_metrics_tensorboard_and_checkpoints(reference_run, tiny_config):
  workdir, final = reference_run
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == json.loads(tiny_config().to_json())

  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # log_every=1
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  assert final == {k: v for k, v in records[-1].items() if k != "step"}
  # Step 1 compiled: its time is compile_time_s, and no throughput is claimed for it.
  assert records[0]["compile_time_s"] > 0
  assert not {"step_time_s", "tokens_per_s", "mfu"} & set(records[0])
  assert all(r["step_time_s"] > 0 and "compile_time_s" not in r for r in records[1:])

  losses = [r["loss"] for r in records]
  assert losses[-1] < losses[0] - 0.5, losses
  assert records[-1]["eval_loss"] < records[2]["eval_loss"], records

  assert tensorboard_scalars(workdir, "loss") == pytest.approx(
      {r["step"]: r["loss"] for r in records}, rel=1e-6)

  assert checkpoint_steps(workdir) == [3, 6]
  for step in (3, 6):
    assert os.path.isfile(os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA"))


def test_sigterm_then_rerun_continues_the_same_trajectory(reference_run, tiny_overrides,
                                                          tmp_path, monkeypatch, capsys):
  reference, _ = reference_run
  workdir = tmp_path / "run"
  args = cli_args(tiny_overrides, workdir)

  def preempt(step):
    if step == 2:  # a real SIGTERM, through the run's own handler
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch:
    first = StepCounter(patch, preempt)
    with pytest.raises(SystemExit) as stopped:
      cli.main(args)
  assert stopped.value.code == training.PREEMPTED_EXIT_STATUS == 75  # not 0: not finished
  assert first.steps == [1, 2]
  assert "stopped by SIGTERM; saved step 2" in capsys.readouterr().out
  assert checkpoint_steps(workdir) == [2]  # checkpoint_every=3: step 2 is the SIGTERM save
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]

  second = StepCounter(monkeypatch)
  cli.main(args)
  assert second.steps == [3, 4, 5, 6]
  assert f"resuming {workdir} from its checkpoint at step 2" in capsys.readouterr().out
  assert_same_trajectory(workdir, reference)
  assert checkpoint_steps(workdir) == [2, 3, 6]
  records = {r["step"]: r for r in read_metrics(workdir)}
  assert "compile_time_s" in records[3] and "step_time_s" not in records[3]  # compiled again


def test_relative_workdir_trains_saves_and_resumes(reference_run, tiny_overrides, tmp_path,
                                                   monkeypatch, capsys):
  reference, _ = reference_run
  monkeypatch.chdir(tmp_path)
  args = cli_args(tiny_overrides, "run")  # relative: orbax itself takes absolute paths only

  def preempt(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  with monkeypatch.context() as patch, pytest.raises(SystemExit):
    StepCounter(patch, preempt)
    cli.main(args)
  assert "stopped by SIGTERM; saved step 2" in capsys.readouterr().out
  assert checkpoint_steps(tmp_path / "run") == [2]
  resumed = StepCounter(monkeypatch)
  cli.main(args)  # resumes, then samples from the relative workdir
  assert resumed.steps == [3, 4, 5, 6]
  assert "sample:\n" in capsys.readouterr().out  # sampled from the relative workdir too
  assert_same_trajectory(tmp_path / "run", reference)
  assert checkpoint_steps(tmp_path / "run") == [2, 3, 6]


def test_sigkill_then_rerun_resumes_from_last_periodic_checkpoint(reference_run, tiny_overrides,
                                                                   tmp_path, monkeypatch):
  reference, _ = reference_run
  workdir = tmp_path / "run"
  args = cli_args(tiny_overrides, workdir)
  worker = [sys.executable, os.path.join(TESTS_DIR, "train_worker.py"), "--kill_before_step", "5",
            "--", *args]
  killed = subprocess.run(worker, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
  assert "SIGKILL before step 5" in killed.stdout
  assert checkpoint_steps(workdir) == [3]
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]  # step 4: lost work

  resumed = StepCounter(monkeypatch)
  cli.main(args)
  assert resumed.steps == [4, 5, 6]  # from the step-3 checkpoint, not from scratch
  assert_same_trajectory(workdir, reference)


def damage_array_data(checkpoint):
  """Overwrites every array data file of the state with garbage of the same size."""
  files = glob.glob(os.path.join(checkpoint, "state", "ocdbt.process_*", "d", "*"))
  assert files
  rng = np.random.default_rng(0)
  for path in files:
    with open(path, "r+b") as f:
      f.write(rng.bytes(os.path.getsize(path)))


def delete_metadata(checkpoint):
  os.remove(os.path.join(checkpoint, "state", "_METADATA"))


def test_corrupt_newest_checkpoint_is_moved_aside_and_run_resumes_from_previous(
    reference_run, tiny_overrides, tmp_path, monkeypatch, capsys):
  reference, _ = reference_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  args = cli_args(tiny_overrides, workdir, "--config.sample.max_new_tokens=0")
  counter = StepCounter(monkeypatch)
  newest = os.path.join(workdir, "checkpoints", "6")

  # The same step damaged twice (two ways): the second refusal must not trip over the first.
  for damage, moved_to in [(damage_array_data, "6"), (delete_metadata, "6.1")]:
    damage(newest)
    damaged_files = snapshot(newest)
    before = snapshot(workdir)
    assert sample.load_run(workdir)[-1] == 3  # a reader (sample, pack) reads the older one
    assert snapshot(workdir) == before  # and moves nothing
    counter.steps.clear()
    cli.main(args)
    out = capsys.readouterr().out
    assert "refusing corrupt checkpoint at step 6" in out, out
    quarantined = os.path.join(workdir, "corrupt_checkpoints", moved_to)
    assert f"moved to {quarantined};" in out
    assert snapshot(quarantined) == damaged_files  # moved as it was, nothing deleted
    assert counter.steps == [4, 5, 6]  # from the good step-3 checkpoint
    assert checkpoint_steps(workdir) == [3, 6]
    assert_same_trajectory(workdir, reference)


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(reference_run, tiny_overrides,
                                                              tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  for step in (3, 6):
    damage_array_data(os.path.join(workdir, "checkpoints", str(step)))
  before = snapshot(workdir)
  counter = StepCounter(monkeypatch)
  with pytest.raises(SystemExit) as raised:
    cli.main(cli_args(tiny_overrides, workdir))
  message = raised.value.code
  assert message.startswith(f"error: none of the 2 checkpoints in {workdir}/checkpoints can be "
                            "restored (step 6: "), message
  assert "nothing was moved: To start this run over from step 0, move" in message
  assert "\n" not in message
  assert counter.steps == []  # not silently from step 0
  # A reader (sample, pack) says what it could not read, not how to restart training.
  with pytest.raises(SystemExit, match="can be restored .*nothing was moved: this run has "
                                       "nothing to read$"):
    sample.main(["--workdir", workdir])
  assert snapshot(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_grad_accumulation_gives_the_same_loss_gradients_and_update(tiny_config):
  config = tiny_config("train.warmup_steps=0")  # a nonzero learning rate at step 0
  vocab = 259
  model = Transformer(training.model_config_from(config, vocab))
  optimizer = grad_recorder(training.make_optimizer(config.train))
  rows, length = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  # Packed rows with uneven padding: micro-batches (rows i::grad_accum) hold different numbers of
  # tokens, so averaging per micro-batch (rather than over all tokens) would give another loss.
  tokens = rng.integers(3, vocab, (rows, length + 1), dtype=np.int32)
  segment_ids = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  for row in range(rows):
    split, end = length // 3 + row, length - 3 * (row % 2) * (row + 1)
    segment_ids[row, :split], segment_ids[row, split:end] = 1, 2
    positions[row, :split], positions[row, split:end] = np.arange(split), np.arange(end - split)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
           "positions": positions}
  assert segment_ids[0::2].astype(bool).sum() != segment_ids[1::2].astype(bool).sum()

  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"])
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), rng=jnp.zeros((2,), jnp.uint32))

  def step(grad_accum):
    fn = functools.partial(training.train_step,
                           objective=training.model_objective(model, z_loss=1e-4),
                           optimizer=optimizer,
                           schedule=training.learning_rate_schedule(config.train),
                           grad_accum=grad_accum)
    state2, metrics = jax.jit(fn)(state, batch)
    return state2, jax.device_get(metrics)

  whole_state, whole = step(1)
  whole_grads = whole_state.opt_state[1]
  assert float(optax.tree.norm(whole_grads)) > 0
  accum_state, accum = step(2)
  np.testing.assert_allclose(accum["loss"], whole["loss"], rtol=1e-5)
  np.testing.assert_allclose(accum["grad_norm"], whole["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               accum_state.opt_state[1], whole_grads)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), whole_state.params, params)
  assert min(jax.tree.leaves(moved)) > 1e-3, moved  # the update did change every param
  # Adam's first step is about lr * sign(g): where |g| is near Adam's eps, summation order moves
  # it by a fraction of a step. 1e-5 is 0.1% of a step at this learning rate (1e-2).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               accum_state.params, whole_state.params)


@pytest.fixture
def existing_run(reference_run, tmp_path):
  """A copy of the finished reference run: a workdir a bad command must leave untouched."""
  workdir = str(tmp_path / "existing_run")
  shutil.copytree(reference_run[0], workdir)
  return workdir


@pytest.mark.parametrize("extra, message", [
    (["--config.train.stesp=3"],
     "unknown config key 'train.stesp': train has no 'stesp' (did you mean 'steps'?)"),
    (["--config.mesh.data=3"],
     "mesh (data=3, fsdp=1, tensor=1, expert=1) needs 3 devices, but there are 1"),
    (["--config.train.grad_accum=3"],
     "train.grad_accum=3 must divide train.batch_size=8"),
    (["--config.data.source=text_dir", "--config.data.text_dir={empty_dir}"],
     "text_dir '{empty_dir}' has no records in split 'train'"),
    (["--config.data.source=text_dir", "--config.data.text_dir={train_only_dir}"],
     "text_dir '{train_only_dir}' has no records in split 'validation'"),
    (["--config.data.source=tfds", "--config.data.tfds_name=no_such_dataset"],
     "TFDS dataset 'no_such_dataset' (split 'train') in data_dir '{data_dir}': no such dataset"),
    (["--config.model.embed_dim=48"],
     "holds a run with other shapes (model.embed_dim: 32 there, 48 here)"),
], ids=["mistyped-key", "mesh-too-big", "grad-accum", "empty-text-dir",
        "text-dir-without-validation", "missing-tfds", "other-shapes"])
def test_bad_input_is_a_clear_error_and_leaves_the_workdir_alone(
    extra, message, existing_run, tiny_overrides, data_dirs, tmp_path):
  fill = dict(empty_dir=str(tmp_path / "empty"), train_only_dir=str(tmp_path / "train_only"),
              data_dir=data_dirs[0])
  os.makedirs(fill["empty_dir"])
  os.makedirs(fill["train_only_dir"])
  for name in (f"doc_{i}.py" for i in range(8)):  # those the hash puts in the train split
    if split_of(name) == "train":
      with open(os.path.join(fill["train_only_dir"], name), "w") as f:
        f.write("def f():\n  return 1\n" * 20)
  before = snapshot(existing_run)
  with pytest.raises(SystemExit) as raised:  # one line on stderr, no traceback
    cli.main(cli_args(tiny_overrides, existing_run, *(e.format(**fill) for e in extra)))
  assert raised.value.code.startswith("error: ")
  assert message.format(**fill) in raised.value.code
  assert snapshot(existing_run) == before


def test_checkpoints_the_config_does_not_fit_are_an_error_and_stay(existing_run, tiny_overrides):
  # cosine -> two_stage adds a schedule state to the optimizer state: same params, other tree.
  before = snapshot(existing_run)
  with pytest.raises(SystemExit) as raised:
    cli.main(cli_args(tiny_overrides, existing_run, "--config.train.schedule=two_stage"))
  message = raised.value.code
  assert message.startswith(f"error: checkpoint 6 in {existing_run}/checkpoints does not fit this "
                            "config: the optimizer state (opt_state) differs (only in "), message
  assert "(params) differs" not in message
  assert ("; config keys changed since the run: train.schedule: 'cosine' there, 'two_stage' here. "
          "Resume with the run's own config") in message
  assert "\n" not in message
  assert snapshot(existing_run) == before  # config.json, metrics.jsonl and checkpoints as they were


BAD_VALUES = [
    (["train.batch_size=0"], "train.batch_size=0 must be at least 1"),
    (["train.batch_size=-4"], "train.batch_size=-4 must be at least 1"),
    (["train.steps=-1"], "train.steps=-1 must be at least 1"),
    (["train.grad_accum=0"], "train.grad_accum=0 must be at least 1"),
    (["train.log_every=0"], "train.log_every=0 must be at least 1"),
    (["train.eval_every=0"], "train.eval_every=0 must be at least 1"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0 must be at least 1"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be at least 1"),
    (["train.learning_rate=-0.001"], "train.learning_rate=-0.001 must not be negative"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1 must not be negative"),
    (["train.final_lr_fraction=1.5"], "train.final_lr_fraction=1.5 must be in [0, 1]"),
    (["train.final_lr_fraction=-0.1"], "train.final_lr_fraction=-0.1 must be in [0, 1]"),
    (["train.schedule=cosin"], "train.schedule='cosin' is not 'cosine', 'linear' or 'two_stage'"),
    (["data.seq_len=0"], "data.seq_len=0 must be at least 1"),
    (["data.source=hf"],
     "data.source='hf' is not one of ('stdlib', 'tfds', 'text_dir', 'bytes', 'preferences')"),
    (["data.source=bytes"], "data.source='bytes' is for a model that predicts each byte"),
    (["data.source=bytes", "model.name=bgpt", "data.byte_dataset=cpu", "data.seq_len=64",
      "model.patch_size=16"], "unknown data.byte_dataset 'cpu'"),
    (["data.tokenizer=bpe"], "data.tokenizer='bpe' is not 'sentencepiece' or 'byte'"),
    (["data.tokenizer=sentencepiece", "data.vocab_size=2"],
     "data.vocab_size=2 is too small for data.tokenizer='sentencepiece'"),
    (["sample.top_p=0.0"], "sample.top_p=0.0 must be in (0, 1] (1 is off)"),
    (["train.trainable=lora_("], "train.trainable='lora_(' is not a regular expression"),
    (["model.head_dim=0"], "model.head_dim=0 must be at least 1"),
    (["model.num_layers=0"], "model.num_layers=0 must be at least 1"),
    (["model.name=gpt5"], "model.name='gpt5' is not a registered model"),
    (["model.attention_impl=pallas", "model.dtype=float16", "model.head_dim=64"],
     "model.attention_impl='pallas' takes dtype float32 or bfloat16, not 'float16'"),
    (["model.attention_impl=pallas"], "model.attention_impl='pallas' takes head_dim in"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES,
                         ids=["+".join(overrides) for overrides, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key_before_anything_runs(
    overrides, message, existing_run, tiny_overrides, tmp_path):
  before = snapshot(existing_run)
  for workdir in (existing_run, tmp_path / "new_run"):
    with pytest.raises(SystemExit) as raised:
      cli.main(cli_args([*tiny_overrides, *overrides], workdir))
    assert raised.value.code.startswith(f"error: {message}"), raised.value.code
    assert "\n" not in raised.value.code
  assert snapshot(existing_run) == before
  assert not (tmp_path / "new_run").exists()


def test_sentencepiece_vocab_too_small_for_the_corpus_is_one_line(tiny_overrides, tmp_path):
  # Room for the 256 byte and 4 special pieces, not for the tiny corpus's characters as well.
  with pytest.raises(SystemExit) as raised:
    cli.main(cli_args([*tiny_overrides, "data.tokenizer=sentencepiece", "data.vocab_size=261"],
                      tmp_path / "run"))
  assert raised.value.code.startswith("error: data.vocab_size=261 is too small for this corpus: "
                                      "SentencePiece needs at least "), raised.value.code
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, message", [
    ("--max_new_tokens=-5", "--max_new_tokens=-5 must not be negative"),
    ("--temperature=-0.5", "--temperature=-0.5 must not be negative (0 is greedy)"),
    ("--top_k=-1", "--top_k=-1 must not be negative (0 is off)"),
    ("--top_p=0", "--top_p=0.0 must be in (0, 1] (1 is off)"),
    ("--top_p=1.5", "--top_p=1.5 must be in (0, 1] (1 is off)"),
])
def test_sample_cli_refuses_bad_arguments_in_one_line(flag, message, reference_run):
  with pytest.raises(SystemExit) as raised:
    sample.main(["--workdir", reference_run[0], flag])
  assert raised.value.code == f"error: {message}"


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5", 459e12),  # v5p
    ("TPU v6 lite", 918e12),  # v6e
    ("cpu", None),
    ("NVIDIA H1000", None),  # a prefix of the name is not a match
])
def test_peak_flops_takes_the_most_specific_device_kind(kind, peak, monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda *_: [types.SimpleNamespace(device_kind=kind)])
  assert peak_flops_per_device() == peak
  assert peak_flops_per_device(123e12) == 123e12  # train.peak_flops_per_device wins


def test_mistyped_key_in_an_experiment_file_is_one_line(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from llm_research.config import base_config\n\n\ndef get_config():\n"
                  "  config = base_config()\n  config.train.stesp = 3\n  return config\n")
  with pytest.raises(SystemExit) as raised:
    cli.main(["--config", str(path), "--workdir", str(tmp_path / "run")])
  message = raised.value.code
  assert message.startswith(f'error: {path}: Key "stesp" does not exist')
  assert message.endswith('Did you mean "steps" instead of "stesp"?')
  assert "Other fields" not in message and "\n" not in message
  assert not (tmp_path / "run").exists()


def test_sample_cli_continues_a_prompt_from_the_trained_run(reference_run, capsys):
  workdir, _ = reference_run
  texts = sample.main(["--workdir", workdir, "--prompt", "def ", "--temperature", "0"])
  out = capsys.readouterr().out
  assert "--- step 6, prompt 'def ' ---" in out
  assert len(texts) == 1 and isinstance(texts[0], str)
  assert f"def {texts[0]}" in out
  assert len(texts[0]) <= 8  # max_new_tokens=8 byte tokens: at most 8 characters
  # Greedy decoding does not depend on the seed.
  assert sample.main(["--workdir", workdir, "--prompt", "def ", "--temperature", "0",
                      "--seed", "7"]) == texts
  with pytest.raises(SystemExit, match="holds no run"):
    sample.main(["--workdir", os.path.join(workdir, "no_such_run")])


def test_a_run_written_when_the_model_section_held_every_models_fields_samples_and_resumes(
    existing_run, tiny_overrides, capsys):
  """Before each model had its own section, config.json's `model` held the fields of every
  registered model (bGPT's beside the transformer's). Such a run still loads: the registry
  builds the model from the fields of its `model.name` and ignores the others."""
  path = os.path.join(existing_run, "config.json")
  with open(path) as f:
    saved = json.load(f)
  union = {**registry.config_section("bgpt"), **saved["model"]}  # name: the transformer's
  with open(path, "w") as f:
    json.dump({**saved, "model": union}, f)
  _, _, model_config, _, step = sample.load_run(existing_run)
  assert step == 6 and model_config == training.model_config_from(
      ml_collections.ConfigDict(saved), model_config.vocab_size)
  cli.main(cli_args(tiny_overrides, existing_run))  # resumes: nothing left to train
  assert f"{existing_run} is already at step 6 of train.steps=6" in capsys.readouterr().out

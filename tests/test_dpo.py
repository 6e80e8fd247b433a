"""DPO (`train.method=dpo`) and its preference pairs (`data.source=preferences`): the pairs' rows
(both sequences side by side, the prompt masked out, the simulator's state chosen), the JSONL
reader, the loss and its gradient against numpy, the beta -> 0 limit, a frozen reference without
optimizer state, a run started from another run (the reference is its params, the first loss
log 2) that resumes exactly after SIGTERM, 8 devices with gradient accumulation equal to one,
and bad input refused in one line.
"""
import json
import math
import os

import jax
import numpy as np
import pytest

import dpo_worker
from conftest import TESTS_DIR, TINY_CONFIG, beside_eight_devices, preempted_then_resumed
from test_train import snapshot
from llm_research import data, training
from llm_research import main as cli
from llm_research.checkpoints import Checkpointer
from llm_research.config import load_config
from llm_research.data import ByteTokenizer, cpu_states, preferences
from llm_research.errors import ConfigError
from llm_research.metrics import read_metrics
from llm_research.sample import load_run
from llm_research.training import dpo

DPO = dpo_worker.DPO


def segments(batch, row: int, prefix: str = ""):
  """{segment id: (prompt text, response text)} of one row of a batch of pairs."""
  tokenizer, ids = ByteTokenizer(), batch[prefix + "segment_ids"][row]
  result = {}
  for s in set(ids[ids > 0].tolist()):
    inputs, targets = batch[prefix + "inputs"][row][ids == s], batch[prefix + "targets"][row][
        ids == s]
    response = batch[prefix + "response"][row][ids == s] > 0
    assert response.any() and not response[:np.argmax(response)].any()  # the prompt, then it
    assert np.array_equal(batch[prefix + "positions"][row][ids == s], np.arange(len(inputs)))
    assert inputs[0] == tokenizer.bos_id and targets[-1] == tokenizer.eos_id
    result[s] = tokenizer.decode(inputs[:np.argmax(response) + 1]), tokenizer.decode(
        targets[response])
  return result


def test_pairs_are_packed_side_by_side_and_chosen_is_the_simulators_state(tiny_config):
  config = tiny_config(*DPO)
  batches = data.make_train_iterator(config.data, ByteTokenizer(), global_batch_size=8, seed=0,
                                     process_index=0, process_count=1)
  pairs = 0
  for _ in range(3):
    batch = next(batches)
    for row in range(8):
      chosen, rejected = segments(batch, row), segments(batch, row, preferences.REJECTED)
      assert chosen.keys() == rejected.keys()
      for s in chosen:
        assert chosen[s][0] == rejected[s][0]  # the same prompt
        program, *states = chosen[s][0].split("\n")[:-1]
        memory = bytes.fromhex(program.replace(" ", ""))
        truth = cpu_states.simulate(memory)
        step = len(states) * cpu_states.STATE_BYTES
        assert [preferences.parse_state(line + "\n") for line in states] == [
            truth[i:i + 16] for i in range(0, step, 16)]
        assert preferences.parse_state(chosen[s][1]) == truth[step:step + 16]
        wrong = preferences.parse_state(rejected[s][1])
        assert wrong is not None and wrong != truth[step:step + 16]
        pairs += 1
  assert pairs > 24  # some rows hold two pairs


def test_jsonl_pairs_split_by_prompt_crop_the_prompts_start_and_name_a_bad_line(tmp_path,
                                                                                tiny_config):
  path = tmp_path / "pairs.jsonl"
  rows = [{"prompt": f"question {i}: " + "x" * 40 * (i == 0), "chosen": "yes" * (i + 1),
           "rejected": "no", "note": i} for i in range(60)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
  config = tiny_config("data.source=preferences", "data.preference_dataset=jsonl",
                       f"data.preference_file={path}")
  train, validation = (data.load_source(config.data, split) for split in ("train", "validation"))
  assert len(train) + len(validation) == 60 and len(validation) > 0
  assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in validation)
  record = next(r for r in train if r["prompt"].startswith("question 0"))
  assert record["text"] == record["prompt"] + record["chosen"]
  example = preferences.pair_example(record, ByteTokenizer(), 32)  # 55 + 4 tokens > 32
  tokenizer = ByteTokenizer()
  assert len(example["inputs"]) == 32 and example["inputs"][0] == tokenizer.bos_id
  assert tokenizer.decode(example["inputs"][:-4]).endswith("x" * 27)
  assert tokenizer.decode(example["targets"][example["response"] > 0]) == "yes"
  assert tokenizer.decode(example["rejected_targets"][example["rejected_response"] > 0]) == "no"

  path.write_text(json.dumps(rows[0]) + '\n{"prompt": "p", "chosen": 1, "rejected": "r"}\n')
  with pytest.raises(ConfigError, match=f"data.preference_file '{path}', line 2 is not an "
                                        'object with string fields "prompt", "chosen"'):
    data.load_source(config.data, "train")


# ---- the loss -----------------------------------------------------------------------------------

def random_pairs(rng, rows=4, length=16, vocab=7):
  """Random logits of a policy and a reference [2 rows, length, vocab] and the sequences of
  packed pairs: 1 or 2 pairs a row, each a prompt then a response, then padding."""
  sequences = {k: np.zeros((2 * rows, length), np.int32) for k in preferences.KEYS}
  sequences["targets"] = rng.integers(0, vocab, (2 * rows, length)).astype(np.int32)
  for row in range(rows):
    count = int(rng.integers(1, 3))
    for side in (row, rows + row):  # chosen, then rejected: the same number of pairs
      start = 0
      for s in range(1, count + 1):
        prompt, response = int(rng.integers(0, 3)), int(rng.integers(1, 5))
        end = start + prompt + response
        sequences["segment_ids"][side, start:end] = s
        sequences["positions"][side, start:end] = np.arange(end - start)
        sequences["response"][side, start + prompt:end] = 1
        start = end
  logits = rng.normal(size=(2, 2 * rows, length, vocab)).astype(np.float32)
  return logits[0], logits[1], sequences


def dpo_value(policy_logits, reference_logits, sequences, beta):
  return dpo.preference_sums(dpo.response_logps(policy_logits, sequences),
                             dpo.response_logps(reference_logits, sequences),
                             dpo.pairs_present(sequences), beta)


def numpy_dpo(policy_logits, reference_logits, sequences, beta):
  """(loss summed over pairs, its gradient in the policy's logits, per-pair D = log pi(y_w|x)
  - log pi(y_l|x), the gradient of sum D in the policy's logits) recomputed in numpy, pair by
  pair, in float64."""
  policy_logits, reference_logits = (np.asarray(x, np.float64)
                                     for x in (policy_logits, reference_logits))
  log_softmax = lambda x: x - x.max(-1, keepdims=True) - np.log(
      np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  rows, vocab = policy_logits.shape[0] // 2, policy_logits.shape[-1]
  loss, grad, grad_d, margins = 0.0, np.zeros_like(policy_logits), np.zeros_like(
      policy_logits), []
  for row in range(rows):
    for s in sorted(set(sequences["segment_ids"][row].tolist()) - {0}):
      logp, dlogp = {}, []  # dlogp: (row, tokens, d log pi(y|x) / d logits at those tokens)
      for side in (row, rows + row):  # chosen, rejected
        tokens = ((sequences["segment_ids"][side] == s)
                  & (sequences["response"][side] > 0)).nonzero()[0]
        targets = sequences["targets"][side][tokens]
        for name, logits in (("policy", policy_logits), ("reference", reference_logits)):
          logp[name, side] = log_softmax(logits[side][tokens])[np.arange(len(tokens)),
                                                               targets].sum()
        dlogp.append((side, tokens, np.eye(vocab)[targets] - np.exp(
            log_softmax(policy_logits[side][tokens]))))
      d = logp["policy", row] - logp["policy", rows + row]
      z = beta * (d - (logp["reference", row] - logp["reference", rows + row]))
      loss += np.log1p(np.exp(-z))
      margins.append(d)
      for (side, tokens, dlogp_side), sign in zip(dlogp, (1.0, -1.0)):
        grad[side, tokens] += -beta / (1 + np.exp(z)) * sign * dlogp_side
        grad_d[side, tokens] += sign * dlogp_side
  return loss, grad, np.array(margins), grad_d


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_loss_and_gradient_match_numpy_on_random_logits(beta):
  policy, reference, sequences = random_pairs(np.random.default_rng(0))
  (value, sums), grad = jax.value_and_grad(dpo_value, has_aux=True)(policy, reference,
                                                                    sequences, beta)
  want, want_grad, margins, _ = numpy_dpo(policy, reference, sequences, beta)
  assert sums["count"] == len(margins) > 3
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sums[training.MEAN + "logp_chosen"]
                             - sums[training.MEAN + "logp_rejected"], margins.sum(), rtol=1e-5)


def test_small_beta_gives_log_2_and_half_beta_times_the_log_ratio_gradient():
  """-log sigmoid(z) = log 2 - z / 2 + O(z^2) and its gradient is -beta sigmoid(-z) grad D:
  as beta -> 0, the loss per pair -> log 2 and the gradient / beta -> -grad(D) / 2 with an
  error shrinking like beta; at z = 0 (policy = reference) both hold at any beta."""
  policy, reference, sequences = random_pairs(np.random.default_rng(1))
  _, _, margins, grad_d = numpy_dpo(policy, reference, sequences, 1.0)
  _, _, reference_margins, _ = numpy_dpo(reference, reference, sequences, 1.0)
  pairs = len(margins)
  errors = []
  for beta in (1e-2, 1e-3, 1e-4):
    value, grad = jax.value_and_grad(lambda p: dpo_value(p, reference, sequences, beta)[0])(
        policy)
    shift = margins - reference_margins  # z / beta; |softplus''| <= 1/4 bounds the rest
    np.testing.assert_allclose(value, pairs * math.log(2) - beta / 2 * np.sum(shift), rtol=0,
                               atol=beta ** 2 / 8 * np.sum(shift ** 2) + 1e-5)
    errors.append(np.abs(grad / beta + grad_d / 2).max() / np.abs(grad_d / 2).max())
  assert errors[2] < 1e-3 and errors[0] > 5 * errors[1] > 25 * errors[2], errors
  value, grad = jax.value_and_grad(lambda p: dpo_value(p, policy, sequences, 3.0)[0])(
      policy)
  np.testing.assert_allclose(value, pairs * math.log(2), rtol=1e-6)
  _, _, _, grad_d_policy = numpy_dpo(policy, policy, sequences, 1.0)
  np.testing.assert_allclose(grad, -3.0 / 2 * grad_d_policy, rtol=1e-4, atol=1e-6)


# ---- the method in training ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def started_runs(tiny_overrides, tmp_path_factory):
  """A 3-step standard run on the pairs' chosen texts (the source), and a 6-step DPO run started
  from it, uninterrupted: (their parent folder, the DPO run's config)."""
  root = tmp_path_factory.mktemp("dpo_runs")
  source = load_config(TINY_CONFIG, [*tiny_overrides, *DPO[1:], "train.steps=3"])
  training.train_and_evaluate(source, str(root / "source"))
  config = load_config(TINY_CONFIG, [*tiny_overrides, *DPO, f"train.init_from={root / 'source'}"])
  training.train_and_evaluate(config, str(root / "reference"))
  return root, config


def test_the_reference_is_the_source_runs_params_unmoved_and_has_no_optimizer_state(
    started_runs):
  root, config = started_runs
  trainer = training.Trainer(config, ByteTokenizer())
  checkpointer = Checkpointer(str(root / "reference"), keep=3, read_only=True)
  state, step = checkpointer.restore_latest(trainer.abstract_state())
  checkpointer.close()
  assert step == 6
  source = load_run(str(root / "source"))[3]
  assert jax.tree.all(jax.tree.map(np.array_equal, state.params.reference, source))
  assert not jax.tree.all(jax.tree.map(np.array_equal, state.params.policy, source))
  # The optimizer's state is AdamW's of the policy alone: its two moments and a step count.
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert size(state.opt_state) == size(trainer.optimizer.init(source))
  assert size(state.opt_state) < 2 * size(source) + 10
  # What eval, sampling and init_from read is the policy.
  assert jax.tree.all(jax.tree.map(np.array_equal, load_run(str(root / "reference"))[3],
                                   state.params.policy))


def test_a_run_from_init_from_starts_at_log_2_and_resumes_exactly_after_sigterm(
    started_runs, monkeypatch):
  """The reference is the source run's params, so the first step's loss is log 2; stopped by
  SIGTERM at step 2 and run again, the run repeats the uninterrupted one."""
  root, config = started_runs
  reference = read_metrics(str(root / "reference"))
  assert reference[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert reference[-1]["loss"] < reference[0]["loss"] and "eval_loss" in reference[-1]
  assert reference[-1]["reward_accuracy"] > 0.5 and reference[-1]["reward_margin"] > 0

  preempted_then_resumed(config, str(root / "run"), monkeypatch)
  resumed = read_metrics(str(root / "run"))
  keys = ("loss", "grad_norm", "reward_accuracy", "reward_margin", "logp_chosen", "eval_loss")
  assert [{k: r.get(k) for k in keys} for r in resumed] == [
      {k: r.get(k) for k in keys} for r in reference]


@pytest.mark.parametrize("overrides, message", [
    (["data.source=stdlib"], "train.method='dpo' trains on preference pairs: "
                             "data.source='stdlib' has none (use data.source='preferences')"),
    (["dpo.beta=0"], "dpo.beta=0.0 must be positive"),
    (["dpo.beta=-1"], "dpo.beta=-1.0 must be positive"),
    (["train.z_loss=1e-4"], "train.z_loss=0.0001 is the model objective's"),
    (["data.preference_dataset=nope"], "data.preference_dataset='nope' is not one of"),
])
def test_bad_input_is_one_line_naming_the_key_and_writes_nothing(
    overrides, message, started_runs, tiny_overrides):
  root, _ = started_runs
  workdir = root / "reference"
  before = snapshot(workdir)
  with pytest.raises(SystemExit) as raised:
    cli.main(["--config", TINY_CONFIG, "--workdir", str(workdir),
              *(f"--config.{o}" for o in [*tiny_overrides, *DPO, *overrides])])
  assert raised.value.code.startswith(f"error: {message}"), raised.value.code
  assert "\n" not in raised.value.code
  assert snapshot(workdir) == before


def test_eight_devices_with_accumulation_match_one(tmp_path):
  eight = tmp_path / "eight.npz"
  one = beside_eight_devices([os.path.join(TESTS_DIR, "dpo_worker.py"), eight],
                             tmp_path / "worker.log", dpo_worker.run)
  eight = dict(np.load(eight))
  assert eight.keys() == one.keys()
  for name, value in one.items():
    np.testing.assert_allclose(eight[name], value, rtol=2e-4, atol=2e-5, err_msg=name)
  assert one["metrics|loss|0"] == pytest.approx(math.log(2), abs=1e-6)
  assert one["metrics|loss|2"] < one["metrics|loss|0"]

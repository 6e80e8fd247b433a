"""bGPT simulating a CPU (Wu et al. 2024, "Beyond Language Models"): the accuracy of the states a
small bGPT predicts for held-out programs, against the number of programs it was trained on.

    python experiments/bgpt_cpu_states.py --workdir /tmp/bgpt_cpu_states [--sizes 1k,10k,100k]
        [--steps 600] [--batch_size 16] [--data_dir DIR]
        [--out experiments/results/bgpt_cpu_states]

One bGPT (`MODEL`, patch size 16) trains on each `cpu_states` config (10^3, 10^4, 10^5 random
programs of 1 to 16 instructions in a 64-byte memory; data/byte_datasets.py) for the same number
of steps and batch size, rows of 336 bytes (the memory block, up to 16 states of 16 bytes, the
end patch). Each run then reads every program of the held-out split (`--split`, shared by the
three configs; no program of it is in any training set) and predicts its states two ways:

  generated        greedy generation from the memory block alone (`bgpt.generate`) up to the
                   end patch the model writes, as in the paper: an early error propagates;
  teacher-forced   the argmax of the model's logits at every state byte of the true row, each
                   byte predicted from the true bytes before it (no error compounds).

`cpu_states.score_all` re-simulates each program and scores byte and state accuracy (a state is
right when all 16 of its bytes are). Writes `<out>.md` (table) and `<out>.png` (accuracy against
the number of programs). Re-running on the same workdir reuses finished runs.

The shared parts of the bGPT experiments (`MODEL`, `byte_run_config`) live here;
experiments/bgpt_abc_midi.py and experiments/bgpt_media.py import them.
"""
import argparse
import os
import time

import jax
import numpy as np

from llm_research.config import base_config
from llm_research.data import byte_datasets, byte_rows, cpu_states
from llm_research.metrics import read_metrics
from llm_research.models import bgpt
from llm_research.sample import load_run
from llm_research.training import train_and_evaluate
from report import header, write

# A ~1.2M-parameter bGPT: PRESETS["small"] (patch size 16) narrowed and made shallower to train
# in minutes on 2 CPU cores.
MODEL = dict(bgpt.PRESETS["small"], num_patch_layers=2, num_byte_layers=1, embed_dim=128,
             head_dim=32, mlp_dim=352)
SEQ_LEN = 336  # 4 patches of memory, 16 states, the end patch
PREDICT_BATCH = 250  # programs generated or scored at once


def byte_run_config(byte_dataset: str, byte_config: str, seq_len: int, args, *, steps: int,
                    batch_size: int, evals: int = 1, **model):
  """A bGPT run (`MODEL`, updated by `model`) on `data.byte_dataset` rows of `seq_len` bytes
  from `args.data_dir`: `steps` steps of `batch_size` at `args.learning_rate` (10% warmup,
  cosine decay), evaluated `evals` times over the whole validation split (`args.eval_rows`
  rows at most)."""
  config = base_config("bgpt")
  config.model.update(**{**MODEL, **model})
  config.data.update(source="bytes", byte_dataset=byte_dataset, byte_config=byte_config,
                     seq_len=seq_len, data_dir=args.data_dir)
  every = max(steps // evals, 1)
  config.train.update(steps=steps, batch_size=batch_size, learning_rate=args.learning_rate,
                      warmup_steps=max(steps // 10, 1), eval_every=every, log_every=every,
                      eval_batches=-(-args.eval_rows // batch_size), checkpoint_every=steps,
                      keep_checkpoints=1, progress_bar=False)
  return config


def held_out_memories(data_config, split: str) -> list[bytes]:
  """The memory blocks of the programs of `split` of the configured cpu_states build."""
  builder = byte_datasets.CpuStates(config=data_config.byte_config,
                                    data_dir=data_config.data_dir, file_format="array_record")
  builder.download_and_prepare()  # a no-op once built
  records = builder.as_data_source(split)
  return [bytes(records[i]["memory"]) for i in range(len(records))]


def generated_states(model_config, params, memories: list[bytes], seq_len: int) -> list[list]:
  """The states the model writes after each memory block (greedy, until its end patch or the
  row's end)."""
  predictions = []
  for start in range(0, len(memories), PREDICT_BATCH):
    chunk = memories[start:start + PREDICT_BATCH]
    predictions += bgpt.generate(model_config, params, [list(m) for m in chunk],
                                 max_new_tokens=seq_len - len(chunk[0]))
  return predictions


def teacher_forced_states(model_config, params, memories: list[bytes], seq_len: int) -> list:
  """Per program, the argmax of the logits at each byte after the memory block, on the true row
  (memory and true states): each byte predicted from the true bytes before it."""
  apply = jax.jit(model_config.make_model().apply)
  predictions = []
  for start in range(0, len(memories), PREDICT_BATCH):
    chunk = memories[start:start + PREDICT_BATCH]
    rows = [byte_rows.make_row([m + cpu_states.simulate(m)], seq_len, model_config.patch_size)
            for m in chunk]
    batch = {k: np.stack([row[k] for row in rows]) for k in ("inputs", "positions",
                                                              "segment_ids")}
    logits = apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    predicted = np.asarray(np.argmax(logits, axis=-1))
    predictions += [predicted[i, len(m):].tolist() for i, m in enumerate(chunk)]
  return predictions


def evaluate_run(workdir: str, memories: list[bytes]) -> dict:
  """Scores of a finished run's states for the programs in `memories`: generated and
  teacher-forced; its validation bits per byte and training minutes (from its metrics)."""
  config, _, model_config, params, _ = load_run(workdir)
  seq_len = config.data.seq_len
  scores = {}
  for how, predict in (("generated", generated_states), ("teacher_forced", teacher_forced_states)):
    for name, value in cpu_states.score_all(
        memories, predict(model_config, params, memories, seq_len)).items():
      scores[f"{how}_{name}"] = value
  last = read_metrics(workdir)[-1]
  minutes = (last["compile_time_s"] + last["step_time_s"] * (config.train.steps - 1)) / 60
  return dict(scores, bits_per_byte=last["eval_bits_per_byte"], train_minutes=minutes)


def zero_byte_share(memories: list[bytes]) -> float:
  """The byte accuracy of predicting every true state as 16 zeros: the share of zero bytes."""
  zeros = [[0] * len(cpu_states.simulate(memory)) for memory in memories]
  return cpu_states.score_all(memories, zeros)["byte_accuracy"]


def train_programs(data_config) -> int:
  return byte_datasets.CpuStates.builder_configs[data_config.byte_config].train_programs


def write_results(rows: list[dict], zeros: float, programs: int, args, seconds: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  seen = args.steps * args.batch_size
  command = (f"python experiments/bgpt_cpu_states.py --sizes {args.sizes} --steps {args.steps} "
             f"--batch_size {args.batch_size} --learning_rate {args.learning_rate} --split "
             f"{args.split}")
  config = byte_run_config("cpu_states", "1k", SEQ_LEN, args, steps=args.steps,
                           batch_size=args.batch_size)
  model_config = bgpt.BgptConfig(vocab_size=bgpt.VALUES, **MODEL)
  lines = header("bGPT simulating a CPU: state accuracy against training programs", command,
                 seconds)
  lines += [
      f"Model: bGPT {MODEL}, {model_config.num_params() / 1e6:.2f}M params.  ",
      f"Training: rows of {SEQ_LEN} bytes, {args.steps} steps of batch {args.batch_size} "
      f"({seen} rows) for every size, learning rate {args.learning_rate} (warmup "
      f"{config.train.warmup_steps} steps, cosine); a run sees each training program "
      f"{seen}/N times.  ",
      f"Held out: all {programs} programs of the `{args.split}` split (the same for every "
      "size), scored by `cpu_states.score_all`. Generated: greedy from the memory block alone, "
      "as in the paper. Teacher-forced: each byte's argmax given the true bytes before it. Bits "
      "per byte: the validation split's, whole rows. Train min: the run's compile and steps "
      "(from its metrics; the time above also counts evaluation, and only the runs this "
      "invocation trained).  ",
      f"Reference: predicting every state as 16 zero bytes scores {zeros:.1%} byte accuracy "
      "(most registers stay 0 in short programs) and 0% state accuracy.",
      "",
      "| programs | epochs | bits/byte | generated state acc | generated byte acc "
      "| teacher-forced state acc | teacher-forced byte acc | train min |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['train_programs']} | {seen / r['train_programs']:.2f} | {r['bits_per_byte']:.3f} "
        f"| {r['generated_state_accuracy']:.1%} | {r['generated_byte_accuracy']:.1%} "
        f"| {r['teacher_forced_state_accuracy']:.1%} | {r['teacher_forced_byte_accuracy']:.1%} "
        f"| {r['train_minutes']:.1f} |")
  write(args.out + ".md", lines)

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  sizes = [r["train_programs"] for r in rows]
  for key, style, label in (("generated_state_accuracy", "o-", "state, generated"),
                            ("generated_byte_accuracy", "o--", "byte, generated"),
                            ("teacher_forced_state_accuracy", "s-", "state, teacher-forced"),
                            ("teacher_forced_byte_accuracy", "s--", "byte, teacher-forced")):
    ax.plot(sizes, [100 * r[key] for r in rows], style, label=label)
  ax.axhline(100 * zeros, color="gray", linestyle=":", linewidth=1,
             label="byte, all-zero states")
  ax.set_xscale("log")
  ax.set_ylim(0, 100)
  ax.set_xlabel("training programs")
  ax.set_ylabel(f"accuracy on {programs} held-out programs (%)")
  ax.set_title(f"bGPT {model_config.num_params() / 1e6:.1f}M, {args.steps} steps of "
               f"{args.batch_size}", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def add_common_flags(parser: argparse.ArgumentParser, out: str, *, learning_rate: float,
                     eval_rows: int) -> None:
  """The flags every bGPT experiment has (`byte_run_config` reads them)."""
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--learning_rate", type=float, default=learning_rate)
  parser.add_argument("--eval_rows", type=int, default=eval_rows,
                      help="validation rows evaluated during training (the split's size)")
  parser.add_argument("--data_dir", default=base_config().data.data_dir,
                      help="where the byte datasets are (built there on first use)")
  parser.add_argument("--out", default=out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_flags(parser, "experiments/results/bgpt_cpu_states", learning_rate=2e-3,
                   eval_rows=200)
  parser.add_argument("--sizes", default="1k,10k,100k", help="cpu_states configs, in order")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--split", default="test", choices=["test", "validation"])
  args = parser.parse_args()
  start = time.perf_counter()
  rows, memories = [], None
  for size in args.sizes.split(","):
    config = byte_run_config("cpu_states", size, SEQ_LEN, args, steps=args.steps,
                             batch_size=args.batch_size)
    workdir = os.path.join(args.workdir, size)
    train_and_evaluate(config, workdir)
    memories = memories or held_out_memories(config.data, args.split)  # shared by the sizes
    rows.append(dict(evaluate_run(workdir, memories), train_programs=train_programs(
        config.data)))
    print(rows[-1])
  write_results(rows, zero_byte_share(memories), len(memories), args,
                time.perf_counter() - start)


if __name__ == "__main__":
  main()

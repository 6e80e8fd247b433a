"""bGPT converting symbolic music (Wu et al. 2024, "Beyond Language Models"): bits per byte of
ABC -> MIDI against MIDI -> ABC.

    python experiments/bgpt_abc_midi.py --workdir /tmp/bgpt_abc_midi [--steps 200]
        [--batch_size 8] [--seq_len 1536] [--data_dir DIR] [--out experiments/results/bgpt_abc_midi]

Two bGPTs (experiments/bgpt_cpu_states.py's `MODEL`), one per direction, train for the same
steps on the same rows of the `abc_midi/full` build (2000 tunes of music21's corpus, each with
the MIDI file music21 writes for it; data/byte_datasets.py): the input file, the separator patch,
the output file, the end patch (`data.byte_dataset` `abc_to_midi` or `midi_to_abc`; rows of
`--seq_len` bytes, longer tunes cropped). Then, from each model's logits on the validation tunes
that fit a row whole (the same tunes in both directions), bits per byte of

  output   the output file's bytes, after the separator patch: the conversion itself;
  input    the input file's bytes, before the separator: that format modelled on its own;
  row      every byte the loss counts (both files, the patch padding, separator, end patch).

Writes `<out>.md` (table) and `<out>.png` (validation bits per byte during training, and the
parts' bits per byte of the two models). Re-running on the same workdir reuses finished runs.
"""
import argparse
import os
import time

import jax
import numpy as np

from bgpt_cpu_states import MODEL, add_common_flags, byte_run_config
from llm_research.data import byte_rows, pipeline
from llm_research.metrics import read_metrics
from llm_research.sample import load_run
from llm_research.training import train_and_evaluate
from report import header, write

DIRECTIONS = {"ABC -> MIDI": "abc_to_midi", "MIDI -> ABC": "midi_to_abc"}
PARTS = ("output", "input", "row")


def whole_examples(data_config, patch_size: int) -> list[list[np.ndarray]]:
  """The validation examples (input, output) a row of data.seq_len holds uncropped."""
  source = pipeline.load_source(data_config, "validation")
  examples = [source[i]["parts"] for i in range(len(source))]
  room = data_config.seq_len - patch_size  # the end patch takes the rest
  return [parts for parts in examples
          if byte_rows.laid_out_length([len(p) for p in parts], patch_size) <= room]


def part_bits_per_byte(workdir: str) -> dict:
  """Bits per byte of each of PARTS over the run's whole validation examples, from its
  logits."""
  config, _, model_config, params, _ = load_run(workdir)
  size = model_config.patch_size
  examples = whole_examples(config.data, size)
  rows = [byte_rows.make_row(parts, config.data.seq_len, size) for parts in examples]
  batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
  logits = jax.jit(model_config.make_model().apply)(
      {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = np.asarray(jax.nn.logsumexp(logits, axis=-1) - np.take_along_axis(
      logits, batch["targets"][..., None], axis=-1)[..., 0])  # [rows, seq_len], nats
  positions = np.arange(config.data.seq_len)
  masks = {part: np.zeros_like(nll, bool) for part in PARTS}
  for i, (source_file, target_file) in enumerate(examples):
    output_start = -(-len(source_file) // size) * size + size  # after the separator patch
    masks["input"][i] = positions < len(source_file)
    masks["output"][i] = (positions >= output_start) & (positions < output_start
                                                         + len(target_file))
    masks["row"][i] = batch["segment_ids"][i] > 0
  result = {part: float(nll[mask].mean() / np.log(2)) for part, mask in masks.items()}
  return dict(result, tunes=len(examples),
              output_bytes=int(masks["output"].sum()), input_bytes=int(masks["input"].sum()))


def write_results(results: dict, curves: dict, args, seconds: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  command = (f"python experiments/bgpt_abc_midi.py --steps {args.steps} --batch_size "
             f"{args.batch_size} --seq_len {args.seq_len} --learning_rate {args.learning_rate}")
  first = next(iter(results.values()))
  config = byte_run_config("abc_to_midi", "full", args.seq_len, args, steps=args.steps,
                           batch_size=args.batch_size)
  lines = header("bGPT: bits per byte of ABC -> MIDI and MIDI -> ABC", command, seconds)
  lines += [
      f"Model: bGPT {MODEL}, one per direction.  ",
      f"Training: `abc_midi/full` (2000 tunes), rows of {args.seq_len} bytes, {args.steps} "
      f"steps of batch {args.batch_size} ({args.steps * args.batch_size / 2000:.2f} epochs), "
      f"learning rate {args.learning_rate} (warmup {config.train.warmup_steps} steps, cosine); "
      "the same tunes in the same order for both directions.  ",
      f"Measured on the {first['tunes']} of 100 validation tunes that fit a row whole (the same "
      "in both directions), from the model's logits: output = the output file's bytes after the "
      "separator patch; input = the input file's bytes; row = every byte the training loss "
      "counts. \"Validation (all rows)\" is the trainer's own eval over all 100 tunes, cropped "
      "ones included.",
      "",
      "| direction | output bits/byte | input bits/byte | row bits/byte "
      "| validation bits/byte (all rows) | output bytes | input bytes |",
      "|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    lines.append(f"| {name} | {r['output']:.3f} | {r['input']:.3f} | {r['row']:.3f} | "
                 f"{curves[name][-1][1]:.3f} | {r['output_bytes']} | {r['input_bytes']} |")
  write(args.out + ".md", lines)

  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
  for (name, points), marker in zip(curves.items(), "os"):
    left.plot(*zip(*points), marker + "-", label=name)
  left.set_xlabel("step")
  left.set_ylabel("validation bits per byte (whole rows)")
  left.legend()
  width = 0.38
  for offset, (name, r) in zip((-width / 2, width / 2), results.items()):
    right.bar(np.arange(len(PARTS)) + offset, [r[p] for p in PARTS], width, label=name)
  right.set_xticks(np.arange(len(PARTS)), PARTS)
  right.set_ylabel(f"bits per byte ({first['tunes']} whole validation tunes)")
  right.legend()
  fig.suptitle(f"bGPT, {args.steps} steps of {args.batch_size} x {args.seq_len} bytes",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_flags(parser, "experiments/results/bgpt_abc_midi", learning_rate=2e-3,
                   eval_rows=100)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=1536)
  parser.add_argument("--evals", type=int, default=4, help="evaluations per run")
  args = parser.parse_args()
  start = time.perf_counter()
  results, curves = {}, {}
  for name, dataset in DIRECTIONS.items():
    config = byte_run_config(dataset, "full", args.seq_len, args, steps=args.steps,
                             batch_size=args.batch_size, evals=args.evals)
    workdir = os.path.join(args.workdir, dataset)
    train_and_evaluate(config, workdir)
    curves[name] = [(r["step"], r["eval_bits_per_byte"]) for r in read_metrics(workdir)
                    if "eval_bits_per_byte" in r]
    results[name] = part_bits_per_byte(workdir)
    print(name, results[name])
  write_results(results, curves, args, time.perf_counter() - start)


if __name__ == "__main__":
  main()

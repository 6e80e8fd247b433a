"""bGPT classifying digital media (Wu et al. 2024, "Beyond Language Models"): digit images as
BMP bytes, classified by a bGPT fine-tuned from a generatively pre-trained one against the same
classifier from a random init.

    python experiments/bgpt_media.py --workdir /tmp/bgpt_media [--pretrain_steps 100]
        [--finetune_steps 100] [--batch_size 8] [--seeds 3] [--data_dir DIR]
        [--out experiments/results/bgpt_media]

A bGPT (experiments/bgpt_cpu_states.py's `MODEL`) is pre-trained on the next-byte objective
over the `digits_bmp/full` training images (scikit-learn's 1797 handwritten digits as 32 x 32
24-bit BMP files, 3126 bytes each, 180 held out; data/byte_datasets.py) in rows of 3152 bytes.
Two classifiers (`model.num_classes=10`: the patch features mean-pooled, a linear head) then
train for the same steps on the same labelled batches: one from the pre-trained params
(`train.init_from`, which copies the patch decoder and draws the head), one from a random init;
each `--seeds` times (seed s: the head's or the whole model's init and the batch order). All
are evaluated on the 180 held-out digits `--evals` times. Writes `<out>.md` (validation
accuracy during fine-tuning) and `<out>.png`. Re-running on the same workdir reuses finished
runs.
"""
import argparse
import os
import time

import numpy as np

from bgpt_cpu_states import MODEL, add_common_flags, byte_run_config
from llm_research.metrics import read_metrics
from llm_research.training import train_and_evaluate
from report import header, write

SEQ_LEN = 3152  # a 3126-byte BMP padded to whole patches, and the end patch
VALIDATION_DIGITS = 180


def write_results(curves: dict, pretrain_bits: float, args, seconds: float) -> None:
  """curves: arm -> per seed, [(step, validation accuracy, validation loss)]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  command = (f"python experiments/bgpt_media.py --pretrain_steps {args.pretrain_steps} "
             f"--finetune_steps {args.finetune_steps} --batch_size {args.batch_size} "
             f"--seeds {args.seeds} --evals {args.evals} --learning_rate {args.learning_rate}")
  names = list(curves)
  steps = [step for step, _, _ in curves[names[0]][0]]
  mean = {name: np.mean([[acc for _, acc, _ in seed] for seed in curves[name]], axis=0)
          for name in names}
  lines = header("bGPT: digit BMPs classified from a pre-trained vs a random init", command,
                 seconds)
  lines += [
      f"Model: bGPT {MODEL}; the classifier keeps the patch decoder, mean-pools its features and "
      "adds a linear head over 10 classes.  ",
      f"Pre-training: next byte on `digits_bmp/full` (1617 training BMPs), rows of {SEQ_LEN} "
      f"bytes, {args.pretrain_steps} steps of batch {args.batch_size}; validation "
      f"{pretrain_bits:.3f} bits per byte.  ",
      f"Fine-tuning: {args.finetune_steps} steps of batch {args.batch_size} "
      f"({args.finetune_steps * args.batch_size / 1617:.2f} epochs), learning rate "
      f"{args.learning_rate} (10% warmup, cosine), {args.seeds} seeds (seed s: head init and "
      "batch order s, the same batches for both arms); accuracy on the "
      f"{VALIDATION_DIGITS} held-out digits (chance: 10%), mean over seeds and each seed's.",
      "",
      "| fine-tuning step | " + " | ".join(f"{n}: mean val accuracy | {n}: per seed"
                                          for n in names) + " |",
      "|---|" + "---|---|" * len(names),
  ]
  for i, step in enumerate(steps):
    cells = [f"{mean[n][i]:.1%} | " + " / ".join(f"{100 * seed[i][1]:.1f}" for seed in curves[n])
             for n in names]
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  write(args.out + ".md", lines)

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for (name, seeds), color in zip(curves.items(), ("C0", "C1")):
    for seed in seeds:
      ax.plot(steps, [100 * acc for _, acc, _ in seed], color=color, alpha=0.3, linewidth=1)
    ax.plot(steps, 100 * mean[name], "o-", color=color, label=f"{name} (mean of {len(seeds)})")
  ax.axhline(10, color="gray", linestyle="--", linewidth=1, label="chance")
  ax.set_ylim(0, 100)
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel(f"accuracy on {VALIDATION_DIGITS} held-out digits (%)")
  ax.set_title(f"digit BMPs, bGPT pre-trained {args.pretrain_steps} steps", fontsize=10)
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_flags(parser, "experiments/results/bgpt_media", learning_rate=2e-3,
                   eval_rows=VALIDATION_DIGITS)
  parser.add_argument("--pretrain_steps", type=int, default=100)
  parser.add_argument("--finetune_steps", type=int, default=100)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seeds", type=int, default=3, help="fine-tuning runs per arm")
  parser.add_argument("--evals", type=int, default=5, help="evaluations per fine-tuning run")
  args = parser.parse_args()
  start = time.perf_counter()
  pretrain_dir = os.path.join(args.workdir, "pretrain")
  train_and_evaluate(byte_run_config("digits_bmp", "full", SEQ_LEN, args,
                                     steps=args.pretrain_steps, batch_size=args.batch_size),
                     pretrain_dir)
  pretrain_bits = read_metrics(pretrain_dir)[-1]["eval_bits_per_byte"]
  curves = {"pre-trained": [], "random init": []}
  for seed in range(args.seeds):
    for name, source in (("pre-trained", pretrain_dir), ("random init", "")):
      config = byte_run_config("digits_bmp", "full", SEQ_LEN, args, steps=args.finetune_steps,
                               batch_size=args.batch_size, evals=args.evals, num_classes=10)
      config.train.update(init_from=source, seed=seed)
      config.data.shuffle_seed = seed
      workdir = os.path.join(args.workdir, f"{'finetune' if source else 'scratch'}_seed{seed}")
      train_and_evaluate(config, workdir)
      curves[name].append([(r["step"], r["eval_accuracy"], r["eval_loss"])
                           for r in read_metrics(workdir) if "eval_accuracy" in r])
  write_results(curves, pretrain_bits, args, time.perf_counter() - start)


if __name__ == "__main__":
  main()

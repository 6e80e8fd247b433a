"""Depth up-scaling (SOLAR 10.7B, Kim et al. 2023) at small scale: with the same extra training
tokens, a dense checkpoint of n layers (a) trained on as it is, (b) up-scaled to 2 (n - m)
layers and trained, (c) the 2 (n - m)-layer model trained from scratch.

    python experiments/depth_upscaling.py --workdir /tmp/depth_upscaling [--pretrain_steps 300]
        [--extra 1.0] [--evals 12] [--drop 1] [--corpus full]
        [--out experiments/results/depth_upscaling]

The dense model, its pre-training and the extra runs' recipe are experiments/upcycling.py's
(same flags; a shared --workdir reuses its dense runs). The up-scaled model stacks the
checkpoint's layers [0, n - m) and [m, n) (methods/depth_upscale.py), reached through
`train.init_from` with `model.num_layers=2 (n - m)` and a fresh optimizer; SOLAR drops m = n / 4
(32 -> 48 layers), here 4 -> 6. All three arms train `extra * pretrain_steps` steps of the same
batch on the same extra data, so equal tokens; the deeper arms spend more FLOPs a token (the
table says how much). SOLAR's claim: the up-scaled model starts worse than the base (the
seam between the two copies), recovers quickly in continued pre-training and ends better.

Writes `<out>.md` (validation loss against extra tokens) and `<out>.png`. Re-running on the
same workdir resumes unfinished runs and reads finished ones back.
"""
import argparse
import os
import time

from report import header, write
from upcycling import (DENSE_MODEL, EXTRA_FINAL_LR, add_common_flags, curve, curves_table,
                       dense_config, extra_run, flops_per_step, plot, seconds_per_step,
                       start_eval_loss, train)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_flags(parser, "experiments/results/depth_upscaling")
  parser.add_argument("--drop", type=int, default=1, help="m: layers cut from each copy")
  args = parser.parse_args()
  start = time.perf_counter()
  n = DENSE_MODEL["num_layers"]
  deep = 2 * (n - args.drop)
  dense = dense_config(args)
  dense_dir = os.path.join(args.workdir, "dense")
  pretrain = train(dense, dense_dir)
  steps = round(args.extra * args.pretrain_steps / args.evals) * args.evals
  runs = {  # name: (config, workdir)
      "dense continued": (extra_run(dense, steps, args.evals, init_from_workdir=dense_dir),
                          "dense_continued"),
      f"up-scaled to {deep}": (extra_run(dense, steps, args.evals, init_from_workdir=dense_dir,
                                         num_layers=deep), f"upscaled_{deep}"),
      f"{deep} layers from scratch": (extra_run(dense, steps, args.evals, num_layers=deep),
                                      f"scratch_{deep}"),
  }
  columns = {}
  for name, (config, subdir) in runs.items():
    records = train(config, os.path.join(args.workdir, subdir))
    columns[name] = curve(start_eval_loss(config), records, 1 / args.pretrain_steps)
  seconds = time.perf_counter() - start

  checkpoint_loss = pretrain[-1]["eval_loss"]
  flops = {name: flops_per_step(config) / flops_per_step(dense)
           for name, (config, _) in runs.items()}
  timing = {name: seconds_per_step(os.path.join(args.workdir, subdir))
            for name, (_, subdir) in runs.items()}
  command = (f"python experiments/depth_upscaling.py --pretrain_steps {args.pretrain_steps} "
             f"--extra {args.extra} --evals {args.evals} --drop {args.drop} --learning_rate "
             f"{args.learning_rate} --corpus {args.corpus}")
  lines = header("Depth up-scaling: validation loss against extra tokens", command, seconds)
  lines += [
      f"Data and recipe: experiments/upcycling.py's (stdlib `{args.corpus}` corpus, byte "
      f"tokenizer, seq_len {dense.data.seq_len}, batch {dense.train.batch_size}, learning rate "
      f"{args.learning_rate}: constant in pre-training, each extra run warmed up and decayed "
      f"(cosine) to {EXTRA_FINAL_LR} of it over its budget; fresh optimizer when continuing; "
      "extra data in another order).  ",
      f"Dense: {DENSE_MODEL}, pre-trained {args.pretrain_steps} steps (validation loss "
      f"{checkpoint_loss:.3f}). Up-scaled: layers [0, {n - args.drop}) then [{args.drop}, {n}) "
      f"of the checkpoint, {deep} layers. Each arm: {steps} extra steps.  ",
      "FLOPs per token relative to the dense model: "
      + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in flops.items()) + ".  ",
      "Seconds per train step on this machine: "
      + ", ".join(f"{name} {t:.2f}" for name, t in timing.items()) + ".",
      "",
      "Extra tokens are those trained on after the dense checkpoint, as a fraction of the "
      "dense pre-training's. Eval 0 is each run's starting point, before its first step: the "
      "dense checkpoint, the up-scaled model, a random init.",
      "",
      *curves_table(columns, "extra tokens"),
  ]
  write(args.out + ".md", lines)
  plot(args.out + ".png", columns, checkpoint_loss,
       "extra training tokens / dense pre-training tokens",
       f"dense {n} layers -> {deep} (drop {args.drop}), equal extra tokens")


if __name__ == "__main__":
  main()

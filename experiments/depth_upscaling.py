"""Depth up-scaling (SOLAR 10.7B, Kim et al. 2023) as a fair test: from the saturated dense
checkpoint of experiments/upcycling.py (n layers), does the up-scaled model of 2 (n - m) layers,
trained on, end below the dense model trained on, at equal tokens and at equal FLOPs?

    python experiments/depth_upscaling.py --workdir /tmp/upcycling [--gpu] [--extra 0.2]
        [--drop 1] [--seeds 0,1,2] [--deadline HH:MM] [--out experiments/results/depth_upscaling]

The base, its pre-training to saturation, the extra runs' recipe and the seeds are
experiments/upcycling.py's (same flags; a shared --workdir reuses its base and its dense
continued runs). Arms, after the checkpoint:

  dense, equal tokens     the checkpoint trained `--extra` x its pre-training FLOPs   (seeds)
  dense, equal FLOPs      the same, trained as many FLOPs as the up-scaled arm        (seeds)
  up-scaled (drop m)      layers [0, n - m) then [m, n) of the checkpoint             (seeds)
                          (methods/depth_upscale.py), the dense arm's tokens
  stacked (m = 0)         the n layers twice, the same tokens                         (first seed)
  deeper from scratch     2 (n - m) layers from a random init, the same tokens        (first seed)

SOLAR drops m = n / 4 (32 -> 48 layers); here n = 4, m = 1: 4 -> 6. SOLAR's claim: the up-scaled
model starts worse than the base (the seam between the two copies), recovers quickly in continued
pre-training and ends better. Measured: the dip (up-scaled at step 0 - the checkpoint), the steps
to recover (the first evaluation at or below the checkpoint's loss, interpolated), and the final
gaps to both dense arms, paired per seed, with their standard errors. "Reproduced" only if the
up-scaled model ends below the dense model at equal FLOPs by more than twice the standard error;
below dense at equal tokens only, it is said so.

Writes `<out>.md` and `<out>.png` (validation loss against extra FLOPs with seed bands).
Finished runs are kept in the workdir and read back.
Budget: about 15 minutes of 2 idle cores after the base (experiments/upcycling.py's docstring).
"""
import argparse
import os

import numpy as np

from llm_research.data.tokenizers import ByteTokenizer
from llm_research.training import model_config_from
from report import write
from runs import Runner, deadline_timestamp, describe, mean_sd
from upcycling import (EVALS, Arms, add_common_flags, band,
                       dense_config, equal_compute_steps, extra_run, flops_per_step,
                       gap_reading, paired_gap, parse, pretrain, results_head)


def recovery_step(curve: list, target: float) -> float | None:
  """The first step at which a [step, loss] curve reaches `target` (linear between
  evaluations), or None if it never does."""
  for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
    if l1 <= target:
      return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else s0
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_flags(parser, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "depth_upscaling"))
  parser.add_argument("--drop", type=int, default=1, help="m: layers cut from each copy")
  args = parse(parser)
  base = pretrain(args)
  dense = dense_config(args, base["steps"])
  n = dense.model.num_layers
  deep = 2 * (n - args.drop)
  steps = EVALS * max(round(args.extra * base["steps"] / EVALS), 1)
  equal_flops = equal_compute_steps(steps, extra_run(dense, 1, 0, num_layers=deep), dense)
  runner = Runner(deadline_timestamp(args.deadline))
  arms = Arms(args, runner)
  source = base["workdir"]
  arms.add("dense, equal tokens", "dense_continued",
           lambda s: extra_run(dense, steps, s, init_from_workdir=source), args.seeds)
  arms.add("dense, equal FLOPs", f"dense_continued_{equal_flops}",
           lambda s: extra_run(dense, equal_flops, s, init_from_workdir=source), args.seeds)
  arms.add(f"up-scaled to {deep} (drop {args.drop})", f"upscaled_{deep}",
           lambda s: extra_run(dense, steps, s, init_from_workdir=source, num_layers=deep),
           args.seeds)
  arms.add(f"stacked to {2 * n} (drop 0)", f"upscaled_{2 * n}",
           lambda s: extra_run(dense, steps, s, init_from_workdir=source, num_layers=2 * n),
           args.seeds[:1])
  arms.add(f"{deep} layers from scratch", f"scratch_{deep}",
           lambda s: extra_run(dense, steps, s, num_layers=deep), args.seeds[:1])
  arms.train()
  write_results(args, base, dense, arms, runner, deep, steps, equal_flops)


def write_results(args, base, dense, arms: Arms, runner, deep, steps, equal_flops) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(arms.arms)
  equal_tokens, equal_compute, upscaled, stacked, scratch = names
  unit = flops_per_step(dense) * base["steps"]
  x_per_step = {name: flops_per_step(make(0)) / unit for name, (_, make, _) in arms.arms.items()}
  curves = {name: arms.curves(name) for name in names}
  checkpoint = base["curve"][-1][1]
  deep_model = model_config_from(extra_run(dense, 1, 0, num_layers=deep),
                                 ByteTokenizer.vocab_size)
  lines = results_head(args, base, dense, runner, "Depth up-scaling: from a saturated dense "
                       "checkpoint, at equal tokens and FLOPs", f"--drop {args.drop} ")
  lines += [
            f"Up-scaled: layers [0, {dense.model.num_layers - args.drop}) then [{args.drop}, "
            f"{dense.model.num_layers}) of the checkpoint, {deep} layers, "
            f"{deep_model.num_params() / 1e6:.2f}M params, "
            f"{x_per_step[upscaled] / x_per_step[equal_tokens]:.2f}x dense's FLOPs per token: "
            f"{steps} steps at equal tokens; dense at equal FLOPs takes {equal_flops}.", "",
            "Validation loss (nats/byte), mean +- sd over seeds; step 0 is each run's start:", "",
            "| arm | seeds | step 0 | end | steps | extra FLOPs / pre-training's | steps to "
            "reach the checkpoint's loss |", "|---|---|---|---|---|---|---|"]
  for name, found in curves.items():
    if not found:
      continue
    recovered = [recovery_step(c, checkpoint) for c in found.values()]
    recover = ("-" if name in (equal_tokens, equal_compute) else
               describe(mean_sd(recovered), 0) if None not in recovered else
               f"not reached by {sum(r is None for r in recovered)} of {len(recovered)}")
    run_steps = next(iter(found.values()))[-1][0]
    lines.append(f"| {name} | {len(found)} | {describe(mean_sd(c[0][1] for c in found.values()))}"
                 f" | {describe(mean_sd(c[-1][1] for c in found.values()), 4)} | {run_steps} | "
                 f"{run_steps * x_per_step[name]:.3f} | {recover} |")
  vs_flops, flops_sentence = gap_reading(paired_gap(curves[upscaled], curves[equal_compute]),
                                         "up-scaled - dense at equal FLOPs")
  vs_tokens, tokens_sentence = gap_reading(paired_gap(curves[upscaled], curves[equal_tokens]),
                                           "up-scaled - dense at equal tokens")
  verdict = ("reproduced at this scale" if vs_flops else
             "reproduced at equal tokens only, not at equal FLOPs" if vs_tokens else
             "not reproduced at this scale")
  dips = [c[0][1] - checkpoint for c in curves[upscaled].values()]
  lines += ["", f"**Reading: {verdict}.** The claim: the up-scaled model starts worse than the "
            "base (the seam), recovers, and ends better than the base trained on. "
            + (f"Here it started {np.mean(dips):+.3f} nats/byte from the checkpoint; "
               if dips else "")
            + f"{tokens_sentence}; {flops_sentence}."
            + ("" if base["saturated"] else " The base had not saturated, which favours the "
               "dense arms.")]
  for name, other in ((stacked, upscaled), (scratch, upscaled)):
    gap = paired_gap(curves[name], curves[other])
    if gap:
      lines.append(f"{name} - {other}: {np.mean(gap):+.4f} (one seed).")
  if runner.missing:
    lines += ["", f"Missing ({len(runner.missing)} runs not started before the deadline): "
              + "; ".join(f"{name} seed {seed}" for name, seed in runner.missing) + "."]
  lines += ["", f"![depth up-scaling]({os.path.basename(args.out)}.png)"]
  write(args.out + ".md", lines)

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for (name, found), color in zip(curves.items(), ("C0", "C7", "C1", "C3", "C2")):
    if found:
      band(ax, found, x_per_step[name], name, color=color)
  ax.axhline(checkpoint, color="gray", linestyle="--", linewidth=1, label="dense checkpoint")
  finals = [c[-1][1] for found in curves.values() for c in found.values()]
  ax.set_ylim(min(finals) - 0.03, checkpoint + 0.3)
  ax.set(xlabel="extra training FLOPs / dense pre-training FLOPs",
         ylabel="validation loss (nats/byte)",
         title=f"dense {dense.model.num_layers} layers -> {deep} (mean +- sd over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


if __name__ == "__main__":
  main()

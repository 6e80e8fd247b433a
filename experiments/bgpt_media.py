"""bGPT classifying digital media (Wu et al. 2024, "Beyond Language Models"): does generative
pre-training on a modality's bytes help a bGPT classify that modality, most where labels are few?

    python experiments/bgpt_media.py --workdir /tmp/bgpt_media [--gpu] [--modalities digits,wav]
        [--labels 10,all] [--finetune_steps 100,400] [--learning_rates 3e-4,1e-3,3e-3,1e-2]
        [--seeds 5] [--pretrain_epochs 8] [--learning_rate 3e-3] [--deadline 15:05]
        [--data_dir DIR]
        [--out experiments/results/bgpt_media]

Two modalities, each a labelled set of real files (data/byte_datasets.py, built locally):

  digits  `digits_bmp/8x8`: scikit-learn's 1797 handwritten digits as 24-bit BMPs at their own
          8 x 8 pixels (246 bytes; 1617 train, 180 held out), 10 classes;
  wav     `wav_tones/short`: 8 kHz 8-bit mono WAV files (python's `wave`) of 20-30 ms of a sine,
          square, sawtooth or noise at a random pitch and loudness (204-284 bytes; 2000 train,
          400 held out), 4 classes.

The files are small so that the pre-training sees each several times within the budget: a
32 x 32 BMP (3126 bytes, the first version of this experiment) or a 0.1-0.25 s clip (up to 2044
bytes) costs 8-12x the bytes per example, and the first version's pre-training got half an epoch.

Per modality a bGPT (experiments/bgpt_cpu_states.py's `MODEL`) is pre-trained on the next byte
over the whole training split, labels unused, for `--pretrain_epochs` epochs at
`--learning_rate`. Then, for each
labels-per-class count of `--labels` (n: the build `<base>_<n>_s<seed>`, n of each class drawn
from the training split; `all`: the whole split), two arms train the same classifier
(`model.num_classes`: the patch features mean-pooled, a linear head) on the same labelled
examples, in the same batches, for the same steps (`--finetune_steps`, one per count):

  pre-trained  `train.init_from` the pre-trained run (the patch decoder copied, the head drawn);
  random init  every param drawn afresh.

Seed s (0 .. `--seeds` - 1) is the labelled draw, the head's (or the whole model's) init and the
batch order; the arms are paired by seed. Each arm picks its own learning rate by a sweep over
`--learning_rates` on seed 0 (highest final held-out accuracy, then lowest loss), at each count;
its other seeds train at that rate. The measure is accuracy on the held-out split at the end of
fine-tuning (the same split picks the rate, for both arms alike). Writes `<out>.md` (tables and
a reading written from the numbers: the claim reproduces for a modality if the pre-trained arm is
ahead at the fewest labels by more than the seed spread: the paired gain's mean above twice
its standard error over seeds, runs.beyond_spread) and `<out>.png` (accuracy, mean +- sd, against
labels per class; the pre-training curves). Finished runs are kept in the workdir and read back
by a re-run; with `--deadline HH:MM` (UTC) no run starts that would end past it, and the results
name the missing runs.

Time budget: the CPU preset, a 1.2M-parameter bGPT, 2 pre-trainings of 8 epochs (404 and 500
steps of batch 32) and 64 fine-tunes (4 rates x 2 arms x 2 counts x 2 modalities swept, 4 more
seeds each) of 100 or 400 steps of batch 16, is sized for about 25 minutes of 2 idle CPU cores.
On 2 cores shared with three other jobs (load 7) a pre-training step took 0.85 s, a fine-tuning
step 0.03-0.06 s and each fine-tune about 20 s more to compile, evaluate and checkpoint: about
50 minutes there. `--gpu` is the larger version for a lent GPU (not yet run): bGPT's "small"
preset (6.0M params), 30 pre-training epochs of batch 64, labels 10, 50 and all, 4x the
fine-tuning steps: minutes per pre-training and seconds per fine-tune on one H100, about half
an hour in all, mostly the fine-tunes' compilation; what it would change is the scale of the
pre-training (more epochs, a wider model), the lever the paper's claim rests on.
"""
import argparse
import dataclasses
import math
import os

import numpy as np

from bgpt_cpu_states import MODEL, add_common_flags, byte_run_config
from llm_research.data import byte_datasets, media
from llm_research.metrics import read_metrics
from llm_research.models import bgpt
from report import header, write
from runs import Runner, beyond_spread, deadline_timestamp, describe, mean_sd, tail_drop


@dataclasses.dataclass(frozen=True)
class Modality:
  dataset: str  # data.byte_dataset
  base: str  # its build of every training example; `<base>_<n>_s<seed>` are the subsets
  seq_len: int  # the longest file padded to whole patches, and the end patch
  classes: list[str]
  train_examples: int
  held_out: int
  files: str  # what a file is, for the results


MODALITIES = {
    "digits": Modality("digits_bmp", "8x8", 272, [str(d) for d in range(10)],
                       byte_datasets.DIGITS_8X8.train_examples,
                       byte_datasets.DIGITS_8X8.validation_examples,
                       "8 x 8 handwritten digits as 246-byte 24-bit BMPs"),
    "wav": Modality("wav_tones", "short", 304, list(media.WAVEFORMS),
                    byte_datasets.SHORT_CLIPS.train_examples,
                    byte_datasets.SHORT_CLIPS.validation_examples,
                    "20-30 ms 8 kHz 8-bit mono WAVs of four waveforms (204-284 bytes)"),
}
ARMS = ("pre-trained", "random init")
PRESETS = {
    "cpu": dict(model={}, pretrain_epochs=8, pretrain_batch=32, learning_rate=3e-3,
                finetune_batch=16, labels="10,all", finetune_steps="100,400"),
    "gpu": dict(model=bgpt.PRESETS["small"], pretrain_epochs=30, pretrain_batch=64,
                learning_rate=1e-3, finetune_batch=16, labels="10,50,all",
                finetune_steps="400,800,1200"),
}
FINETUNE_EVALS = 4  # held-out evaluations per fine-tune (its accuracy curve)
PRETRAIN_EVALS = 8
CEILING = 0.97  # a random-init accuracy this high leaves pre-training little room to show
TAIL = 0.25  # the share of steps the convergence checks look at


def labels_per_class(count: str, modality: Modality) -> float:
  """The labelled examples per class of a `--labels` entry (`all`: the training split's mean)."""
  return modality.train_examples / len(modality.classes) if count == "all" else int(count)


def pretrain_config(modality: Modality, args):
  steps = round(args.pretrain_epochs * modality.train_examples / args.pretrain_batch)
  return byte_run_config(modality.dataset, modality.base, modality.seq_len, args, steps=steps,
                         batch_size=args.pretrain_batch, evals=PRETRAIN_EVALS, **args.model)


def finetune_config(modality: Modality, count: str, steps: int, arm: str, learning_rate: float,
                    seed: int, pretrain_dir: str, args):
  build = modality.base if count == "all" else f"{modality.base}_{count}_s{seed}"
  config = byte_run_config(modality.dataset, build, modality.seq_len, args, steps=steps,
                           batch_size=args.finetune_batch, evals=FINETUNE_EVALS,
                           num_classes=len(modality.classes), **args.model)
  config.train.update(learning_rate=learning_rate, seed=seed,
                      init_from=pretrain_dir if arm == "pre-trained" else "")
  config.data.shuffle_seed = seed
  return config


def accuracy_curve(workdir: str) -> list[tuple[int, float]]:
  return [(r["step"], r["eval_accuracy"]) for r in read_metrics(workdir) if "eval_accuracy" in r]


def run_all(args) -> tuple[dict, dict, Runner]:
  """Trains (or reads back) every run: per modality its pre-training result, and per (modality,
  count, arm) the sweep ({rate: seed 0's run}), the chosen rate and the seeds' runs ({seed: run},
  a run: its result with `accuracy`, its held-out accuracy curve)."""
  runner = Runner(deadline_timestamp(args.deadline))
  pretrained, cells = {}, {}

  def run(key, config, workdir, cost):
    result = runner.get(key, config, workdir, cost)
    return None if result is None else dict(result, accuracy=accuracy_curve(workdir))

  for name in args.modalities:
    modality = MODALITIES[name]
    workdir = os.path.join(args.workdir, name, "pretrain")
    config = pretrain_config(modality, args)
    pretrained[name] = dict(workdir=workdir, steps=config.train.steps, result=runner.get(
        (name, "pretrain"), config, workdir, cost=5 * config.train.steps * modality.seq_len))
  plan = [(name, count, steps, arm) for name in args.modalities if pretrained[name]["result"]
          for count, steps in zip(args.labels, args.finetune_steps) for arm in ARMS]

  def finetune(name, count, steps, arm, rate, seed):
    modality = MODALITIES[name]
    workdir = os.path.join(args.workdir, name, f"{arm.replace(' ', '_')}_{count}_lr{rate:g}"
                                               f"_seed{seed}")
    config = lambda: finetune_config(modality, count, steps, arm, rate, seed,
                                     pretrained[name]["workdir"], args)
    return run((name, count, arm, rate, seed), config, workdir, cost=steps * modality.seq_len)

  for name, count, steps, arm in plan:
    sweep = {rate: finetune(name, count, steps, arm, rate, 0) for rate in args.learning_rates}
    sweep = {rate: run_ for rate, run_ in sweep.items() if run_}
    if sweep:
      chosen = max(sweep, key=lambda rate: (sweep[rate]["accuracy"][-1][1],
                                            -sweep[rate]["curve"][-1][1]))
      cells[name, count, arm] = dict(sweep=sweep, rate=chosen, seeds={0: sweep[chosen]})
  for seed in range(1, args.seeds):  # seed-major: a deadline leaves every cell some seeds
    for name, count, steps, arm in plan:
      if (name, count, arm) in cells:
        cell = cells[name, count, arm]
        result = finetune(name, count, steps, arm, cell["rate"], seed)
        if result:
          cell["seeds"][seed] = result
  return pretrained, cells, runner


def paired(cells: dict, name: str, count: str) -> dict | None:
  """Per arm its final accuracies over the seeds both arms finished, and the paired gain
  (pre-trained - random init) per seed; None unless both arms have a run."""
  arms = [cells.get((name, count, arm)) for arm in ARMS]
  if not all(arms):
    return None
  seeds = sorted(set(arms[0]["seeds"]) & set(arms[1]["seeds"]))
  final = {arm: [cell["seeds"][s]["accuracy"][-1][1] for s in seeds]
           for arm, cell in zip(ARMS, arms)}
  first = {arm: [cell["seeds"][s]["accuracy"][0][1] for s in seeds]
           for arm, cell in zip(ARMS, arms)}
  gain = [a - b for a, b in zip(*final.values())]
  return dict(seeds=seeds, final=final, first=first, gain=gain)


def percent(value: tuple[float, float]) -> str:
  """'mean +- sd' of accuracies, in percent."""
  return describe((100 * value[0], 100 * value[1]), digits=1) + "%"


def count_summary(count: str, result: dict) -> str:
  """One label count's accuracies and paired gain, in words."""
  seeds = len(result["seeds"])
  gain = result["gain"]
  where = "beyond" if beyond_spread(gain) or beyond_spread(-g for g in gain) else "within"
  return (f"{count} per class: {percent(mean_sd(result['final']['pre-trained']))} pre-trained "
          f"against {percent(mean_sd(result['final']['random init']))} from a random init, "
          f"paired gain {describe(tuple(100 * v for v in mean_sd(result['gain'])), 1)} points "
          f"over {seeds} seed{'s' * (seeds > 1)} ({where} the spread)")


def modality_reading(name: str, pretrained: dict, cells: dict, args) -> list[str]:
  """The verdict for one modality from its numbers, and what qualifies it."""
  counts = [count for count in args.labels if paired(cells, name, count)]
  if not counts:
    return [f"**{name}: cannot say.** No label count has runs of both arms (see the missing "
            "runs)."]
  results = {count: paired(cells, name, count) for count in counts}
  fewest = results[counts[0]]
  if beyond_spread(fewest["gain"]):
    verdict = "reproduced"
  elif beyond_spread(-g for g in fewest["gain"]):
    verdict = "not reproduced: the random init is ahead beyond the seed spread"
  else:
    verdict = "not reproduced: no difference beyond the seed spread"
  per_count = "; ".join(count_summary(count, r) for count, r in results.items())
  lines = [f"**{name}: {verdict}.** At the fewest labels ({counts[0]} per class) the claim needs "
           f"the pre-trained arm ahead by more than the seed spread (twice the standard error "
           f"of the paired gain). {per_count}."]
  if len(counts) > 1:
    gains = [mean_sd(results[count]["gain"])[0] for count in counts]
    most_where_few = gains[0] > max(gains[-1], 0)
    lines.append("The paired gain goes " + " -> ".join(f"{100 * g:+.1f}" for g in gains)
                 + f" points from {counts[0]} to {counts[-1]} labels per class: the paper's "
                 f"'most where labels are few' {'holds' if most_where_few else 'does not hold'} "
                 "here.")
  starts = {arm: mean_sd(fewest["first"][arm])[0] for arm in ARMS}
  lines.append(f"Head start: at the first held-out evaluation ({FINETUNE_EVALS} per run) with "
               f"{counts[0]} per class, the pre-trained arm was at {starts['pre-trained']:.1%} "
               f"and the random init at {starts['random init']:.1%}.")
  result = pretrained[name]["result"]
  bits = [loss / math.log(2) for _, loss in result["curve"]]
  drop = tail_drop([[[step, loss / math.log(2)] for step, loss in result["curve"]]], TAIL)
  lines.append(f"Pre-training ({args.pretrain_epochs} epochs, {pretrained[name]['steps']} steps) "
               f"took the held-out loss from {bits[0]:.3f} to {bits[-1]:.3f} bits/byte, "
               f"{drop:.3f} of it in the last {TAIL:.0%} of the steps"
               + (" (still falling: more epochs might make features more useful)"
                  if drop > 0.01 * bits[-1] else " (levelled off)") + ".")
  full = results.get("all")
  if full and mean_sd(full["final"]["random init"])[0] >= CEILING:
    lines.append(f"With all labels the random init reaches "
                 f"{mean_sd(full['final']['random init'])[0]:.1%}: near the ceiling, so there "
                 "is little left for pre-training to add there.")
  rising = [f"{count} {arm}" for count in counts for arm in ARMS
            if np.mean([curve_rise(run["accuracy"]) for run in
                        cells[name, count, arm]["seeds"].values()]) > 0.02]
  if rising:
    lines.append("Still rising at the end (held-out accuracy up more than 2 points over the "
                 f"last {TAIL:.0%} of fine-tuning, mean over seeds): " + ", ".join(rising)
                 + "; longer fine-tuning could change those numbers.")
  edge = [f"{count} {arm} ({cells[name, count, arm]['rate']:g})" for count in counts
          for arm in ARMS if len(args.learning_rates) > 1 and cells[name, count, arm]["rate"]
          in (min(args.learning_rates), max(args.learning_rates))]
  if edge:
    lines.append("The chosen learning rate is at the sweep's edge for " + ", ".join(edge) + ".")
  return lines


def curve_rise(curve: list[tuple[int, float]]) -> float:
  """How much the accuracy rose over the last TAIL of the steps (interpolated)."""
  steps, values = np.array(curve).T
  return float(values[-1] - np.interp(steps[-1] * (1 - TAIL), steps, values))


def write_results(pretrained: dict, cells: dict, runner: Runner, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  model = {**MODEL, **args.model}
  params = bgpt.BgptConfig(vocab_size=bgpt.VALUES, **model).num_params()
  command = (f"python experiments/bgpt_media.py --workdir {args.workdir}"
             + (" --gpu" if args.gpu else "")
             + f" --modalities {','.join(args.modalities)} --labels {','.join(args.labels)} "
             f"--finetune_steps {','.join(map(str, args.finetune_steps))} --learning_rates "
             f"{','.join(f'{r:g}' for r in args.learning_rates)} --seeds {args.seeds} "
             f"--pretrain_epochs {args.pretrain_epochs} --learning_rate {args.learning_rate:g}"
             + (f" --deadline {args.deadline}" if args.deadline else ""))
  lines = header("bGPT: media classified from a pre-trained vs a random init", command,
                 runner.seconds, took=" (the runs' own times, each timed when it ran)")
  lines += [
      f"Model: bGPT {model}, {params / 1e6:.2f}M params; the classifier mean-pools the patch "
      "features into a linear head.  ",
      "Data: " + "; ".join(f"{name}: {MODALITIES[name].files}, {MODALITIES[name].train_examples} "
                           f"train, {MODALITIES[name].held_out} held out"
                           for name in args.modalities) + ".  ",
      f"Pre-training: next byte over the whole training split, {args.pretrain_epochs} epochs of "
      f"batch {args.pretrain_batch}, learning rate {args.learning_rate:g} (10% warmup, "
      "cosine).  ",
      f"Fine-tuning: batch {args.finetune_batch}, " + ", ".join(
          f"{steps} steps with {count} labels per class" for count, steps in
          zip(args.labels, args.finetune_steps)) + " (10% warmup, cosine); each arm's learning "
      f"rate from {', '.join(f'{r:g}' for r in args.learning_rates)} by seed 0's held-out "
      f"accuracy; seeds 0-{args.seeds - 1} (labelled draw, init, batch order; paired between "
      "arms). Accuracy: on the held-out split at the end of fine-tuning.",
      "",
      "| modality | labels per class | arm | learning rate | accuracy (mean +- sd) | per seed "
      "| paired gain, points |",
      "|---|---|---|---|---|---|---|",
  ]
  for name in args.modalities:
    for count in args.labels:
      result = paired(cells, name, count)
      for arm in ARMS:
        cell = cells.get((name, count, arm))
        if cell:
          accuracies = [run["accuracy"][-1][1] for run in cell["seeds"].values()]
          gain = (describe(tuple(100 * v for v in mean_sd(result["gain"])), 1)
                  if result and arm == ARMS[0] else "")
          lines.append(f"| {name} | {count} | {arm} | {cell['rate']:g} | "
                       f"{percent(mean_sd(accuracies))} | "
                       + " / ".join(f"{100 * a:.1f}" for a in accuracies) + f" | {gain} |")
  lines += ["", "Learning-rate sweeps (seed 0, held-out accuracy at the end):", "",
            "| modality | labels per class | arm | " + " | ".join(
                f"{r:g}" for r in args.learning_rates) + " |",
            "|---|---|---|" + "---|" * len(args.learning_rates)]
  for (name, count, arm), cell in cells.items():
    lines.append(f"| {name} | {count} | {arm} | " + " | ".join(
        f"{cell['sweep'][r]['accuracy'][-1][1]:.1%}" if r in cell["sweep"] else "-"
        for r in args.learning_rates) + " |")
  lines += ["", "## Reading", ""]
  for name in args.modalities:
    if pretrained[name]["result"]:
      lines += [*modality_reading(name, pretrained, cells, args), ""]
    else:
      lines += [f"**{name}: cannot say.** Its pre-training did not run (deadline).", ""]
  lines.append(
      f"Scale: a {params / 1e6:.1f}M-parameter bGPT pre-trained on "
      + " and ".join(f"{MODALITIES[name].train_examples} {name} files" for name in args.modalities)
      + "; the paper pre-trains 110M parameters on ImageNet (1.3M images) and LibriSpeech "
      "(960 hours), which this does not test.")
  if runner.missing:
    lines += ["", "Missing (not started before the deadline): "
              + ", ".join(" ".join(map(str, key)) for key in runner.missing) + "."]
  write(args.out + ".md", lines)

  fig, axes = plt.subplots(1, len(args.modalities) + 1,
                           figsize=(4.5 * (len(args.modalities) + 1), 3.8))
  for ax, name in zip(axes, args.modalities):
    modality = MODALITIES[name]
    for arm, color in zip(ARMS, ("C0", "C1")):
      points = [(labels_per_class(count, modality),
                 [run["accuracy"][-1][1] for run in cells[name, count, arm]["seeds"].values()])
                for count in args.labels if (name, count, arm) in cells]
      if points:
        x, accuracies = zip(*points)
        for xi, values in zip(x, accuracies):
          ax.plot([xi] * len(values), 100 * np.array(values), ".", color=color, alpha=0.3)
        means, sds = zip(*(mean_sd(values) for values in accuracies))
        ax.errorbar(x, 100 * np.array(means), yerr=100 * np.nan_to_num(sds), fmt="o-",
                    capsize=3, color=color, label=arm)
    ax.axhline(100 / len(modality.classes), color="gray", linestyle=":", label="chance")
    ax.set(xscale="log", ylim=(0, 100), xlabel="labelled examples per class",
           ylabel=f"% right, {modality.held_out} held-out files",
           title=f"{name} (mean +- sd over seeds)")
    ax.legend()
  for name in args.modalities:
    result = pretrained[name]["result"]
    if result:
      steps, losses = np.array(result["curve"]).T
      epochs = steps * args.pretrain_batch / MODALITIES[name].train_examples
      axes[-1].plot(epochs, losses / math.log(2), "o-", label=name)
  axes[-1].set(xlabel="pre-training epochs", ylabel="held-out bits per byte",
               title="pre-training (next byte)")
  axes[-1].legend()
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_flags(parser, "experiments/results/bgpt_media", learning_rate=None, eval_rows=400)
  parser.add_argument("--gpu", action="store_true", help="the larger preset for a lent GPU")
  parser.add_argument("--modalities", default="digits,wav")
  parser.add_argument("--labels", help="labelled examples per class, fewest first ('all')")
  parser.add_argument("--finetune_steps", help="fine-tuning steps, one per --labels entry")
  parser.add_argument("--learning_rates", default="3e-4,1e-3,3e-3,1e-2",
                      help="each arm's fine-tuning sweep")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--pretrain_epochs", type=float)
  parser.add_argument("--deadline", help="HH:MM (UTC): start no run that would end after it")
  args = parser.parse_args()
  preset = PRESETS["gpu" if args.gpu else "cpu"]
  for key, value in preset.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  args.modalities = args.modalities.split(",")
  args.labels = args.labels.split(",")
  args.finetune_steps = [int(s) for s in args.finetune_steps.split(",")]
  args.learning_rates = [float(r) for r in args.learning_rates.split(",")]
  counts = [str(n) for n in byte_datasets.SUBSET_LABELS_PER_CLASS]
  if (len(args.finetune_steps) != len(args.labels) or not set(args.labels) <= {*counts, "all"}
      or args.seeds > len(byte_datasets.SUBSET_SEEDS)):
    parser.error(f"--labels from {counts} or 'all', one --finetune_steps each, and at most "
                 f"{len(byte_datasets.SUBSET_SEEDS)} --seeds (the subsets byte_datasets.py builds)")
  pretrained, cells, runner = run_all(args)
  write_results(pretrained, cells, runner, args)


if __name__ == "__main__":
  main()

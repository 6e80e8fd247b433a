"""LTE (LoRA-the-Explorer) on a small transformer, as a fair test: full rank, LoRA alone and LTE
trained from scratch on the same batches, each at its own learning rate, at 1x, 2x and 4x the
steps, over seeds.

    python experiments/lte_lm.py --workdir /tmp/lte_lm [--gpu] [--model d64] [--steps 300]
        [--factors 1,2,4] [--batch_size 16] [--heads 4] [--merge 10] [--merge_every 1,10,50]
        [--merge_factor 1] [--learning_rates 3e-3,1e-2,3e-2] [--seeds 0,1] [--deadline 15:05]
        [--out experiments/results/lte_lm]

The paper (Huh et al. 2024, "Training Neural Networks from Scratch with Parallel Low-Rank
Adapters") trains from scratch through N parallel LoRA heads of rank r, merged into the main
weights every T steps, and reports that (1) LTE gets close to full-rank training, given more
steps; (2) a single LoRA of the same rank trained alone plateaus well above both; (3) longer
merge intervals cost quality. The variable here is the method alone; every arm trains the same
model (`bitnet_vs_fp.SIZES`), from the same init seed, on the same batches:

  full rank   `train.method=standard`;
  LoRA alone  `train.method=lte` with one head of rank r = width / N: telescoping, its merges
              change nothing (W = W_0 + s B A), so it is exactly LoRA on the frozen random
              kernels, with an LTE head's parametrisation (orthogonal A, B zero, s = alpha / r,
              adapters at lr / s) and its trained replicas of the embedding and norms;
  LTE         `train.method=lte`, N = `--heads` heads of rank r (heads x rank = the width),
              merged every `--merge` steps, each head on 1/N of every batch (the same global
              batch as the other arms), the paper's alpha 4096; evaluated on the merged model
              (`lte.main_params`).

Each method takes its own peak learning rate from a sweep (`--learning_rates`, seed 0, the
lowest final validation loss at `--steps`); LTE's and LoRA's adapters then train at that rate
/ s, their replicas at the rate. Each step count (`--factors` x `--steps`) is its own run with
its own cosine schedule (warmup a tenth of `--steps`), so a longer run is not a shorter one
read mid-way; all runs evaluate the same 16 validation batches on the same grid of steps. The
merge-interval arms (each T of `--merge_every`) train `--merge_factor` x `--steps`. Every run
trains for each seed of `--seeds` (the init and the data order); gaps between methods are
paired per seed, and "beyond the seed spread" means larger than twice their standard error.
Not run: the paper's lower alpha on the query and key projections (the project has one s for
every projection) and LTE from a partly trained model (`train.init_from`).

Writes `<out>.md` (the sweep; final losses with seed spread, paired gaps, the tail drop; the
schedule length LTE and LoRA need to reach full rank's loss, interpolated in log steps; the
merge intervals with the communication ratio cited from lte_communication_cpu.md; a reading
written from the numbers) and `<out>.png` (validation loss against log step with seed bands;
final loss against schedule length; the paired gaps to full rank; the merge intervals).
Finished runs are kept in the workdir and a re-run reads them back; with `--deadline HH:MM`
(UTC) no run starts that would end after it (the order: the sweep, seed 0's longer runs, the
other seeds' longest, seed 0's merge intervals, the other seeds' shorter runs, their merge
intervals), and the results name the missing runs.

The CPU preset (d64: width 64, 2 layers, 0.11M params; 300, 600 and 1200 steps of batch 16 x
128 bytes; 2 seeds; 28 runs, 15,600 steps) is sized from the smoke runs: 0.09 s a full-rank
step, 0.17 s an LTE step, 0.14-0.17 s a LoRA-alone step (one head on the whole batch costs what
N heads on 1/N of it do) on 2 lightly shared cores, and 15-25 s to compile each of the 17
distinct programs (seeds share them through the persistent cache): about 45 minutes there,
an estimated 30 on idle cores, up to twice 45 beside three other experiments (measured: 75
minutes of training, summed over the runs, beside three other experiments). `--gpu` is a
larger preset for a lent GPU (d128, batch 64, 1000 steps: untested, no GPU was lent to this
task).
"""
import argparse
import math
import os
import re

import flax.linen as nn
import jax
import numpy as np

from bitnet_vs_fp import SIZES
from llm_research.config import base_config
from llm_research.data.tokenizers import ByteTokenizer
from llm_research.metrics import read_metrics
from llm_research.training import Trainer, trainable_mask
from report import header, write
from runs import (STDLIB_SHUFFLE_TOKENS, Runner, beyond_spread, deadline_timestamp, describe,
                  final_loss, mean_sd, tail_drop)

FULL, LORA, LTE = METHODS = ("full rank", "LoRA alone", "LTE")
SLUGS = {FULL: "full", LORA: "lora", LTE: "lte"}
PRESETS = {"cpu": dict(model="d64", steps=300, batch_size=16),
           "gpu": dict(model="d128", steps=1000, batch_size=64)}
SEQ_LEN = 128
EVALS = 10  # validation points per `--steps` (the longer runs evaluate on the same grid)
TAIL = 0.2  # tail_drop: the drop over the last TAIL of the steps
NEAR_CONVERGED = 0.01  # nats/byte over the tail: near convergence
ENDS_HIGH = 0.05  # nats/byte: a run whose final loss is this far above its minimum ends in a rise
COMMUNICATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             "lte_communication_cpu.md")


def width(args) -> int:
  return SIZES[args.model]["embed_dim"]


def rank(args) -> int:
  return width(args) // args.heads


def run_config(args, method: str, steps: int, learning_rate: float, merge: int, seed: int):
  config = base_config()
  config.model.update(**SIZES[args.model])
  config.data.update(source="stdlib", stdlib_config=args.corpus, tokenizer="byte",
                     seq_len=SEQ_LEN, shuffle_seed=seed, shuffle_tokens=STDLIB_SHUFFLE_TOKENS)
  config.train.update(steps=steps, batch_size=args.batch_size, learning_rate=learning_rate,
                      warmup_steps=max(args.steps // 10, 1), seed=seed,
                      eval_every=max(args.steps // EVALS, 1), eval_batches=16,
                      log_every=max(args.steps // EVALS, 1), checkpoint_every=steps,
                      keep_checkpoints=1, progress_bar=False)
  if method != FULL:
    config.train.method = "lte"
    config.lte.update(heads=1 if method == LORA else args.heads, rank=rank(args),
                      merge_every=merge)
  return config


def get(args, runner: Runner, method: str, steps: int, learning_rate: float, seed: int,
        merge: int | None = None) -> dict | None:
  """The run's result (trained now, read back, or None past the deadline). LoRA alone and LTE
  run at `--merge` unless `merge` says otherwise; full rank has no merge interval."""
  merge = None if method == FULL else (merge or args.merge)
  key = (method, steps, learning_rate, merge, seed)
  cost = steps * (1 if method == FULL else 2)  # an adapter step costs about two full-rank ones
  return runner.get(key, lambda: run_config(args, *key), run_dir(args, key), cost)


def run_dir(args, key: tuple) -> str:
  method, steps, learning_rate, merge, seed = key
  return os.path.join(args.workdir, f"{SLUGS[method]}_steps{steps}_lr{learning_rate:g}"
                      + (f"_t{merge}" if method == LTE else "") + f"_seed{seed}")


def chosen_rates(args, runner: Runner) -> dict:
  """{method: the sweep's learning rate with the lowest final validation loss}."""
  rates = {}
  for method in METHODS:
    losses = {lr: get(args, runner, method, args.steps, lr, args.seeds[0])
              for lr in args.learning_rates}
    losses = {lr: final_loss(r) for lr, r in losses.items() if r is not None}
    if losses:
      rates[method] = min(losses, key=losses.get)
  return rates


def train_all(args, runner: Runner, rates: dict) -> None:
  """The runs after the sweep, most needed first (what a deadline leaves out comes last)."""
  lengths = [args.steps * f for f in args.factors]
  merge_steps = args.steps * args.merge_factor
  intervals = [t for t in args.merge_every if t != args.merge]
  plan = [(m, n, args.seeds[0], None) for n in lengths for m in METHODS]
  plan += [(m, lengths[-1], s, None) for s in args.seeds[1:] for m in METHODS]
  plan += [(LTE, merge_steps, args.seeds[0], t) for t in [args.merge, *intervals]]
  plan += [(m, n, s, None) for s in args.seeds[1:] for n in lengths[:-1] for m in METHODS]
  plan += [(LTE, merge_steps, s, t) for s in args.seeds[1:] for t in [args.merge, *intervals]]
  for method, steps, seed, merge in plan:
    if method in rates:
      get(args, runner, method, steps, rates[method], seed, merge)


def results(args, runner: Runner, rates: dict, method: str, steps: int,
            merge: int | None = None) -> dict:
  """{seed: result} of the finished runs of one arm (method, steps, merge) at its rate."""
  if method not in rates:
    return {}
  merge = None if method == FULL else (merge or args.merge)
  found = {s: runner.runs.get((method, steps, rates[method], merge, s)) for s in args.seeds}
  return {s: r for s, r in found.items() if r}


def paired(a: dict, b: dict) -> dict:
  """{seed: final loss of a minus b} over the seeds both have."""
  return {s: final_loss(a[s]) - final_loss(b[s]) for s in a if s in b}


def change(before: dict, after: dict) -> dict:
  """{seed: before - after} of two paired gaps, over the seeds both have."""
  return {s: before[s] - after[s] for s in before if s in after}


def described_gap(gaps: dict) -> str:
  if not gaps:
    return "-"
  mean, sd = mean_sd(gaps.values())
  se = "" if math.isnan(sd) else f" (se {sd / math.sqrt(len(gaps)):.3f}, {len(gaps)} seeds)"
  return f"{mean:+.3f}{se}"


def seed_mean(runs: dict) -> float:
  return float(np.mean([final_loss(r) for r in runs.values()]))


def mean_curve(runs: dict) -> tuple:
  """(steps, mean, sd) of the validation curves over seeds (sd 0 for one seed)."""
  curves = np.array([r["curve"] for r in runs.values()])  # [seeds, evals, (step, loss)]
  sd = curves[:, :, 1].std(axis=0, ddof=1) if len(curves) > 1 else 0 * curves[0, :, 1]
  return curves[0, :, 0], curves[:, :, 1].mean(axis=0), sd


def steps_to_reach(points, target: float) -> float | None:
  """The first step at which a falling loss reaches `target`, interpolated in log steps
  between (step, loss) `points`; the first step if it is already there; None if never."""
  points = sorted(points)
  if points[0][1] <= target:
    return points[0][0]
  for (a, loss_a), (b, loss_b) in zip(points, points[1:]):
    if loss_b <= target:
      frac = (loss_a - target) / (loss_a - loss_b)
      return math.exp(math.log(a) + frac * (math.log(b) - math.log(a)))
  return None


def seconds_per_step(args, runner: Runner, rates: dict, method: str) -> float:
  """Mean logged step time of the method's runs at `--steps` (the sweep's included)."""
  times = [r["step_time_s"] for key in runner.runs if key[:2] == (method, args.steps)
           for r in read_metrics(run_dir(args, key)) if "step_time_s" in r]
  return float(np.mean(times)) if times else math.nan


def trained_params(args, method: str) -> int:
  """What the optimizer updates (every head's adapters and replicas for LoRA and LTE), from the
  shapes alone."""
  config = run_config(args, method, args.steps, 1e-3, args.merge, 0)
  trainer = Trainer(config, ByteTokenizer())
  trained = nn.meta.unbox(trainer.method.trained(trainer.abstract_state().params))
  mask = trainable_mask(trained, config.train.trainable)
  return sum(math.prod(x.shape) for x, m in zip(jax.tree.leaves(trained), jax.tree.leaves(mask))
             if m)


def communication_ratios() -> dict[int, float]:
  """T -> LTE's bytes a step over data parallelism's, from the benchmark's committed table."""
  with open(COMMUNICATION) as f:
    rows = re.findall(r"^\| LTE \| (\d+) \| [\d,]+ \| ([\d.]+) \|$", f.read(), re.MULTILINE)
  return {int(t): float(ratio) for t, ratio in rows}


def described_reach(step: float | None, reference: int, first: int, last: int) -> str:
  """Steps to reach a loss that full rank reached in `reference` steps, over points from
  `first` to `last` steps."""
  if step is None:
    return f"not reached by {last}"
  return ("<= " if step == first else "") + f"{step:.0f} ({step / reference:.2g}x)"


def analyse(args, runner: Runner, rates: dict) -> dict:
  """Everything the tables, the reading and the figure show."""
  lengths = [args.steps * f for f in args.factors]
  arms = {(m, n): results(args, runner, rates, m, n) for m in METHODS for n in lengths}
  finals = {m: [(n, seed_mean(arms[m, n])) for n in lengths if arms[m, n]] for m in METHODS}
  longest = {m: max((n for n in lengths if arms[m, n]), default=None) for m in METHODS}
  reach = {}  # (method, full rank's length) -> the step count and the points' first and last
  for m in (LORA, LTE):
    for n in lengths:
      if arms[FULL, n] and finals[m]:
        target = seed_mean(arms[FULL, n])
        steps, mean, _ = mean_curve(arms[m, longest[m]])
        reach[m, n] = {
            "own": (steps_to_reach(finals[m], target), finals[m][0][0], finals[m][-1][0]),
            "within": (steps_to_reach(list(zip(steps, mean)), target), int(steps[0]),
                       int(steps[-1]))}
  merge_steps = args.steps * args.merge_factor
  merges = {t: results(args, runner, rates, LTE, merge_steps, t) for t in args.merge_every}
  return dict(lengths=lengths, arms=arms, finals=finals, longest=longest, reach=reach,
              merges=merges, merge_steps=merge_steps, rates=rates)


def reading(args, a: dict) -> list[str]:
  """Each claim's verdict from the numbers (paired gaps against twice their standard error)."""
  arms, lengths = a["arms"], a["lengths"]
  short, long_ = lengths[0], lengths[-1]
  if not all(arms[m, short] and arms[m, long_] for m in METHODS):
    return ["**Reading: cannot say.** Some method lacks a finished run at the shortest or the "
            "longest schedule (see the missing runs)."]
  gap = lambda m, o, n: paired(arms[m, n], arms[o, n])
  lines = []
  # (2) LTE beats LoRA alone of the same rank; LoRA plateaus.
  lora_lte = gap(LORA, LTE, long_)
  verdict = ("reproduced" if beyond_spread(lora_lte.values()) else "not reproduced"
             if beyond_spread(-g for g in lora_lte.values())
             else "not shown beyond the seed spread")
  lines.append(f"**LTE beats LoRA alone of the same rank ({verdict}).** At {long_} steps LoRA "
               f"alone minus LTE is {described_gap(lora_lte)} nats/byte; at {short} steps "
               f"{described_gap(gap(LORA, LTE, short))}.")
  gains = {m: mean_sd(paired(arms[m, lengths[-2]], arms[m, long_]).values()) for m in METHODS}
  drops = {m: tail_drop([r["curve"] for r in arms[m, long_].values()], TAIL) for m in METHODS}
  lora_behind = change(gap(LORA, FULL, long_), gap(LORA, FULL, short))
  lines.append(
      f"Does LoRA alone plateau? From {lengths[-2]} to {long_} steps (own schedules) the final "
      "loss fell by " + ", ".join(f"{describe(gains[m])} ({m})" for m in METHODS)
      + f"; over the last {100 * TAIL:.0f}% of the {long_}-step runs the validation loss fell "
      + ", ".join(f"{drops[m]:.3f} ({m})" for m in METHODS)
      + f". Its gap to full rank went from {described_gap(gap(LORA, FULL, short))} at {short} "
      f"steps to {described_gap(gap(LORA, FULL, long_))} at {long_}: "
      + ("it falls behind full rank as training goes on (beyond the seed spread), a plateau "
         "relative to full rank" if beyond_spread(lora_behind.values()) else
         "it does not fall further behind full rank beyond the seed spread, so no plateau "
         "shows at this length")
      + (f"; it is still falling by more than {NEAR_CONVERGED} nats/byte over the tail"
         if drops[LORA] > NEAR_CONVERGED else "") + ".")
  # (1) LTE approaches full rank given more steps.
  lte_full = {n: gap(LTE, FULL, n) for n in lengths}
  closing = change(lte_full[short], lte_full[long_])
  reach_short = a["reach"].get((LTE, short), {"own": (None, short, long_)})["own"]
  lines.append(
      "**LTE reaches full rank's loss given more steps ("
      + ("reproduced" if reach_short[0] is not None and beyond_spread(closing.values()) else
         "partly: it reaches full rank's shortest-schedule loss, but its gap at equal steps does "
         "not close beyond the seed spread" if reach_short[0] is not None else "not reproduced")
      + ").** LTE minus full rank at equal steps: "
      + ", ".join(f"{described_gap(lte_full[n])} at {n}" for n in lengths)
      + f" (closing by {described_gap(closing)} from {short} to {long_}). LTE's own schedule "
      f"needs {described_reach(reach_short[0], short, *reach_short[1:])} steps to reach full "
      f"rank's loss at "
      f"{short} steps" + (f" (full rank's {long_}-step runs still fell by {drops[FULL]:.3f} "
                         "nats/byte over their tail: the target keeps moving)"
                         if drops[FULL] > NEAR_CONVERGED else "") + ".")
  # (3) The merge interval.
  merges = a["merges"]
  if all(merges.get(t) for t in (min(args.merge_every), max(args.merge_every))):
    shortest, longest = min(args.merge_every), max(args.merge_every)
    cost = paired(merges[longest], merges[shortest])
    lines.append(
        "**Longer merge intervals cost quality ("
        + ("reproduced" if beyond_spread(cost.values()) else "not shown beyond the seed spread")
        + f").** At {a['merge_steps']} steps: "
        + ", ".join(f"T={t} {describe(mean_sd(final_loss(r) for r in merges[t].values()))}"
                    for t in args.merge_every if merges.get(t))
        + f"; T={longest} minus T={shortest}: {described_gap(cost)} nats/byte.")
  lines += data_order(a)
  edge = [m for m, lr in a["rates"].items()
          if lr in (min(args.learning_rates), max(args.learning_rates))]
  if edge:
    lines.append("The chosen learning rate is at the sweep's edge for " + ", ".join(edge)
                 + ": a wider sweep might lower those losses.")
  lines.append(f"Scale: a {SIZES[args.model]['num_layers']}-layer width-{width(args)} model "
               f"({args.heads} heads x rank {rank(args)}), at most "
               f"{long_ * args.batch_size * SEQ_LEN / 1e6:.1f}M bytes a run; the paper trains "
               "ViTs and 100M+ parameter language models for far longer.")
  return [f"- {line}" for line in lines]


def rise(result: dict) -> float:
  """The largest rise of a run's validation loss above its running minimum."""
  losses = np.array(result["curve"])[:, 1]
  return float(np.max(losses - np.minimum.accumulate(losses)))


def data_order(a: dict) -> list[str]:
  """A caveat where a method's mean final loss is not monotone in the schedule length: how far
  the validation loss rose within the seeds' runs (the same batches at the same steps for every
  method and length of a seed)."""
  arms, lengths = a["arms"], a["lengths"]
  rising = [f"{m} from {n} to {k} steps" for m in METHODS for n, k in zip(lengths, lengths[1:])
            if arms[m, n] and arms[m, k] and seed_mean(arms[m, k]) > seed_mean(arms[m, n])]
  if not rising:
    return []
  seeds = sorted({s for runs in arms.values() for s in runs})
  worst = max(seeds, key=lambda s: max(rise(r[s]) for r in arms.values() if s in r))
  return [
      "The mean final loss rises with the schedule length for " + ", ".join(rising) + ". Within "
      "the runs the validation loss rose above its running minimum by up to "
      + ", ".join(f"{max(rise(r[s]) for r in arms.values() if s in r):.3f} (seed {s})"
                  for s in seeds)
      + f"; in seed {worst}'s longest runs by " + ", ".join(
          f"{rise(arms[m, a['longest'][m]][worst]):.3f} ({m})" for m in METHODS
          if worst in arms[m, a["longest"][m]])
      + ": a stretch of that seed's data order, which every method and length of the seed "
      "sees at the same steps, raises them all, by different amounts. Runs that end more than "
      f"{ENDS_HIGH} above their own minimum: " + (", ".join(
          f"seed {s} at {n} steps" for s, n in sorted(
              {(s, n) for (_, n), runs in arms.items() for s, r in runs.items()
               if final_loss(r) - min(loss for _, loss in r["curve"]) > ENDS_HIGH}))
          or "none")
      + ". Their gaps, the means across lengths, the gains between lengths and the steps to "
      "reach full rank's loss (interpolated between seed means) carry the rise."]


def write_results(args, runner: Runner, rates: dict, a: dict, command: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  arms, lengths = a["arms"], a["lengths"]
  params = {m: trained_params(args, m) for m in METHODS}
  step_s = {m: seconds_per_step(args, runner, rates, m) for m in METHODS}
  model = SIZES[args.model]
  lines = [
      *header("LTE on a small transformer: full rank, LoRA alone and LTE at 1x, 2x and 4x the "
              "steps", command, runner.seconds, took=" of training, summed over runs"), "",
      f"Model {args.model}: {model['num_layers']} layers, width {width(args)}, byte tokenizer, "
      f"stdlib `{args.corpus}` corpus, rows of {SEQ_LEN}, batch {args.batch_size}, the same "
      "batches for every method of a seed; AdamW, cosine to 0.1x, warmup "
      f"{max(args.steps // 10, 1)} steps, each step count its own schedule. LoRA alone: one "
      f"LTE head of rank {rank(args)} on the whole batch (exactly LoRA on the frozen random "
      f"kernels). LTE: {args.heads} heads x rank {rank(args)} = the width, T = {args.merge}, "
      "1/N of the batch each. Both: alpha 4096, adapters at lr / s, replicas of the embedding "
      "and norms at lr. Validation: 16 batches, the merged model. Mean +- sd over seeds; gaps "
      "are paired per seed, with their standard error.", "",
      f"Learning-rate sweep ({args.steps} steps, seed {args.seeds[0]}, final validation loss):",
      "", "| method | " + " | ".join(f"lr {lr:g}" for lr in args.learning_rates)
      + " | chosen |", "|---|" + "---|" * (len(args.learning_rates) + 1)]
  for m in METHODS:
    cells = [runner.runs.get((m, args.steps, lr, None if m == FULL else args.merge,
                              args.seeds[0])) for lr in args.learning_rates]
    lines.append(f"| {m} | " + " | ".join(f"{final_loss(c):.4f}" if c else "-" for c in cells)
                 + f" | {rates.get(m, '-')} |")
  lines += ["", f"Final validation loss (nats/byte); tail drop: over the last {100 * TAIL:.0f}% "
            f"of the steps (near convergence: under {NEAR_CONVERGED}):", "",
            "| method | params trained | s a step | steps | bytes | val loss | vs full rank | "
            "tail drop | seeds |", "|---|---|---|---|---|---|---|---|---|"]
  for m in METHODS:
    for n in lengths:
      runs = arms[m, n]
      if runs:
        loss = describe(mean_sd(final_loss(r) for r in runs.values()))
        vs = described_gap(paired(runs, arms[FULL, n])) if m != FULL else "-"
        drop = tail_drop([r["curve"] for r in runs.values()], TAIL)
        lines.append(f"| {m} | {params[m]:,} | {step_s[m]:.3f} | {n} | "
                     f"{n * args.batch_size * SEQ_LEN / 1e6:.2f}M | {loss} | {vs} | {drop:.3f} "
                     f"| {len(runs)} |")
  lines += ["", "Steps needed to reach full rank's final loss (seed means, interpolated in log "
            "steps): over the method's own schedules (final losses at "
            f"{', '.join(map(str, lengths))} steps), and within its longest run's validation "
            "curve (mid-schedule, at a higher learning rate than its end):", "",
            "| method | full rank's steps | full rank's loss | own schedules | within its "
            "longest run |", "|---|---|---|---|---|"]
  for (m, n), reach in a["reach"].items():
    lines.append(f"| {m} | {n} | {seed_mean(arms[FULL, n]):.3f} | "
                 f"{described_reach(reach['own'][0], n, *reach['own'][1:])} | "
                 f"{described_reach(reach['within'][0], n, *reach['within'][1:])} |")
  ratios = communication_ratios()
  ratio = lambda t: f"{ratios[t]:.3f}" if t in ratios else f"~{ratios[1] / t:.3f}"
  lines += ["", f"Merge interval (LTE, {a['merge_steps']} steps):", "",
            "| T | val loss | vs T=" + str(args.merge) + " | bytes a step / data parallel |",
            "|---|---|---|---|"]
  for t, runs in a["merges"].items():
    if runs:
      lines.append(f"| {t} | {describe(mean_sd(final_loss(r) for r in runs.values()))} | "
                   f"{described_gap(paired(runs, a['merges'][args.merge]))} | {ratio(t)} |")
  lines += ["", "Bytes a step / data parallel: cited from "
            "[lte_communication_cpu.md](lte_communication_cpu.md) (the quickstart model, 8 "
            "fake devices, one head each; ~ means 0.79 / T, its formula between the listed T), "
            "not measured here: these runs hold every head on one device.", "",
            "**Reading** (a claim is reproduced when its paired gap exceeds twice its standard "
            "error over seeds):", "", *reading(args, a)]
  if runner.missing:
    lines += ["", f"Missing ({len(runner.missing)} runs not started: they would have ended past "
              "the deadline): " + "; ".join(
                  f"{m} {n} steps lr {lr:g}" + (f" T={t}" if m == LTE else "") + f" seed {s}"
                  for m, n, lr, t, s in runner.missing) + "."]
  write(args.out + ".md", lines)

  colors = dict(zip(METHODS, ("black", "tab:orange", "tab:blue")))
  fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
  for m in METHODS:
    for n in lengths:
      if arms[m, n]:
        steps, mean, sd = mean_curve(arms[m, n])
        longest = n == a["longest"][m]
        axes[0].plot(steps, mean, color=colors[m], lw=1.6 if longest else 0.8,
                     alpha=1 if longest else 0.5, label=f"{m} ({n} steps)")
        axes[0].fill_between(steps, mean - sd, mean + sd, color=colors[m], alpha=0.2)
    if a["finals"][m]:
      n_sd = [(n, *mean_sd(final_loss(r) for r in arms[m, n].values())) for n in lengths
              if arms[m, n]]
      x, mean, sd = np.array(n_sd).T
      axes[1].errorbar(x, mean, yerr=np.nan_to_num(sd), marker="o", capsize=4,
                       color=colors[m], label=m)
  for (m, n), reach in a["reach"].items():
    own = reach["own"][0]
    if m == LTE and n == lengths[0]:
      axes[1].axhline(seed_mean(arms[FULL, n]), color="grey", ls=":", lw=0.8,
                      label=f"full rank at {n} steps")
      if own is not None:
        axes[1].axvline(own, color=colors[LTE], ls=":", lw=0.8,
                        label=f"LTE reaches it: {own:.0f} steps")
  for m in (LORA, LTE):
    gaps = [(n, *mean_sd(paired(arms[m, n], arms[FULL, n]).values())) for n in lengths
            if arms[m, n] and arms[FULL, n]]
    if gaps:
      x, mean, sd = np.array(gaps).T
      axes[2].errorbar(x, mean, yerr=np.nan_to_num(sd), marker="o", capsize=4, color=colors[m],
                       label=f"{m} - full rank")
  axes[2].axhline(0, color="black", lw=0.8)
  for t, runs in a["merges"].items():
    if runs:
      steps, mean, sd = mean_curve(runs)
      axes[3].plot(steps, mean, label=f"T={t}")
      axes[3].fill_between(steps, mean - sd, mean + sd, alpha=0.2)
  axes[0].set(xscale="log", xlabel="step (log)", ylabel="validation loss (nats/byte)",
              title="validation curves (seed mean +- sd; each length its own schedule)")
  axes[1].set(xscale="log", xlabel="steps of the schedule (log)", ylabel="final validation loss",
              title="final loss against schedule length (mean +- sd)")
  axes[2].set(xscale="log", xlabel="steps of the schedule (log)",
              ylabel="final loss minus full rank's", title="gap to full rank at equal steps "
              "(paired per seed, mean +- sd)")
  axes[3].set(xscale="log", xlabel="step (log)", ylabel="validation loss (nats/byte)",
              title=f"LTE merge interval ({a['merge_steps']} steps, mean +- sd)")
  # The curves from their second evaluation (the first is far above the rest).
  top = max(mean_curve(r)[1][1] for r in [*arms.values(), *a["merges"].values()] if r) + 0.05
  first = max(args.steps // EVALS, 1)
  for ax, ticks in zip(axes, ([first, *lengths], lengths, lengths, [first, a["merge_steps"]])):
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in (axes[0], axes[3]):
    ax.set_ylim(top=top)
  fig.suptitle(f"LTE vs full rank and LoRA alone, width {width(args)}, stdlib corpus",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--gpu", action="store_true", help="the lent-GPU preset (PRESETS)")
  parser.add_argument("--model", help=f"of {list(SIZES)}")
  parser.add_argument("--steps", type=int, help="the shortest schedule and the sweep's")
  parser.add_argument("--factors", default="1,2,4", help="schedule lengths, x --steps")
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--heads", type=int, default=4, help="LTE heads N (rank: width / N)")
  parser.add_argument("--merge", type=int, default=10, help="LTE's merge interval T")
  parser.add_argument("--merge_every", default="1,10,50", help="T of the interval arms")
  parser.add_argument("--merge_factor", type=int, default=1,
                      help="the interval arms' length, x --steps")
  parser.add_argument("--learning_rates", default="3e-3,1e-2,3e-2")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--corpus", default="full", choices=["full", "tiny"])
  parser.add_argument("--deadline", help="HH:MM UTC: start no run that would end after it")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "lte_lm"))
  args = parser.parse_args()
  for key, value in PRESETS["gpu" if args.gpu else "cpu"].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  command = (f"python experiments/lte_lm.py --workdir {args.workdir} --model {args.model} "
             f"--steps {args.steps} --factors {args.factors} --batch_size {args.batch_size} "
             f"--heads {args.heads} --merge {args.merge} --merge_every {args.merge_every} "
             f"--merge_factor {args.merge_factor} --learning_rates {args.learning_rates} "
             f"--seeds {args.seeds} --corpus {args.corpus}"
             + (f" --deadline {args.deadline}" if args.deadline else ""))
  args.factors = [int(f) for f in args.factors.split(",")]
  if len(args.factors) < 2:
    parser.error("--factors needs two lengths or more")
  args.merge_every = [int(t) for t in args.merge_every.split(",")]
  args.learning_rates = [float(lr) for lr in args.learning_rates.split(",")]
  args.seeds = [int(s) for s in args.seeds.split(",")]
  # A method's runs compile the same programs: the persistent cache compiles them once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  runner = Runner(deadline_timestamp(args.deadline))
  rates = chosen_rates(args, runner)
  train_all(args, runner, rates)
  write_results(args, runner, rates, analyse(args, runner, rates), command)


if __name__ == "__main__":
  main()

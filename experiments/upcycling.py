"""Sparse upcycling (Komatsuzaki et al. 2023) as a fair test: from a dense checkpoint that has
nearly stopped improving, does an upcycled MoE beat the dense model trained on, at equal extra
compute and equal active FLOPs per token?

    python experiments/upcycling.py --workdir /tmp/upcycling [--gpu] [--extra 0.2]
        [--seeds 0,1,2] [--deadline HH:MM] [--out experiments/results/upcycling]

The saturated base (shared with experiments/depth_upscaling.py through the same --workdir): a
small dense LLaMA-style model (byte tokenizer, stdlib corpus) pre-trained at a constant learning
rate after its warmup (an unannealed checkpoint, as the paper continues from), in chunks of
`CHUNK` steps, until its validation loss fell by under `--saturation` nats/byte over the last
`WINDOW` steps (or `--max_pretrain_steps`): the criterion and the slope it stopped at are in
the results.

The extra budget is `--extra` times the pre-training's FLOPs (`flops_per_token` of the model
config: 6 x the active matmul params + attention). Arms, each spending it at the same batch size:

  dense continued     the checkpoint trained on                                  (seeds)
  upcycled            its MLPs copied into `NUM_EXPERTS` experts in every other  (seeds)
                      layer, top-1 routed, fresh routers (methods/upcycle.py)
  MoE from scratch    the same MoE from a random init                            (first seed)

Top-1 activates one expert per token, so the MoE's FLOPs per token equal dense's plus the
router's (the MoE arms take the steps that match the dense arm's FLOPs). Its combine weight is
`moe.top1_weight="straight_through"`: 1 in value (the upcycled model computes the dense function
at step 0, as the paper's top-2 renormalised routing does) and the router's probability's
gradient (with Switch Transformer's weight p the upcycled model would start with every MLP
scaled by ~1/8; renormalised, p / p = 1, the router would learn nothing). Dropless, so no token
is dropped. Each extra run warms up (`CONTINUE_WARMUP` steps when continuing with a fresh
optimizer, the pre-training's warmup from scratch) and decays (cosine) to `EXTRA_FINAL_LR` of
the rate over its budget; it reads the corpus in another order than pre-training did
(data.shuffle_seed = 1 + seed; the seed also draws the routers). Arms of one seed see the same
batches, so their gap is paired per seed. Every run evaluates `EVALS` times at equal fractions of
its budget on the same `EVAL_BATCHES` validation batches.

Writes `<out>.md` (table; the reading, from the numbers: "reproduced" only if upcycled - dense
continued is negative by more than twice its standard error over seeds at the end of the
budget), `<out>.png` (validation loss against extra compute, seed bands; the paired gap with
its band) and `<out>_expert_load.png` (the MoE arms' load per expert against step). Finished runs
are kept in the workdir and read back by a re-run; `--deadline` starts no run that would end
after it, seed by seed.

Rows are shuffled in windows of runs.STDLIB_SHUFFLE_TOKENS, so that the stream's mix of files
does not drift. Budget: the CPU preset (a 0.2M-param model, rows of 64 bytes, batch 32) takes
about 25 minutes of 2 idle cores (pre-training about 7 of them; XLA:CPU computes the dropless path's
ragged_dot as a dense matmul over every expert, so an MoE step costs ~3x a dense one there; on a
GPU it does not). `--gpu` pre-trains a 6M-param model (rows of 256, batch 64) to saturation and
spends the same budget fraction: minutes on an H100.
"""
import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from llm_research import data, init_from
from llm_research.config import base_config
from llm_research.data.tokenizers import ByteTokenizer
from llm_research.metrics import read_metrics
from llm_research.training import (Trainer, model_config_from, params_from_source,
                                   train_and_evaluate)
from report import header, write
from runs import (STDLIB_SHUFFLE_TOKENS, Runner, beyond_spread, deadline_timestamp, describe,
                  mean_sd)

PRESETS = {
    "cpu": dict(model=dict(num_layers=4, embed_dim=64, num_heads=4, num_kv_heads=2,
                           head_dim=16, mlp_dim=176),
                seq_len=64, batch_size=32, max_pretrain_steps=4000),
    "gpu": dict(model=dict(num_layers=8, embed_dim=256, num_heads=8, num_kv_heads=4,
                           head_dim=32, mlp_dim=704),
                seq_len=256, batch_size=64, max_pretrain_steps=20000),
}
LEARNING_RATE = 3e-3
PRETRAIN_WARMUP = 100
CHUNK = 500  # pre-training steps between saturation checks
WINDOW = 1000  # the saturation check's window: the validation loss's drop over these steps
MIN_PRETRAIN_STEPS = 2 * WINDOW
EVAL_EVERY = 250  # pre-training's evaluations
EVAL_BATCHES = 32
EVALS = 8  # evaluations per extra run
CONTINUE_WARMUP = 10  # steps: a fresh optimizer's moments settle before the full rate
EXTRA_FINAL_LR = 0.1  # the extra runs' cosine decay ends at this fraction of the rate
NUM_EXPERTS = 8
MOE = dict(mlp_impl="moe", moe=dict(num_experts=NUM_EXPERTS, experts_per_token=1, every=2,
                                    top1_weight="straight_through"))


def add_common_flags(parser: argparse.ArgumentParser, out: str) -> None:
  """The flags this experiment shares with experiments/depth_upscaling.py."""
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--gpu", action="store_true", help="the lent-GPU preset (PRESETS)")
  parser.add_argument("--extra", type=float, default=0.2,
                      help="extra budget, as a fraction of the dense pre-training's FLOPs")
  parser.add_argument("--saturation", type=float, default=0.02,
                      help=f"pre-train until the validation loss fell by less over {WINDOW} steps")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--corpus", default="full", choices=["full", "tiny"])
  parser.add_argument("--deadline", help="HH:MM UTC: start no run that would end after it")
  parser.add_argument("--out", default=out)


def parse(parser: argparse.ArgumentParser):
  args = parser.parse_args()
  args.preset = PRESETS["gpu" if args.gpu else "cpu"]
  args.seeds = [int(seed) for seed in args.seeds.split(",")]
  # The arms compile the same programs seed after seed: the persistent cache compiles them once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  return args


def common_command(args) -> str:
  return (("--gpu " if args.gpu else "") + f"--extra {args.extra} --saturation {args.saturation}"
          f" --seeds {','.join(map(str, args.seeds))} --corpus {args.corpus}"
          + (f" --deadline {args.deadline}" if args.deadline else ""))


def dense_config(args, steps: int):
  """The dense pre-training run: constant learning rate after its warmup."""
  config = base_config()
  config.model.update(**args.preset["model"])
  config.data.update(source="stdlib", stdlib_config=args.corpus, tokenizer="byte",
                     seq_len=args.preset["seq_len"], shuffle_tokens=STDLIB_SHUFFLE_TOKENS)
  config.train.update(steps=steps, batch_size=args.preset["batch_size"],
                      learning_rate=LEARNING_RATE, warmup_steps=PRETRAIN_WARMUP,
                      final_lr_fraction=1.0, eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES,
                      log_every=EVAL_EVERY, checkpoint_every=CHUNK, keep_checkpoints=1,
                      progress_bar=False)
  return config


def window_drop(curve: list) -> float:
  """The validation loss's drop over the last WINDOW steps of a [step, loss] curve."""
  steps, losses = np.array(curve).T
  return float(np.interp(steps[-1] - WINDOW, steps, losses) - losses[-1])


def pretrain(args) -> dict:
  """The saturated base (trained now or read back): its workdir, steps, validation curve, the
  drop over its last WINDOW steps and the seconds it took. Training resumes chunk by chunk (a
  constant rate: extending the run changes no step already taken)."""
  workdir = os.path.join(args.workdir, "dense")
  marker = os.path.join(workdir, "saturated.json")
  if os.path.isfile(marker):
    with open(marker) as f:
      return json.load(f)
  start, steps = time.perf_counter(), MIN_PRETRAIN_STEPS
  while True:
    train_and_evaluate(dense_config(args, steps), workdir)
    curve = [[r["step"], r["eval_loss"]] for r in read_metrics(workdir) if "eval_loss" in r]
    drop = window_drop(curve)
    print(f"pre-training: step {steps}, val loss {curve[-1][1]:.4f}, drop over the last "
          f"{WINDOW} steps {drop:.4f}", flush=True)
    if drop < args.saturation or steps >= args.preset["max_pretrain_steps"]:
      break
    steps += CHUNK
  base = dict(workdir=workdir, steps=steps, curve=curve, drop=drop,
              saturated=drop < args.saturation, seconds=time.perf_counter() - start)
  with open(marker, "w") as f:
    json.dump(base, f)
  return base


def extra_run(base_config_, steps: int, seed: int, *, init_from_workdir: str = "", **model):
  """`base_config_` with `model` changes, trained `steps` steps on the extra data (order
  1 + seed) with the rate decaying to EXTRA_FINAL_LR, evaluated EVALS times; from
  `init_from_workdir`'s params (fresh optimizer, short warmup) if given, else from scratch."""
  config = base_config_.copy_and_resolve_references()
  config.model.update(**model)
  config.data.shuffle_seed = 1 + seed
  every = max(steps // EVALS, 1)
  config.train.update(steps=steps, seed=seed, final_lr_fraction=EXTRA_FINAL_LR, eval_every=every,
                      log_every=every, checkpoint_every=every * 2, init_from=init_from_workdir,
                      warmup_steps=CONTINUE_WARMUP if init_from_workdir else PRETRAIN_WARMUP)
  return config


def flops_per_step(config) -> float:
  """Training FLOPs of one step: the registered model's `flops_per_token` x the batch's tokens."""
  model = model_config_from(config, ByteTokenizer.vocab_size)
  return model.flops_per_token(config.data.seq_len) * config.train.batch_size * config.data.seq_len


def equal_compute_steps(dense_steps: int, dense, other) -> int:
  """Steps of `other` with the FLOPs of `dense_steps` steps of `dense` (rounded to a multiple of
  EVALS, so that its evaluations fall at the same fractions of the budget)."""
  per_eval = dense_steps / EVALS * flops_per_step(dense) / flops_per_step(other)
  return EVALS * max(round(per_eval), 1)


def start_loss(config, workdir: str) -> float:
  """Validation loss of the params a run of `config` starts from, before its first step (with
  `train.init_from`, the source's params through the surgery; else the random init), kept in
  `workdir`."""
  path = os.path.join(workdir, "start_loss.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  trainer = Trainer(config, data.get_tokenizer(config.data))
  if config.train.init_from:
    params = params_from_source(init_from.check(config), trainer, seed=config.train.seed)
  else:
    params = trainer.init_state().params
  loss = float(trainer.evaluate(params, config.train.eval_batches)["eval_loss"])
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(loss, f)
  return loss


class Arms:
  """The extra runs of one experiment: `add` names an arm (a function seed -> config, and the
  seeds it runs), `train` runs them seed by seed (so that a deadline leaves whole seeds of the
  main arms), `curves` reads each finished run's validation curve with its start as step 0."""

  def __init__(self, args, runner: Runner):
    self.args, self.runner, self.arms = args, runner, {}

  def add(self, name: str, subdir: str, make_config, seeds: list[int]) -> None:
    self.arms[name] = (subdir, make_config, seeds)

  def workdir(self, name: str, seed: int) -> str:
    return os.path.join(self.args.workdir, f"{self.arms[name][0]}_seed{seed}")

  def train(self) -> None:
    """Seed by seed the arms with seeds, then those with one."""
    order = [(name, seed) for seed in self.args.seeds for name, (_, _, seeds) in self.arms.items()
             if seed in seeds and len(seeds) > 1]
    order += [(name, seeds[0]) for name, (_, _, seeds) in self.arms.items() if len(seeds) == 1]
    for name, seed in order:
      config = self.arms[name][1](seed)
      self.runner.get((name, seed), config, self.workdir(name, seed),
                      cost=flops_per_step(config) * config.train.steps)

  def curves(self, name: str) -> dict[int, list]:
    """{seed: [[step, val loss], ...]} of the arm's finished runs, from step 0."""
    _, make_config, seeds = self.arms[name]
    found = {}
    for seed in seeds:
      result = self.runner.runs.get((name, seed))
      if result:
        start = start_loss(make_config(seed), self.workdir(name, seed))
        found[seed] = [[0, start]] + result["curve"]
    return found


def paired_gap(a: dict[int, list], b: dict[int, list]) -> list[float]:
  """Final loss of a - of b, per seed both finished."""
  return [a[seed][-1][1] - b[seed][-1][1] for seed in a if seed in b]


def gap_reading(gap: list[float], what: str) -> tuple[bool, str]:
  """(whether `gap` (a - b per seed) is negative by more than twice its standard error, the
  sentence that says so)."""
  mean, sd = mean_sd(gap)
  if len(gap) < 2:
    return False, f"{what} = {mean:+.4f} nats/byte from one seed: no spread to judge it by"
  se = sd / np.sqrt(len(gap))
  lower = beyond_spread(-g for g in gap)
  beyond = lower or beyond_spread(gap)
  return lower, (
      f"{what} = {mean:+.4f} +- {sd:.4f} nats/byte over {len(gap)} seeds (standard error "
      f"{se:.4f}: {'beyond' if beyond else 'within'} twice it)")


def results_head(args, base: dict, dense, runner: Runner, title: str, script_flags: str
                 ) -> list[str]:
  """A result file's header (the command: this script's `script_flags`, then the shared ones)
  and its description of the data and the saturated base."""
  model = model_config_from(dense, ByteTokenizer.vocab_size)
  command = (f"python experiments/{os.path.basename(sys.argv[0])} --workdir {args.workdir} "
             + script_flags + common_command(args))
  state = ("nearly stopped improving" if base["saturated"] else
           f"still improving at the {args.preset['max_pretrain_steps']}-step cap")
  return [
      *header(title, command, base["seconds"] + runner.seconds,
              took=" of training (pre-training and every run, summed)"), "",
      f"Data: stdlib `{args.corpus}` corpus, byte tokenizer, rows of {dense.data.seq_len}, batch "
      f"{dense.train.batch_size}; validation loss over the same {EVAL_BATCHES} batches of the "
      "validation split for every run.  ",
      f"Base: {args.preset['model']}, {model.num_params() / 1e6:.2f}M params, "
      f"{model.flops_per_token(dense.data.seq_len) / 1e6:.2f} MFLOPs/token; pre-trained at a "
      f"constant rate {LEARNING_RATE} (after {PRETRAIN_WARMUP} warmup steps) for {base['steps']} "
      f"steps, until the validation loss fell by under {args.saturation} nats/byte over the last "
      f"{WINDOW} steps: it fell by {base['drop']:.4f} ({state}), to {base['curve'][-1][1]:.4f}."
      "  ",
      f"Extra runs: warmup {CONTINUE_WARMUP} steps continuing (fresh optimizer), "
      f"{PRETRAIN_WARMUP} from scratch; cosine decay to {EXTRA_FINAL_LR} of the rate over each "
      f"run's budget; the corpus in another order per seed; {EVALS} evaluations each.",
  ]


def band(ax, curves: dict[int, list], x_per_step: float, label: str, **style) -> None:
  """The seeds' mean validation curve against x, with a +- sd band where there are two or
  more seeds."""
  steps = np.array(next(iter(curves.values())))[:, 0]
  losses = np.array([np.array(c)[:, 1] for c in curves.values()])
  mean = losses.mean(axis=0)
  ax.plot(steps * x_per_step, mean, marker=".", label=f"{label} ({len(curves)} seeds)",
          **style)
  if len(curves) > 1:
    sd = losses.std(axis=0, ddof=1)
    ax.fill_between(steps * x_per_step, mean - sd, mean + sd, alpha=0.25, **style)


def plot_expert_load(path: str, workdirs: dict[str, str]) -> None:
  """Per-expert load (the fraction of tokens the router sends to each expert, averaged over the
  MoE layers) and its coefficient of variation against step, one panel per MoE arm."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(workdirs), figsize=(5.5 * len(workdirs), 4), sharey=True,
                           squeeze=False)
  for ax, (name, workdir) in zip(axes[0], workdirs.items()):
    records = [r for r in read_metrics(workdir) if "moe_load_cv" in r]
    steps = [r["step"] for r in records]
    for expert in range(NUM_EXPERTS):
      ax.plot(steps, [r[f"moe_load/expert_{expert}"] for r in records], linewidth=1)
    ax.axhline(1 / NUM_EXPERTS, color="gray", linestyle="--", linewidth=1, label="uniform")
    cv = ax.twinx()
    cv.plot(steps, [r["moe_load_cv"] for r in records], "k:", label="CV (right axis)")
    cv.set_ylabel("coefficient of variation of the loads")
    ax.set(xlabel="step", ylabel="fraction of tokens", title=f"{name}: load per expert")
    ax.legend(loc="upper left")
    cv.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_flags(parser, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "upcycling"))
  args = parse(parser)
  base = pretrain(args)
  dense = dense_config(args, base["steps"])
  dense_steps = EVALS * max(round(args.extra * base["steps"] / EVALS), 1)
  moe_steps = equal_compute_steps(dense_steps, dense, extra_run(dense, 1, 0, **MOE))
  runner = Runner(deadline_timestamp(args.deadline))
  arms = Arms(args, runner)
  arms.add("dense continued", "dense_continued",
           lambda s: extra_run(dense, dense_steps, s, init_from_workdir=base["workdir"]),
           args.seeds)
  arms.add("upcycled", "upcycled",
           lambda s: extra_run(dense, moe_steps, s, init_from_workdir=base["workdir"], **MOE),
           args.seeds)
  arms.add("MoE from scratch", "moe_scratch", lambda s: extra_run(dense, moe_steps, s, **MOE),
           args.seeds[:1])
  arms.train()
  write_results(args, base, dense, arms, dense_steps, moe_steps, runner)


def write_results(args, base, dense, arms: Arms, dense_steps, moe_steps, runner) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  unit = flops_per_step(dense) * base["steps"]  # the pre-training's FLOPs
  x_per_step = {name: flops_per_step(make(0)) / unit for name, (_, make, _) in arms.arms.items()}
  curves = {name: arms.curves(name) for name in arms.arms}
  moe_model = model_config_from(extra_run(dense, 1, 0, **MOE), ByteTokenizer.vocab_size)
  dense_model = model_config_from(dense, ByteTokenizer.vocab_size)
  seq_len = dense.data.seq_len
  up_vs_dense = paired_gap(curves["upcycled"], curves["dense continued"])
  lines = results_head(args, base, dense, runner,
                       "Sparse upcycling: from a saturated dense checkpoint, at equal extra "
                       "compute", "")
  lines += [
            f"MoE: {NUM_EXPERTS} experts in every other layer, top-1 (straight-through weight), "
            f"dropless: {moe_model.num_params() / 1e6:.2f}M params, "
            f"{moe_model.flops_per_token(seq_len) / 1e6:.3f} MFLOPs/token "
            f"({moe_model.flops_per_token(seq_len) / dense_model.flops_per_token(seq_len):.3f}x "
            f"dense: the router), so the extra budget of {args.extra} x the pre-training is "
            f"{dense_steps} dense steps or {moe_steps} MoE steps.", "",
            "Validation loss (nats/byte) at the end of the extra budget, mean +- sd over seeds; "
            "step 0 is each run's start (the checkpoint, the upcycled model, a random init):", "",
            "| arm | seeds | step 0 | end of budget | steps | wall s/step |",
            "|---|---|---|---|---|---|"]
  for name, found in curves.items():
    if found:
      seconds = [runner.runs[name, seed]["seconds"] for seed in found]
      lines.append(f"| {name} | {len(found)} | {describe(mean_sd(c[0][1] for c in found.values()))}"
                   f" | {describe(mean_sd(c[-1][1] for c in found.values()), 4)} | "
                   f"{next(iter(found.values()))[-1][0]} | "
                   f"{np.mean(seconds) / arms.arms[name][1](0).train.steps:.2f} |")
  reproduced, sentence = gap_reading(up_vs_dense, "upcycled - dense continued")
  both = [s for s in curves["upcycled"] if s in curves["dense continued"]]
  if both:  # the paired gap's course: its worst evaluation and half-way through the budget
    gaps = np.mean([np.array(curves["upcycled"][s])[:, 1]
                    - np.array(curves["dense continued"][s])[:, 1] for s in both], axis=0)
    sentence += (f"; the gap peaked at {gaps.max():+.4f} (evaluation {gaps.argmax()} of "
                 f"{len(gaps) - 1}), was {gaps[len(gaps) // 2]:+.4f} half-way and "
                 + ("was still closing at the end" if gaps[-1] < gaps[-2] else
                    "had stopped closing by the end"))
  scratch = paired_gap(curves["MoE from scratch"], curves["upcycled"])
  lines += ["", f"**Reading: {'reproduced' if reproduced else 'not reproduced'} at this scale.** "
            "The claim: at equal extra compute an upcycled model ends below the dense model "
            "trained on (and far below the same MoE from scratch). Here " + sentence + "."
            + (f" MoE from scratch - upcycled = {np.mean(scratch):+.4f} (one seed)."
               if scratch else "")
            + ("" if base["saturated"] else " The base had not saturated (see above), which "
               "favours the dense arm.")]
  if runner.missing:
    lines += ["", f"Missing ({len(runner.missing)} runs not started before the deadline): "
              + "; ".join(f"{name} seed {seed}" for name, seed in runner.missing) + "."]
  lines += ["", f"![upcycling]({os.path.basename(args.out)}.png) "
            f"![expert load]({os.path.basename(args.out)}_expert_load.png): each expert's share "
            "of the tokens over training (averaged over the MoE layers) and the loads' "
            "coefficient of variation, for the two MoE arms (first seed)."]
  write(args.out + ".md", lines)

  fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
  for (name, found), color in zip(curves.items(), ("C0", "C1", "C2")):
    if found:
      band(ax, found, x_per_step[name], name, color=color)
  ax.axhline(base["curve"][-1][1], color="gray", linestyle="--", linewidth=1,
             label="dense checkpoint")
  finals = [c[-1][1] for found in curves.values() for c in found.values()]
  ax.set_ylim(min(finals) - 0.03, base["curve"][-1][1] + 0.15)
  ax.set(xlabel="extra training FLOPs / dense pre-training FLOPs",
         ylabel="validation loss (nats/byte)", title="validation loss (mean +- sd over seeds)")
  ax.legend(fontsize=8)
  both = [s for s in curves["upcycled"] if s in curves["dense continued"]]
  if both:
    gaps = np.array([np.array(curves["upcycled"][s])[:, 1]
                     - np.array(curves["dense continued"][s])[:, 1] for s in both])
    x = np.array(curves["upcycled"][both[0]])[:, 0] * x_per_step["upcycled"]
    gap_ax.plot(x, gaps.mean(axis=0), "k.-", label=f"upcycled - dense ({len(both)} seeds)")
    if len(both) > 1:
      sd = gaps.std(axis=0, ddof=1)
      gap_ax.fill_between(x, gaps.mean(axis=0) - sd, gaps.mean(axis=0) + sd, color="gray",
                          alpha=0.3, label="+- sd")
  gap_ax.axhline(0, color="gray", linewidth=0.8)
  gap_ax.set(xlabel="extra training FLOPs / dense pre-training FLOPs",
             ylabel="validation loss gap (nats/byte)",
             title="upcycled - dense continued, paired per seed")
  gap_ax.legend(fontsize=8)
  for a in (ax, gap_ax):
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)
  plot_expert_load(args.out + "_expert_load.png",
                   {name: arms.workdir(name, args.seeds[0]) for name in ("upcycled",
                                                                          "MoE from scratch")
                    if (name, args.seeds[0]) in runner.runs})


if __name__ == "__main__":
  main()

"""Sparse upcycling (Komatsuzaki et al. 2023) at small scale: with the same extra training
compute, a dense checkpoint (a) trained on dense, (b) upcycled into an MoE and trained, (c) the
same MoE trained from scratch.

    python experiments/upcycling.py --workdir /tmp/upcycling [--pretrain_steps 300]
        [--extra 1.0] [--evals 12] [--num_experts 8] [--top_k 2] [--moe_every 2]
        [--corpus full] [--out experiments/results/upcycling]

A dense LLaMA-style model (byte tokenizer, stdlib corpus) is pre-trained for `pretrain_steps`.
The extra budget is `extra` times its pre-training FLOPs (`flops_per_token` of the registered
model config: 6 x the active matmul params + attention). The three arms spend it at the same
batch size: the dense one in `extra * pretrain_steps` steps; the MoE ones (top-k of
`num_experts` experts in every `moe_every`-th layer, model.moe.every: k experts active, so
more FLOPs per token) in proportionally fewer steps, so that every arm's x-axis is the compute
it actually used (the paper compares at equal extra compute). (a) and (b) start from the
dense run's newest params through `train.init_from` (the CLI's
`--config.train.init_from=<dense workdir>`), with a fresh optimizer; (b) with the MoE keys
set, so init_from upcycles (methods/upcycle.py: experts copied from the dense MLP, fresh
routers; the same function at step 0). (c) is the MoE config from a random init with the
pre-training recipe. Pre-training keeps a constant learning rate after its warmup (an
unannealed checkpoint, as the paper continues from); each extra run warms up and
decays (cosine) to a tenth of the rate over its own budget, so its last evaluation is annealed
and every arm is at the same point of its schedule at the same fraction of the budget. The extra
training reads the corpus in another order (`data.shuffle_seed=1`) than pre-training did. Each
run evaluates `evals` times at equal fractions of its budget.

Writes `<out>.md` (validation loss against extra compute for the three arms), `<out>.png`, and
`<out>_expert_load.png` (the MoE arms' load per expert against step).
Re-running on the same workdir resumes unfinished runs and reads finished ones back.
"""
import argparse
import os

import jax

from llm_research import data, init_from
from llm_research.config import base_config
from llm_research.data.tokenizers import ByteTokenizer
from llm_research.metrics import read_metrics
from llm_research.training import (Trainer, model_config_from, params_from_source,
                                   train_and_evaluate)
from report import header, write

# A ~0.8M-parameter dense model: 4 layers of width 128.
DENSE_MODEL = dict(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                   mlp_dim=352)
SEQ_LEN, BATCH_SIZE, EVAL_BATCHES = 128, 16, 16
CONTINUE_WARMUP = 10  # steps: a fresh optimizer's moments settle before the full rate
EXTRA_FINAL_LR = 0.1  # the extra runs' cosine decay ends at this fraction of the rate


def add_common_flags(parser: argparse.ArgumentParser, out: str) -> None:
  """The flags this experiment shares with experiments/depth_upscaling.py."""
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--pretrain_steps", type=int, default=300)
  parser.add_argument("--extra", type=float, default=1.0,
                      help="extra budget, as a fraction of the dense pre-training")
  parser.add_argument("--evals", type=int, default=12, help="evaluations per run")
  parser.add_argument("--learning_rate", type=float, default=3e-3)
  parser.add_argument("--corpus", default="full", choices=["full", "tiny"])
  parser.add_argument("--out", default=out)


def dense_config(args):
  """The dense pre-training run: constant learning rate after a 10% warmup."""
  config = base_config()
  config.model.update(**DENSE_MODEL)
  config.data.update(source="stdlib", stdlib_config=args.corpus, tokenizer="byte",
                     seq_len=SEQ_LEN)
  steps = args.pretrain_steps
  config.train.update(steps=steps, batch_size=BATCH_SIZE, learning_rate=args.learning_rate,
                      warmup_steps=max(steps // 10, 1), final_lr_fraction=1.0,
                      eval_every=steps, eval_batches=EVAL_BATCHES, log_every=steps,
                      checkpoint_every=steps, keep_checkpoints=1, progress_bar=False)
  return config


def extra_run(base, steps: int, evals: int, *, init_from_workdir: str = "", **model):
  """`base` with `model` changes, trained for `steps` steps on the extra data with the rate
  decaying to a tenth, evaluated `evals` times; from `init_from_workdir`'s params (fresh
  optimizer, short warmup) if given, else from scratch with `base`'s warmup."""
  config = base.copy_and_resolve_references()
  config.model.update(**model)
  config.data.shuffle_seed = 1  # the extra tokens: another order than pre-training's
  every = max(steps // evals, 1)
  config.train.update(steps=steps, final_lr_fraction=EXTRA_FINAL_LR, eval_every=every,
                      log_every=every, checkpoint_every=every * max(evals // 4, 1),
                      init_from=init_from_workdir)
  if init_from_workdir:
    config.train.warmup_steps = CONTINUE_WARMUP
  return config


def flops_per_step(config) -> float:
  """Training FLOPs of one step: the registered model's `flops_per_token` x the batch's tokens."""
  model = model_config_from(config, ByteTokenizer.vocab_size)
  return model.flops_per_token(config.data.seq_len) * config.train.batch_size * config.data.seq_len


def equal_compute_steps(dense_steps: int, dense, other, evals: int) -> int:
  """Steps of `other` with the FLOPs of `dense_steps` steps of `dense` (rounded to a multiple of
  `evals`, so that its evaluations fall at the same fractions of the budget)."""
  per_eval = dense_steps / evals * flops_per_step(dense) / flops_per_step(other)
  return evals * max(round(per_eval), 1)


def train(config, workdir: str) -> list[dict]:
  """Trains (or resumes, or reads back) the run in `workdir`: its records with an eval_loss."""
  train_and_evaluate(config, workdir)
  return [r for r in read_metrics(workdir) if "eval_loss" in r]


def start_eval_loss(config) -> float:
  """Validation loss of the params a run of `config` starts from, before its first step: with
  `train.init_from`, the source's params through the surgery (e.g. an upcycled or up-scaled
  model at step 0); else the random init."""
  trainer = Trainer(config, data.get_tokenizer(config.data))
  if config.train.init_from:
    params = params_from_source(init_from.check(config), trainer, seed=config.train.seed)
  else:
    params = trainer.init_state().params
  return trainer.evaluate(params, config.train.eval_batches)["eval_loss"]


def curve(start_loss: float, records: list[dict], x_per_step: float) -> list[tuple[float, float]]:
  """(x, validation loss) of a run: its start (x = 0), then each evaluation (x = step x
  `x_per_step`)."""
  return [(0.0, start_loss)] + [(r["step"] * x_per_step, r["eval_loss"]) for r in records]


def seconds_per_step(workdir: str) -> float:
  """Mean train step time of a run (compilation excluded), from its metrics."""
  times = [r["step_time_s"] for r in read_metrics(workdir) if "step_time_s" in r]
  return sum(times) / max(len(times), 1)


def ordinal(n: int) -> str:
  return {1: "", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def curves_table(columns: dict[str, list[tuple[float, float]]], x_name: str) -> list[str]:
  """A markdown table, one row per evaluation: each arm's x and validation loss."""
  names = list(columns)
  lines = ["| eval | " + " | ".join(f"{n}: {x_name} | {n}: val loss" for n in names) + " |",
           "|---|" + "---|---|" * len(names)]
  for i in range(max(len(c) for c in columns.values())):
    cells = [f"{columns[n][i][0]:.3f} | {columns[n][i][1]:.3f}" if i < len(columns[n])
             else "- | -" for n in names]
    lines.append(f"| {i} | " + " | ".join(cells) + " |")
  return lines


def plot(path: str, columns: dict[str, list[tuple[float, float]]], reference: float,
         xlabel: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for (name, points), marker in zip(columns.items(), "os^vD"):
    ax.plot(*zip(*points), marker + "-", label=name, markersize=4)
  ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="dense checkpoint")
  # From the lowest loss to a little above the checkpoint's: a run from scratch enters the
  # frame once it comes near the others.
  ax.set_ylim(min(loss for points in columns.values() for _, loss in points) - 0.05,
              reference + 0.35)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("validation loss (nats/byte)")
  ax.set_title(title, fontsize=10)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def reading(columns: dict[str, list[tuple[float, float]]]) -> str:
  """What the final validation losses say about the paper's claim (one seed: no spread)."""
  dense, upcycled, scratch = (columns[name][-1][1]
                              for name in ("dense continued", "upcycled", "MoE from scratch"))
  gap = upcycled - dense
  verdict = ("not reproduced" if gap >= 0 else
             "in the claimed direction, but one seed cannot show it beyond seed noise")
  return (f"**Reading: {verdict}.** The claim: at equal extra compute the upcycled model ends "
          f"below the dense model trained on, and far below the same MoE from scratch. Here "
          f"upcycled - dense continued = {gap:+.3f} nats/byte and MoE from scratch - upcycled = "
          f"{scratch - upcycled:+.3f}, from one seed and a dense model 300 steps from random "
          "(not near convergence): a test at this design cannot separate the arms from seed "
          "noise.")


def plot_expert_load(path: str, workdirs: dict[str, str], num_experts: int) -> None:
  """Per-expert load (the fraction of token copies the router sends to each expert, before any
  drop, averaged over the MoE layers) and its coefficient of variation against step, one panel
  per MoE arm: whether the routers spread the tokens or collapse onto a few experts."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(workdirs), figsize=(5.5 * len(workdirs), 4), sharey=True)
  for ax, (name, workdir) in zip(axes, workdirs.items()):
    records = [r for r in read_metrics(workdir) if "moe_load_cv" in r]
    steps = [r["step"] for r in records]
    for expert in range(num_experts):
      ax.plot(steps, [r[f"moe_load/expert_{expert}"] for r in records], linewidth=1)
    ax.axhline(1 / num_experts, color="gray", linestyle="--", linewidth=1, label="uniform")
    cv = ax.twinx()
    cv.plot(steps, [r["moe_load_cv"] for r in records], "k:", label="CV (right axis)")
    cv.set_ylabel("coefficient of variation of the loads")
    ax.set(xlabel="step", ylabel="fraction of token copies", title=f"{name}: load per expert")
    ax.legend(loc="upper left")
    cv.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_common_flags(parser, "experiments/results/upcycling")
  parser.add_argument("--num_experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--moe_every", type=int, default=2)
  args = parser.parse_args()
  dense = dense_config(args)
  dense_dir = os.path.join(args.workdir, "dense")
  pretrain = train(dense, dense_dir)
  moe = dict(mlp_impl="moe", moe=dict(num_experts=args.num_experts,
                                      experts_per_token=args.top_k, every=args.moe_every))
  dense_steps = round(args.extra * args.pretrain_steps / args.evals) * args.evals
  moe_steps = equal_compute_steps(dense_steps, dense, extra_run(dense, 1, 1, **moe), args.evals)
  runs = {  # name: (config, workdir)
      "dense continued": (extra_run(dense, dense_steps, args.evals, init_from_workdir=dense_dir),
                          "dense_continued"),
      "upcycled": (extra_run(dense, moe_steps, args.evals, init_from_workdir=dense_dir, **moe),
                   "upcycled"),
      "MoE from scratch": (extra_run(dense, moe_steps, args.evals, **moe), "moe_scratch"),
  }
  unit = flops_per_step(dense) * args.pretrain_steps  # the dense pre-training's FLOPs
  checkpoint_loss = pretrain[-1]["eval_loss"]
  columns = {}
  for name, (config, subdir) in runs.items():
    records = train(config, os.path.join(args.workdir, subdir))
    columns[name] = curve(start_eval_loss(config), records, flops_per_step(config) / unit)
  # The training steps' time, summed over the runs (a re-run that reads finished runs back
  # reports the time they took, not its own).
  seconds = seconds_per_step(dense_dir) * args.pretrain_steps + sum(
      seconds_per_step(os.path.join(args.workdir, subdir)) * config.train.steps
      for config, subdir in runs.values())

  moe_model = model_config_from(runs["upcycled"][0], ByteTokenizer.vocab_size)
  dense_model = model_config_from(dense, ByteTokenizer.vocab_size)
  timing = {name: seconds_per_step(os.path.join(args.workdir, subdir))
            for name, (_, subdir) in runs.items()}
  command = (f"python experiments/upcycling.py --pretrain_steps {args.pretrain_steps} --extra "
             f"{args.extra} --evals {args.evals} --num_experts {args.num_experts} --top_k "
             f"{args.top_k} --moe_every {args.moe_every} --learning_rate {args.learning_rate} "
             f"--corpus {args.corpus}")
  lines = header("Sparse upcycling: validation loss against extra compute", command, seconds,
                 took=" of train steps (summed over the runs; compilation, evaluation excluded)")
  lines += [
      f"Data: stdlib `{args.corpus}` corpus, byte tokenizer, seq_len {SEQ_LEN}, batch "
      f"{BATCH_SIZE}; validation loss over {EVAL_BATCHES} batches of the validation split.  ",
      f"Dense: {DENSE_MODEL}, {dense_model.num_params() / 1e6:.2f}M params, "
      f"{dense_model.flops_per_token(SEQ_LEN) / 1e6:.2f} MFLOPs/token; pre-trained "
      f"{args.pretrain_steps} steps (validation loss {checkpoint_loss:.3f}).  ",
      f"MoE: {args.num_experts} experts, top-{args.top_k} dropless, in every "
      f"{ordinal(args.moe_every)} layer: {moe_model.num_params() / 1e6:.2f}M params, "
      f"{moe_model.flops_per_token(SEQ_LEN) / 1e6:.2f} MFLOPs/token "
      f"({moe_model.flops_per_token(SEQ_LEN) / dense_model.flops_per_token(SEQ_LEN):.3f}x "
      f"dense), so at equal extra compute the MoE arms take {moe_steps} steps to the dense "
      f"arm's {dense_steps} (same batch).  ",
      f"Learning rate {args.learning_rate}: pre-training constant after a "
      f"{dense.train.warmup_steps}-step warmup; each extra run warms up ({CONTINUE_WARMUP} "
      f"steps when continuing with a fresh optimizer, {dense.train.warmup_steps} from scratch) "
      f"and decays (cosine) to {EXTRA_FINAL_LR} of it over its budget; the extra training "
      "reads the corpus in another order (data.shuffle_seed=1).  ",
      "Seconds per train step on this machine (not part of the comparison, which is in FLOPs"
      + ("; XLA:CPU computes the dropless path's ragged_dot as a dense matmul over every "
         "expert" if jax.default_backend() == "cpu" else "") + "): "
      + ", ".join(f"{name} {t:.2f}" for name, t in timing.items()) + ".",
      "",
      "Extra compute is the FLOPs spent after the dense checkpoint as a fraction of the dense "
      "pre-training's. Eval 0 is each run's starting point, before its first step: the dense "
      "checkpoint, the upcycled model, a random init.",
      "",
      *curves_table(columns, "extra compute"),
      "",
      "", reading(columns),
      "",
      f"![expert load]({os.path.basename(args.out)}_expert_load.png): each expert's share of "
      "the token copies over training (averaged over the MoE layers) and the loads' "
      "coefficient of variation, for the two MoE arms.",
  ]
  write(args.out + ".md", lines)
  plot(args.out + ".png", columns, checkpoint_loss,
       "extra training FLOPs / dense pre-training FLOPs",
       f"dense {dense_model.num_params() / 1e6:.1f}M -> {args.num_experts} experts, "
       f"top-{args.top_k}, in every {ordinal(args.moe_every)} layer")
  plot_expert_load(args.out + "_expert_load.png",
                   {name: os.path.join(args.workdir, runs[name][1])
                    for name in ("upcycled", "MoE from scratch")}, args.num_experts)


if __name__ == "__main__":
  main()

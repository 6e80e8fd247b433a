"""BitNet b1.58 vs float at equal schedule: does b1.58's loss approach float's as models grow?

    python experiments/bitnet_vs_fp.py --workdir /tmp/bitnet_vs_fp [--gpu]
        [--sizes d32,d64,d128] [--sweep_sizes d32,d128] [--steps 200] [--batch_size 16]
        [--learning_rates 1e-3,3e-3,1e-2,3e-2,1e-1] [--seeds 0,1,2] [--deadline 12:30]
        [--out experiments/results/bitnet_vs_fp]

The paper (Ma et al. 2024, "The Era of 1-bit LLMs") reports b1.58 trailing float at 700M
params and matching it from 3B. The variable under study is the linear layers alone, so the
two main arms share everything else, the schedule included:

  b1.58 (two-stage)  `model.linear_impl=bitnet`, `train.schedule=two_stage`
  float (two-stage)  `model.linear_impl=dense`, the same schedule
  float (cosine)     `model.linear_impl=dense`, `train.schedule=cosine`: float's usual schedule,
                     a third arm, so that "the gap" is not an artefact of a schedule that
                     suits float badly.

The shared schedule is the paper's two-stage one (peak learning rate until half-way, then a
drop and a cosine decay, weight decay off in the second half), because b1.58 is the method
under test and the paper trains it only that way; float with it is the controlled comparison,
float with cosine its own-best reference.

Each arm picks its learning rate by a short sweep (`--learning_rates`, seed 0, lowest final
validation loss) at each size of `--sweep_sizes`; a size not swept takes the rate chosen at the
swept size nearest in params (log scale). The chosen rate then trains the other `--seeds`
(seed sets both the init and the data order; every arm of a seed sees the same batches, so the
gap b1.58 - float is paired per seed). Each run evaluates on the same 16 validation batches
four times, for its loss curve and the convergence check (the drop over the last 20% of steps).

Writes `<out>.md` (table, chosen learning rates, convergence, and a reading written from the
numbers: "reproduced" only if the gap shrinks from the smallest to the largest size by more
than twice its standard error over seeds) and `<out>.png` (gap vs params with error bars,
validation-loss curves, the learning-rate sweep). Finished runs are kept in the workdir, and a
re-run reads them back. With `--deadline HH:MM` (UTC) a run that would not finish by then is not
started: the results are written from the runs that finished and name the missing ones.

The CPU preset fits about an hour of 2 shared cores: three sizes, 0.031M to 0.59M params (19x;
the 3M model of the first version took 1.7 s a step there), 200 steps, the sweep at the smallest
and largest (five rates: the smallest models at 200 steps want rates up to 3e-2).
`--gpu` is the preset for a lent GPU: three sizes to 18M params, batch 64, 2000 steps, the sweep
at the smallest and largest.
"""
import argparse
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm_research.config import base_config
from llm_research.data.tokenizers import ByteTokenizer
from llm_research.training import model_config_from
from report import header, write
from runs import Runner, deadline_timestamp, describe, final_loss, mean_sd, tail_drop

# Named by width; the head and MLP dims follow it (MLP ~2.75x, grouped-query attention).
SIZES = {
    "d32": dict(num_layers=2, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16,
                mlp_dim=88),
    "d64": dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                mlp_dim=176),
    "d128": dict(num_layers=3, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=352),
    "d256": dict(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
                 mlp_dim=704),
    "d512": dict(num_layers=6, embed_dim=512, num_heads=8, num_kv_heads=4, head_dim=64,
                 mlp_dim=1408),
}
# arm -> (model.linear_impl, train.schedule). The first two differ only in the linear layers.
ARMS = {
    "b1.58 (two-stage)": ("bitnet", "two_stage"),
    "float (two-stage)": ("dense", "two_stage"),
    "float (cosine)": ("dense", "cosine"),
}
BITNET, FLOAT_SAME, FLOAT_OWN = ARMS
# Defaults per machine: 2 shared CPU cores (0.031M-0.59M params, 19x), or a lent GPU (0.59M-18M,
# 30x). The sweep runs at the smallest and largest size; the middle one takes the nearest's rate.
PRESETS = {
    "cpu": dict(sizes="d32,d64,d128", sweep_sizes="d32,d128", steps=200, batch_size=16),
    "gpu": dict(sizes="d128,d256,d512", sweep_sizes="d128,d512", steps=2000, batch_size=64),
}
SEQ_LEN = 128
EVALS = 4  # validation points per run: the loss curve
# Near convergence: the validation loss fell by under NEAR_CONVERGED nats/byte over the last
# TAIL of the steps.
TAIL = 0.2
NEAR_CONVERGED = 0.01


def run_config(args, size: str, arm: str, learning_rate: float, seed: int):
  linear_impl, schedule = ARMS[arm]
  config = base_config()
  config.model.update(**SIZES[size], linear_impl=linear_impl)
  config.data.update(source="stdlib", stdlib_config=args.corpus, tokenizer="byte",
                     seq_len=SEQ_LEN, shuffle_seed=seed)
  config.train.update(steps=args.steps, batch_size=args.batch_size, learning_rate=learning_rate,
                      warmup_steps=max(args.steps // 20, 1), schedule=schedule, seed=seed,
                      eval_every=max(args.steps // EVALS, 1), eval_batches=16,
                      log_every=max(args.steps // EVALS, 1), checkpoint_every=args.steps,
                      keep_checkpoints=1, progress_bar=False)
  return config


def param_counts(size: str) -> tuple[int, int]:
  """(all the model's params, those b1.58 makes ternary: the attention and MLP projections;
  the embedding, tied to the output, and the norms stay float). Shapes only: nothing is
  initialised."""
  config = base_config()
  config.model.update(**SIZES[size])
  model = model_config_from(config, ByteTokenizer.vocab_size).make_model()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  sizes = {jax.tree_util.keystr(path): math.prod(x.shape)
           for path, x in jax.tree_util.tree_leaves_with_path(shapes["params"])}
  return sum(sizes.values()), sum(n for path, n in sizes.items()
                                  if path.startswith("['layers']") and "['kernel']" in path)


def run_dir(args, size: str, arm: str, learning_rate: float, seed: int) -> str:
  linear_impl, schedule = ARMS[arm]
  name = f"{linear_impl}_{schedule}_lr{learning_rate:g}_seed{seed}"
  return os.path.join(args.workdir, size, name)


def get(args, runner: Runner, params: dict, size: str, arm: str, learning_rate: float,
        seed: int) -> dict | None:
  """The run's result (trained now, read back, or None past the deadline); its cost for the
  deadline's estimate is its params."""
  key = (size, arm, learning_rate, seed)
  return runner.get(key, lambda: run_config(args, *key), run_dir(args, *key), cost=params[size])


def bytes_per_run(args) -> int:
  return args.steps * args.batch_size * SEQ_LEN


def chosen_rates(args, runner: Runner, params: dict) -> dict:
  """{(size, arm): learning rate}: the sweep's best at each swept size (seed 0), else that of
  the swept size nearest in log params."""
  sweep_sizes = args.sweep_sizes.split(",")
  best = {}
  for size in sweep_sizes:
    for arm in ARMS:
      losses = {lr: get(args, runner, params, size, arm, lr, args.seeds[0])
                for lr in args.learning_rates}
      losses = {lr: final_loss(r) for lr, r in losses.items() if r is not None}
      if losses:
        best[size, arm] = min(losses, key=losses.get)
  rates = {}
  for size in args.sizes.split(","):
    for arm in ARMS:
      swept = [s for s in sweep_sizes if (s, arm) in best]
      if swept:
        nearest = min(swept, key=lambda s: abs(math.log(params[s] / params[size])))
        rates[size, arm] = best[nearest, arm]
  return rates


def summarise(args, runner: Runner, rates: dict, counts: dict) -> list[dict]:
  """Per size: each arm's final losses over seeds at its chosen rate, and the gaps, paired
  per seed (only seeds where both arms finished)."""
  rows = []
  for size in args.sizes.split(","):
    params, ternary = counts[size]
    row = dict(size=size, params=params, ternary_share=ternary / params, losses={}, curves={},
               lr={})
    for arm in ARMS:
      if (size, arm) not in rates:
        continue
      row["lr"][arm] = rates[size, arm]
      results = {seed: runner.runs.get((size, arm, rates[size, arm], seed))
                 for seed in args.seeds}
      row["losses"][arm] = {seed: final_loss(r) for seed, r in results.items() if r}
      row["curves"][arm] = [r["curve"] for r in results.values() if r]
    for name, float_arm in (("gap", FLOAT_SAME), ("gap_own", FLOAT_OWN)):
      bitnet, float_ = row["losses"].get(BITNET, {}), row["losses"].get(float_arm, {})
      row[name] = [bitnet[seed] - float_[seed] for seed in args.seeds
                   if seed in bitnet and seed in float_]
    rows.append(row)
  return rows


def gap_change(small: dict, large: dict, name: str) -> tuple[float, float]:
  """How much the gap `name` shrank from `small` to `large` (positive: it shrank), and the
  standard error of that change from the seeds' spread at each size."""
  (gap_small, sd_small), (gap_large, sd_large) = mean_sd(small[name]), mean_sd(large[name])
  se = math.sqrt(sd_small ** 2 / len(small[name]) + sd_large ** 2 / len(large[name]))
  return gap_small - gap_large, se


def described_change(shrink: float, se: float) -> str:
  if shrink > 2 * se:
    return (f"shrank by {shrink:.3f} nats/byte, more than twice its standard error over seeds "
            f"({se:.3f})")
  if shrink > 0:
    return (f"shrank by {shrink:.3f} nats/byte, less than twice its standard error over seeds "
            f"({se:.3f})")
  return f"grew by {-shrink:.3f} nats/byte (standard error over seeds {se:.3f})"


def reading(args, rows: list[dict]) -> list[str]:
  """The verdict on the claim from the numbers: the same-schedule gap's change from the smallest
  to the largest size against its standard error over seeds; then what qualifies it (float's
  own schedule, convergence, the sweep's edges, the ternary share, the scale)."""
  measured = [r for r in rows if len(r["gap"]) >= 2]
  if len(measured) < 2:
    return ["**Reading: cannot say.** Fewer than two sizes have two or more seeds of both "
            "same-schedule arms (see the missing runs)."]
  small, large = measured[0], measured[-1]
  shrink, se = gap_change(small, large, "gap")
  verdict = "reproduced at this scale" if shrink > 2 * se else "not reproduced at this scale"
  by_size = lambda name: ", ".join(f"{mean_sd(r[name])[0]:+.3f}" for r in measured)
  relative = [mean_sd(r["gap"])[0] / np.mean(list(r["losses"][FLOAT_SAME].values()))
              for r in (small, large)]
  lines = [f"From {small['size']} to {large['size']} "
           f"({large['params'] / small['params']:.0f}x the params) the gap b1.58 - float at the "
           f"same schedule {described_change(shrink, se)}: {by_size('gap')} by size "
           f"({100 * relative[0]:.1f}% to {100 * relative[1]:.1f}% of float's loss)."]
  if mean_sd(large["gap"])[0] < 0:
    lines.append(f"At {large['size']} b1.58 ended below float at the same schedule.")
  if all(len(r["gap_own"]) >= 2 for r in (small, large)):
    own_shrink, own_se = gap_change(small, large, "gap_own")
    if (own_shrink > 2 * own_se) != (shrink > 2 * se):
      verdict += (" against float at the same schedule, but not against float at its own "
                  "(cosine) schedule" if shrink > 2 * se else
                  " against float at the same schedule, though it is against float at its own "
                  "(cosine) schedule")
    schedule_cost = [mean_sd(r["gap_own"])[0] - mean_sd(r["gap"])[0] for r in measured]
    lines.append(
        f"Against float with its own cosine schedule the gap {described_change(own_shrink, own_se)}"
        f": {by_size('gap_own')} by size. The two-stage schedule cost float "
        + ", ".join(f"{cost:+.3f}" for cost in schedule_cost) + " nats/byte against cosine"
        + (" (so the same-schedule gap understates b1.58's distance from float at its best)"
           if min(schedule_cost) > 0 else "")
        + f"; of the same-schedule gap's change from {small['size']} to {large['size']} "
        f"({-shrink:+.3f}), {schedule_cost[0] - schedule_cost[-1]:+.3f} is that cost's change "
        "with size.")
  drops = [tail_drop(r["curves"][arm], TAIL) for r in measured for arm in r["curves"]]
  if max(drops) > NEAR_CONVERGED:
    lines.append(
        f"The runs were not converged: over the last {100 * TAIL:.0f}% of the {args.steps} steps "
        f"the validation loss still fell by {min(drops):.3f}-{max(drops):.3f} nats/byte (near "
        f"convergence: under {NEAR_CONVERGED}), so the gaps measure how fast each arm learns in "
        f"{bytes_per_run(args) / 1e6:.1f}M bytes as much as what it can reach.")
  edge = sorted({f"{arm} at {r['size']}" for r in measured for arm, lr in r["lr"].items()
                 if lr in (min(args.learning_rates), max(args.learning_rates))})
  if edge:
    lines.append("The chosen learning rate is at the sweep's edge for " + ", ".join(edge)
                 + ": a wider sweep might lower those losses.")
  lines.append(f"b1.58 makes {100 * small['ternary_share']:.0f}% of the params ternary at "
               f"{small['size']} and {100 * large['ternary_share']:.0f}% at {large['size']} (the "
               "embedding stays float and is a larger share of a smaller model), which by itself "
               "would widen the gap with size; at 700M-3B params it is close to 100%.")
  lines.append(f"The paper's claim is about 700M-3B params; these models are "
               f"{small['params'] / 1e6:.3f}M-{large['params'] / 1e6:.3f}M, trained on "
               f"{bytes_per_run(args) / 1e6:.1f}M bytes each.")
  return [f"**Reading: {verdict}.** The claim: b1.58's loss approaches float's as models grow. "
          "It reproduces here only if the gap b1.58 - float (same two-stage schedule, paired "
          "per seed) shrinks from the smallest to the largest size by more than twice its "
          "standard error over seeds.", "", *(f"- {line}" for line in lines)]


def write_results(args, runner: Runner, rows: list[dict], command: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  lines = [*header("BitNet b1.58 vs float at the same schedule: the gap against model size",
                   command, runner.seconds, took=" of training, summed over runs"), "",
           f"Data: stdlib `{args.corpus}` corpus, byte tokenizer, rows of {SEQ_LEN}, batch "
           f"{args.batch_size}, {args.steps} steps ({bytes_per_run(args) / 1e6:.1f}M bytes) per "
           f"run, warmup {max(args.steps // 20, 1)} steps; AdamW, weight decay 0.1 "
           "(two-stage: off from half-way, with the drop to 0.1x the peak rate). "
           f"Learning rates swept: {', '.join(f'{lr:g}' for lr in args.learning_rates)} on seed "
           f"{args.seeds[0]} at sizes {args.sweep_sizes} (chosen by final validation loss); "
           f"seeds {', '.join(map(str, args.seeds))} at the chosen rate. Validation loss: 16 "
           "batches of the validation split, the same for every run. Mean +- sd over seeds; "
           "gaps are paired per seed.", "",
           "| size | params | ternary in b1.58 | " + " | ".join(f"{arm} val loss" for arm in ARMS)
           + " | gap b1.58 - float (two-stage) | gap b1.58 - float (cosine) | seeds |",
           "|---|---|---|" + "---|" * (len(ARMS) + 3)]
  for r in rows:
    cells = [describe(mean_sd(list(r["losses"][arm].values()))) if r["losses"].get(arm) else "-"
             for arm in ARMS]
    gaps = [describe(mean_sd(r[name])) if r[name] else "-" for name in ("gap", "gap_own")]
    seeds = min((len(v) for v in r["losses"].values()), default=0)
    lines.append(f"| {r['size']} | {r['params'] / 1e6:.3f}M | {100 * r['ternary_share']:.0f}% | "
                 + " | ".join(cells + gaps)
                 + f" | {seeds} |")
  lines += ["", "Chosen learning rates, and the drop of the validation loss over the last "
            f"{100 * TAIL:.0f}% of steps (seed mean; near convergence: under {NEAR_CONVERGED}):",
            "",
            "| size | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
  for r in rows:
    lines.append(f"| {r['size']} | " + " | ".join(
        f"lr {r['lr'][arm]:g}, drop {tail_drop(r['curves'][arm], TAIL):.3f}" if r["curves"].get(arm)
        else "-" for arm in ARMS) + " |")
  sweep = [(size, arm) for size in args.sweep_sizes.split(",") for arm in ARMS]
  lines += ["", f"Sweep (seed {args.seeds[0]}, final validation loss):", "",
            "| size | arm | " + " | ".join(f"lr {lr:g}" for lr in args.learning_rates) + " |",
            "|---|---|" + "---|" * len(args.learning_rates)]
  for size, arm in sweep:
    cells = [runner.runs.get((size, arm, lr, args.seeds[0])) for lr in args.learning_rates]
    lines.append(f"| {size} | {arm} | "
                 + " | ".join(f"{final_loss(c):.4f}" if c else "-" for c in cells) + " |")
  lines += ["", *reading(args, rows)]
  if runner.missing:
    lines += ["", f"Missing ({len(runner.missing)} runs not started: they would have ended "
              "past the deadline): " + "; ".join(f"{s} {arm} lr {lr:g} seed {seed}"
                                                 for s, arm, lr, seed in runner.missing) + "."]
  write(args.out + ".md", lines)

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for name, label, color in (("gap", f"b1.58 - {FLOAT_SAME}", "black"),
                             ("gap_own", f"b1.58 - {FLOAT_OWN}", "grey")):
    points = [(r["params"], *mean_sd(r[name])) for r in rows if r[name]]
    if points:
      x, mean, sd = np.array(points).T
      axes[0].errorbar(x, mean, yerr=np.nan_to_num(sd), marker="o", capsize=4, label=label,
                       color=color, linestyle="-" if name == "gap" else ":")
  axes[0].axhline(0, color="grey", lw=0.8)
  axes[0].set(xscale="log", xlabel="parameters", ylabel="val loss gap (nats/byte)",
              title="gap vs size (mean +- sd over seeds)")
  axes[0].set_xticks([r["params"] for r in rows], [f"{r['params'] / 1e6:.2g}M" for r in rows])
  axes[0].minorticks_off()
  # Colour: the size; line style: the arm (both panels).
  colors = dict(zip(args.sizes.split(","), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  styles = dict(zip(ARMS, ("-", "--", ":")))
  for r in rows:
    for arm, curves in r["curves"].items():
      if curves:
        steps = np.array(curves[0])[:, 0]
        mean = np.mean([np.array(c)[:, 1] for c in curves], axis=0)
        axes[1].plot(steps, mean, styles[arm], color=colors[r["size"]], marker=".",
                     label=f"{r['size']} {arm}")
  axes[1].set(xlabel="step", ylabel="val loss (nats/byte)",
              title="validation curves (seed mean, chosen lr)")
  for size, arm in sweep:
    points = [(lr, final_loss(runner.runs[size, arm, lr, args.seeds[0]]))
              for lr in args.learning_rates if (size, arm, lr, args.seeds[0]) in runner.runs]
    if points:
      axes[2].plot(*np.array(points).T, styles[arm], color=colors[size], marker="o",
                   label=f"{size} {arm}")
  axes[2].set(xscale="log", xlabel="peak learning rate", ylabel="final val loss",
              title=f"learning-rate sweep (seed {args.seeds[0]})")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--gpu", action="store_true", help="the lent-GPU preset (PRESETS)")
  parser.add_argument("--sizes", help=f"comma-separated, of {list(SIZES)}")
  parser.add_argument("--sweep_sizes", help="sizes whose learning rates are swept")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--learning_rates", default="1e-3,3e-3,1e-2,3e-2,1e-1")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--corpus", default="full", choices=["full", "tiny"])
  parser.add_argument("--deadline", help="HH:MM UTC: start no run that would end after it")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "bitnet_vs_fp"))
  args = parser.parse_args()
  preset = PRESETS["gpu" if args.gpu else "cpu"]
  for key, value in preset.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  command = (f"python experiments/bitnet_vs_fp.py --workdir {args.workdir} --sizes {args.sizes} "
             f"--sweep_sizes {args.sweep_sizes} --steps {args.steps} --batch_size "
             f"{args.batch_size} --learning_rates {args.learning_rates} --seeds {args.seeds} "
             f"--corpus {args.corpus}" + (f" --deadline {args.deadline}" if args.deadline else ""))
  args.learning_rates = [float(lr) for lr in args.learning_rates.split(",")]
  args.seeds = [int(seed) for seed in args.seeds.split(",")]
    # A rate's seeds compile the same programs: the persistent cache compiles them once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  counts = {size: param_counts(size) for size in args.sizes.split(",")}
  params = {size: count for size, (count, _) in counts.items()}
  runner = Runner(deadline_timestamp(args.deadline))
  rates = chosen_rates(args, runner, params)
  for seed in args.seeds:  # seed by seed, so that a deadline leaves whole seeds of every size
    for size in args.sizes.split(","):
      for arm in ARMS:
        if (size, arm) in rates:
          get(args, runner, params, size, arm, rates[size, arm], seed)
  rows = summarise(args, runner, rates, counts)
  write_results(args, runner, rows, command)


if __name__ == "__main__":
  main()

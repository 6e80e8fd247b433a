"""bGPT converting symbolic music (Wu et al. 2024, "Beyond Language Models"): does a bGPT learn
to convert ABC <-> MIDI, i.e. write each output file at fewer bits per byte than a model of that
format alone?

    python experiments/bgpt_abc_midi.py --workdir /tmp/bgpt_abc_midi [--gpu] [--steps N]
        [--batch_size B] [--learning_rate LR] [--seeds 0,1] [--evals 8] [--deadline HH:MM]
        [--data_dir DIR] [--out experiments/results/bgpt_abc_midi]

The variable is the conditioning. Per direction two arms, the same bGPT, steps, batch, learning
rate and tunes in the same order (a seed sets the init and the data order of both):

  conversion   rows of the input file, the separator patch, the output file, the end patch
               (`data.byte_dataset` `abc_to_midi` / `midi_to_abc`);
  alone        rows of the output file and the end patch (`midi` / `abc`): the control, that
               format modelled on its own.

The measure: bits per byte of the output file's bytes (not its patch padding nor the end patch)
on the same held-out tunes, from each arm's logits, at each of `--evals` checkpoints (the curves
against step). A direction's conversion counts as learned only where its conversion arm ends
below its control by more than twice the standard error of the seeds' paired differences and
at under LEARNED_RATIO of the control's bits per byte. Where it does not, the reading says
whether the curves and the gap between them were still moving over the last TAIL of the steps.

The tunes are short, so that a small model can learn the mapping in minutes: the `abc_midi`
build `short` (data/byte_datasets.py): each of music21's corpus tunes cut to its first 2 bars,
with only the header fields its MIDI depends on (meter, unit length, tempo, key; no title),
repeats skipped; 8000 train tunes, 200 validation, MIDI written by music21 from the cut ABC.
Rows of SEQ_LEN bytes hold about 95% of the pairs whole; training crops the rest (their output's
end), scoring uses the validation tunes whose pair fits whole (the same tunes for every arm).
The paper's variable is the direction and its conditioning, not tune length.

Time budget: the CPU preset (the 1.16M-parameter bGPT of experiments/bgpt_cpu_states.py,
`MODEL`; 4 arms x 2 seeds of 500 steps of 32 rows, 2 epochs) is sized for about 20 minutes of 2
idle CPU cores (estimated; measured: 70 minutes of training, about 1 s a step, on 2 cores shared
with three other experiments, load 6-8). `--gpu` is the preset for a lent GPU: the paper's
110M bGPT, 3 seeds, 2000 steps of 64 rows (16 epochs; estimated at 1-2 minutes a run on one
H100, not yet run): a model 100x larger trained 8x longer, which tests whether a conversion the
CPU model does not learn needs only scale.
Re-running on the same workdir reuses finished runs and their scores; with `--deadline` (UTC) no
run starts that would end after it, and the results name the missing runs.
"""
import argparse
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from bgpt_cpu_states import MODEL, add_common_flags, byte_run_config
from llm_research import data, training
from llm_research.checkpoints import Checkpointer
from llm_research.data import byte_rows, pipeline
from llm_research.models import bgpt
from llm_research.sample import read_config
from report import header, write
from runs import Runner, deadline_timestamp, describe, mean_sd, tail_drop

# direction -> its arms' byte datasets (conversion; the output format alone: the control) and
# which of a pair (ABC, MIDI) is its output
DIRECTIONS = {"ABC -> MIDI": dict(conversion="abc_to_midi", alone="midi", output=1),
              "MIDI -> ABC": dict(conversion="midi_to_abc", alone="abc", output=0)}
ARMS = ("conversion", "alone")
BUILD = "short"
SEQ_LEN = 288  # 18 patches of 16
PRESETS = {
    "cpu": dict(model={}, steps=500, batch_size=32, learning_rate=2e-3, seeds="0,1"),
    "gpu": dict(model=bgpt.PRESETS["paper"], steps=2000, batch_size=64, learning_rate=3e-4,
                seeds="0,1,2"),
}
LEARNED_RATIO = 0.8  # "well below": the conversion's bits per byte under this share of alone's
TAIL = 0.25  # the share of the steps over which a curve counts as still falling


def run_config(dataset: str, seed: int, args):
  config = byte_run_config(dataset, BUILD, SEQ_LEN, args, steps=args.steps,
                           batch_size=args.batch_size, evals=args.evals,
                           **{**args.model, "max_patches": SEQ_LEN // 16})
  every = max(args.steps // args.evals, 1)
  config.train.update(seed=seed, checkpoint_every=every, keep_checkpoints=args.evals)
  config.data.shuffle_seed = seed
  return config


def held_out_pairs(args) -> list[tuple[np.ndarray, np.ndarray]]:
  """The validation (ABC, MIDI) pairs whose conversion row of SEQ_LEN holds them whole."""
  config = run_config("abc_to_midi", 0, args).data
  source = pipeline.load_source(config, "validation")
  pairs = [source[i]["parts"] for i in range(len(source))]
  return [(abc, midi) for abc, midi in pairs
          if byte_rows.laid_out_length([len(abc), len(midi)], 16) <= SEQ_LEN - 16]


def rows_and_outputs(pairs, direction: str, arm: str) -> tuple[dict, np.ndarray]:
  """The rows of `arm` of `direction` made of `pairs`, and a mask of their output files'
  bytes."""
  output = DIRECTIONS[direction]["output"]
  rows, mask = [], np.zeros((len(pairs), SEQ_LEN), bool)
  for i, pair in enumerate(pairs):
    source, target = pair[1 - output], pair[output]
    converting = arm == "conversion"
    start = -(-len(source) // 16) * 16 + 16 if converting else 0  # after the separator patch
    rows.append(byte_rows.make_row([source, target] if converting else [target], SEQ_LEN, 16))
    mask[i, start:start + len(target)] = True
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}, mask


def checkpoint_params(workdir: str):
  """(step, model config, params) of each checkpoint the run kept, oldest first."""
  config = read_config(workdir)
  trainer = training.Trainer(config, data.get_tokenizer(config.data))
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, read_only=True)
  restore = ocp.args.Composite(state=ocp.args.StandardRestore(trainer.abstract_state()))
  for step in sorted(checkpointer.manager.all_steps()):
    state = checkpointer.manager.restore(step, args=restore).state
    yield step, trainer.model_config, trainer.model_params(state)
  checkpointer.close()


def output_curve(workdir: str, pairs, direction: str, arm: str) -> list[list[float]]:
  """[step, bits per byte of the output files of `pairs`] at each kept checkpoint; kept in the
  workdir (`output_bits.json`), so a re-run reads it back."""
  path = os.path.join(workdir, "output_bits.json")
  if os.path.isfile(path):
    return json.load(open(path))
  batch, mask = rows_and_outputs(pairs, direction, arm)
  curve = []
  for step, model_config, params in checkpoint_params(workdir):
    logits = jax.jit(model_config.make_model().apply)(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    nll = np.asarray(jax.nn.logsumexp(logits, axis=-1) - np.take_along_axis(
        logits, batch["targets"][..., None], axis=-1)[..., 0])  # nats, [rows, SEQ_LEN]
    curve.append([step, float(nll[mask].sum() / mask.sum() / math.log(2))])
  with open(path, "w") as f:
    json.dump(curve, f)
  return curve


def paired(results: dict, direction: str) -> list[int]:
  """The seeds of which both of `direction`'s arms finished."""
  seeds = {seed for d, _, seed in results if d == direction}
  return sorted(s for s in seeds if all((direction, arm, s) in results for arm in ARMS))


def final_bits(results: dict, direction: str, arm: str, seeds: list[int]) -> list[float]:
  return [results[direction, arm, seed]["output"][-1][1] for seed in seeds]


def mean_curve(results: dict, direction: str, arm: str, seeds: list[int]) -> np.ndarray:
  """[step, bits per byte] averaged over `seeds` (the same steps in every run)."""
  return np.mean([results[direction, arm, seed]["output"] for seed in seeds], axis=0)


def direction_summary(results: dict, direction: str) -> dict | None:
  """The paired comparison of `direction`'s arms at the end, the curves' tails, and the
  verdict (module docstring); None with no seed of both arms."""
  seeds = paired(results, direction)
  if not seeds:
    return None
  conversion, alone = (final_bits(results, direction, arm, seeds) for arm in ARMS)
  gain, sd = mean_sd(np.subtract(alone, conversion))
  se = sd / math.sqrt(len(seeds))
  ratio = np.mean(conversion) / np.mean(alone)
  curves = {arm: mean_curve(results, direction, arm, seeds) for arm in ARMS}
  gain_curve = curves["alone"][:, 1] - curves["conversion"][:, 1]
  steps = curves["alone"][:, 0]
  beyond_spread = len(seeds) > 1 and gain > 2 * se
  return dict(
      seeds=seeds, conversion=mean_sd(conversion), alone=mean_sd(alone), gain=gain, se=se,
      ratio=ratio, beyond_spread=beyond_spread,
      learned=beyond_spread and ratio < LEARNED_RATIO,
      drops={arm: tail_drop([results[direction, arm, s]["output"] for s in seeds], TAIL)
             for arm in ARMS},
      # How much the gain (alone - conversion) grew over the last TAIL of the steps.
      gain_growth=gain_curve[-1] - np.interp(steps[-1] * (1 - TAIL), steps, gain_curve))


def reading(summaries: dict, args) -> list[str]:
  """The verdict on the claim, per direction, from the numbers."""
  measured = {d: s for d, s in summaries.items() if s is not None}
  learned = [d for d, s in measured.items() if s["learned"]]
  verdict = ("reproduced in both directions" if len(learned) == len(DIRECTIONS)
             else f"reproduced for {learned[0]} only" if learned else "not reproduced")
  lines = [f"**Reading: {verdict}.** A direction's conversion counts as learned only where the "
           "output file costs fewer bits per byte after its input than modelled alone, by more "
           "than twice the standard error of the seeds' paired differences and to under "
           f"{LEARNED_RATIO}x the format alone.", ""]
  for direction, s in measured.items():
    n = len(s["seeds"])
    line = (f"{direction}: the output costs {describe(s['conversion'])} bits/byte after the "
            f"input, {describe(s['alone'])} alone (mean +- sd over {n} seed{'s' * (n > 1)}): "
            f"{describe((s['gain'], s['se']))} (+- standard error) less given the input, "
            f"{s['ratio']:.2f}x. ")
    if s["learned"]:
      line += "The conversion is learned."
    elif s["beyond_spread"]:
      line += (f"The input helps beyond the seed spread, but not to under {LEARNED_RATIO}x: "
               "part of the mapping, not the conversion.")
    elif n < 2:
      line += "One seed: no spread to compare with."
    else:
      line += "The input does not help beyond the seed spread."
    if not s["learned"]:
      line += (f" Over the last {TAIL:.0%} of the {args.steps} steps the bits per byte fell by "
               f"{s['drops']['conversion']:.3f} (conversion) and {s['drops']['alone']:.3f} "
               f"(alone), and the gain {'grew' if s['gain_growth'] > 0 else 'fell'} by "
               f"{abs(s['gain_growth']):.3f}"
               + ("." if n < 2 else
                  ": still growing beyond the seeds' standard error, so more training may show "
                  "more of the conversion." if s["gain_growth"] > s["se"] else
                  ": not growing beyond the seeds' standard error, so at this model size and "
                  "data more steps are unlikely to change the verdict."))
    lines += [f"- {line}"]
  missing = [d for d in DIRECTIONS if d not in measured]
  if missing:
    lines.append(f"- {', '.join(missing)}: no seed of both arms finished.")
  return lines


def write_results(args, runner: Runner, results: dict, pairs, command: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  summaries = {d: direction_summary(results, d) for d in DIRECTIONS}
  model = {**MODEL, **args.model, "max_patches": SEQ_LEN // 16}
  params = bgpt.BgptConfig(vocab_size=bgpt.VALUES, **model).num_params()
  rows = args.steps * args.batch_size
  abc_bytes, midi_bytes = (sum(len(pair[i]) for pair in pairs) for i in (0, 1))
  lines = header("bGPT: ABC <-> MIDI conversion against each format modelled alone", command,
                 runner.seconds, took=" of training, summed over runs")
  lines += [
      f"Model: bGPT {model}, {params / 1e6:.2f}M params, the same for every arm.  ",
      f"Data: `abc_midi/{BUILD}`: music21's corpus tunes cut to their first 2 bars and the "
      "header fields the MIDI depends on (M, L, Q, K), 8000 train, 200 validation; rows of "
      f"{SEQ_LEN} bytes.  ",
      f"Training: {args.steps} steps of batch {args.batch_size} ({rows / 8000:.1f} epochs), "
      f"learning rate {args.learning_rate} (10% warmup, cosine), every arm of a seed on the same "
      "tunes in the same order; conversion rows: input file, separator patch, output file, "
      "end patch; alone rows: the output file, end patch.  ",
      f"Measured: bits per byte of the output files' bytes of the {len(pairs)} validation tunes "
      f"whose pair fits a row whole ({abc_bytes} bytes of ABC, {midi_bytes} of MIDI), from each "
      f"arm's logits at each of its {args.evals} checkpoints; the gain is alone - conversion, "
      "paired per seed (mean +- standard error), the ratio conversion / alone.",
      "",
      "| direction | conversion bits/byte | alone bits/byte | gain (+- se) | ratio | "
      f"drop over last {TAIL:.0%}: conversion, alone | gain's growth then | seeds |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for direction, s in summaries.items():
    if s is not None:
      lines.append(
          f"| {direction} | {describe(s['conversion'])} | {describe(s['alone'])} | "
          f"{describe((s['gain'], s['se']))} | {s['ratio']:.2f} | "
          f"{s['drops']['conversion']:.3f}, {s['drops']['alone']:.3f} | "
          f"{s['gain_growth']:+.3f} | {len(s['seeds'])} |")
  lines += ["", "Per run (output bits/byte at the end and its minimum over checkpoints; the "
            "trainer's validation and last training loss over whole rows, nats/byte):", "",
            "| direction | arm | seed | output bits/byte (min) | row val loss | row train loss "
            "| train s |", "|---|---|---|---|---|---|---|"]
  for (direction, arm, seed), r in sorted(results.items()):
    bits = [b for _, b in r["output"]]
    lines.append(f"| {direction} | {arm} | {seed} | {bits[-1]:.3f} ({min(bits):.3f}) | "
                 f"{r['curve'][-1][1]:.3f} | {r['train_curve'][-1][1]:.3f} | "
                 f"{r['seconds']:.0f} |")
  lines += ["", *reading(summaries, args)]
  if runner.missing:
    lines += ["", f"Missing ({len(runner.missing)} runs not started: they would have ended past "
              "the deadline): " + "; ".join(f"{d} {arm} seed {seed}"
                                            for d, arm, seed in runner.missing) + "."]
  write(args.out + ".md", lines)

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, (direction, s) in zip(axes, summaries.items()):
    for arm, style in zip(ARMS, ("o-", "s--")):
      for seed in (s["seeds"] if s else []):
        ax.plot(*np.array(results[direction, arm, seed]["output"]).T, style, markersize=3,
                color="C0" if arm == "conversion" else "C1", alpha=0.8,
                label=f"{arm}" if seed == s["seeds"][0] else None)
    ax.set(xlabel="step", ylabel="output bits per byte (held-out tunes)",
           title=f"{direction}: given the input vs the format alone")
    ax.legend()
  for direction, s in summaries.items():
    if s is not None:
      conversion, alone = (mean_curve(results, direction, arm, s["seeds"]) for arm in ARMS)
      axes[2].plot(conversion[:, 0], conversion[:, 1] / alone[:, 1], "o-", label=direction)
  axes[2].axhline(LEARNED_RATIO, color="gray", linestyle=":", label="learned below this")
  axes[2].axhline(1, color="black", linewidth=0.8)
  axes[2].set(xlabel="step", ylabel="conversion / alone (seed mean)",
              title="ratio of the output's bits per byte")
  axes[2].legend()
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_common_flags(parser, "experiments/results/bgpt_abc_midi", learning_rate=None,
                   eval_rows=200)
  parser.add_argument("--gpu", action="store_true",
                      help="the preset for a lent GPU (the paper's 110M bGPT, 3 seeds)")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--batch_size", type=int)
  parser.add_argument("--seeds")
  parser.add_argument("--evals", type=int, default=8,
                      help="checkpoints scored per run (the curves' points)")
  parser.add_argument("--deadline", help="HH:MM UTC: start no run that would end after it")
  args = parser.parse_args()
  preset = PRESETS["gpu" if args.gpu else "cpu"]
  for key in ("learning_rate", "seeds", "steps", "batch_size"):
    if getattr(args, key) is None:
      setattr(args, key, preset[key])
  args.model = preset["model"]
  command = (f"python experiments/bgpt_abc_midi.py --workdir {args.workdir}"
             + (" --gpu" if args.gpu else "")
             + f" --steps {args.steps} --batch_size {args.batch_size} --learning_rate "
             f"{args.learning_rate} --seeds {args.seeds} --evals {args.evals}"
             + (f" --deadline {args.deadline}" if args.deadline else ""))
  # The arms compile the same programs (same shapes): the persistent cache compiles them once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  pairs = held_out_pairs(args)
  runner = Runner(deadline_timestamp(args.deadline))
  results = {}
  for seed in map(int, args.seeds.split(",")):  # seed by seed: a deadline leaves whole seeds
    for direction, datasets in DIRECTIONS.items():
      for arm in ARMS:
        workdir = os.path.join(args.workdir, f"{datasets[arm]}_seed{seed}")
        run = runner.get((direction, arm, seed),
                         lambda: run_config(datasets[arm], seed, args), workdir)
        if run is not None:
          results[direction, arm, seed] = dict(run, output=output_curve(workdir, pairs,
                                                                        direction, arm))
  write_results(args, runner, results, pairs, command)


if __name__ == "__main__":
  main()

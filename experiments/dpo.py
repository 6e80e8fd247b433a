"""DPO (Rafailov et al., "Direct Preference Optimization") on preference pairs from bGPT's CPU
simulator: does DPO raise the chosen-over-rejected log-prob margin on held-out pairs, and do the
model's own next states move toward the chosen (correct) ones?

    python experiments/dpo.py --workdir /tmp/dpo [--sft_steps 400] [--steps 160] [--evals 4]
        [--beta 0.1] [--learning_rate 1e-3] [--dpo_learning_rates 1e-4,1e-5,1e-6] [--seeds 0,1,2]
        [--out experiments/results/dpo]

The pairs are `data.preference_dataset=cpu_states` (llm_research/data/preferences.py): a program
of 1 to 4 instructions and the states it ran through so far (hex text) as the prompt; the next
state as the simulator computes it, chosen; that state with the instruction's result wrong,
rejected. A small transformer (`MODEL`, byte tokenizer) first trains with `train.method=standard`
on the pairs' chosen texts (`--sft_steps`): the model DPO starts from and its reference. From it
(`train.init_from`), two arms train `--steps` more steps on the same batches, each at a
constant learning rate:

  dpo   `train.method=dpo`, beta `--beta`, one arm per `--dpo_learning_rates`: lower than
        SFT's, as in the paper and TRL (at SFT's 1e-3 DPO drove log pi(chosen) from -9 to -67
        nats in 160 steps and the model stopped producing states at all);
  sft   `train.method=standard` on the chosen texts at SFT's `--learning_rate`: more of the
        same supervised data at equal steps (the control: does DPO add what more supervised
        training does not?).

Each arm is evaluated at `--evals` points on the held-out split (other seeds than training's):
the mean of log pi(chosen|x) - log pi(rejected|x) over every held-out pair, and, for every
held-out prompt, the next state generated greedily, scored against the simulator (a state is
right when all 16 bytes are). The reading compares each arm's end with the start, pair by pair
(a change counts when it exceeds twice its standard error) and with each other. Writes
`<out>.md` (the table and the reading) and `<out>.png` (margin and generated-state accuracy vs
step). Re-running on the same workdir reads finished runs back.
"""
import argparse
import os
import time

import jax
import numpy as np

from llm_research import data
from llm_research.config import base_config
from llm_research.data import preferences
from llm_research.metrics import read_metrics
from llm_research.sample import load_run, sample_texts
from llm_research.training import dpo, train_and_evaluate
from report import header, write

MODEL = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=176)
SEQ_LEN = 256
BATCH = 16
RESPONSE_TOKENS = 37  # a state's line: 36 characters and eos


def run_config(args, method: str, steps: int, seed: int, learning_rate: float,
               init_from: str = ""):
  config = base_config()
  config.model.update(**MODEL)
  config.data.update(source="preferences", preference_dataset="cpu_states", tokenizer="byte",
                     seq_len=SEQ_LEN, data_dir=os.path.join(args.workdir, "tfds"),
                     cache_dir=os.path.join(args.workdir, "cache"), shuffle_seed=seed)
  # A constant learning rate after warmup (final_lr_fraction 1), so that a run trained in
  # segments (train.steps raised at each evaluation point) follows one trajectory.
  config.train.update(method=method, steps=steps, batch_size=BATCH,
                      learning_rate=learning_rate, warmup_steps=20, final_lr_fraction=1.0,
                      seed=seed, init_from=init_from, log_every=10, eval_every=10 ** 9,
                      eval_batches=8, checkpoint_every=10 ** 9, keep_checkpoints=1,
                      progress_bar=False)
  config.dpo.beta = args.beta
  return config


def train(config, workdir: str) -> float:
  """Trains `workdir` to config.train.steps unless it is there; the seconds this segment took,
  kept in the workdir (`wall_seconds_<steps>`) so that a re-run reading it back reports them."""
  path = os.path.join(workdir, f"wall_seconds_{config.train.steps}")
  if os.path.isfile(path):
    return float(open(path).read())
  start = time.perf_counter()
  train_and_evaluate(config, workdir)
  seconds = time.perf_counter() - start
  with open(path, "w") as f:
    f.write(f"{seconds:.1f}\n")
  return seconds


def evaluated(workdir: str, prompts: int, steps: int) -> dict:
  """`held_out` of the run's checkpoint at `steps` (its newest, just trained), kept in the
  workdir so that a re-run reads each evaluation point back (the run itself keeps only its
  newest checkpoint)."""
  path = os.path.join(workdir, f"held_out_step{steps}_{prompts}prompts.npz")
  if not os.path.isfile(path):
    result = held_out(workdir, prompts)
    assert result["step"] == steps, (workdir, result["step"], steps)
    np.savez(path, **result)
  return {k: v.item() if v.ndim == 0 else v for k, v in np.load(path).items()}


def held_out(workdir: str, prompts: int) -> dict:
  """The run's newest params on the validation split: per-pair margins (log pi(chosen|x) - log
  pi(rejected|x)) over every pair, and the generated next state's correctness per prompt."""
  config, tokenizer, model_config, params, step = load_run(workdir)
  model = model_config.make_model()
  logps = jax.jit(lambda p, batch: dpo.pair_logps(model, p, batch))
  margins, chosen = [], []
  for batch in data.make_eval_iterator(config.data, tokenizer, global_batch_size=BATCH,
                                       process_index=0, process_count=1):
    logp_chosen, logp_rejected, present = map(np.asarray, logps(params, batch))
    margins.append((logp_chosen - logp_rejected)[present > 0])
    chosen.append(logp_chosen[present > 0])
  pairs = preferences.CpuStatePairs("validation")
  cases = [pairs.case(i) for i in range(prompts)]
  texts = sample_texts(config, tokenizer, model_config, params,
                       [pairs[i]["prompt"] for i in range(prompts)], temperature=0.0,
                       max_new_tokens=RESPONSE_TOKENS)
  right_bytes, right_states = [], []
  for (_, states, k), text in zip(cases, texts):
    generated = preferences.parse_state(text) or b""
    same = [a == b for a, b in zip(generated, states[k])] + [False] * (16 - len(generated))
    right_bytes.append(np.mean(same))
    right_states.append(all(same))
  return {"step": step, "margins": np.concatenate(margins), "logp_chosen": np.concatenate(chosen),
          "state_right": np.array(right_states, float), "byte_right": np.array(right_bytes),
          "eval_loss": read_metrics(workdir)[-1].get("eval_loss", float("nan"))}


def change(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
  """(mean of after - before, its standard error): the same pairs or prompts, paired."""
  diff = after - before
  return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def direction(mean: float, standard_error: float) -> str:
  """A change in words: beyond twice its standard error either way, or not."""
  if abs(mean) <= 2 * standard_error:
    return "no clear change"
  return "a rise" if mean > 0 else "a fall"


def dpo_arms(results: dict) -> list[str]:
  """The DPO arms' labels (one per DPO learning rate), as the results hold them."""
  return [arm for arm in next(iter(results.values())) if arm.startswith("dpo")]


def reading(results: dict) -> list[str]:
  """What the numbers say about the claim, per DPO learning rate and seed."""
  lines, reproduced_at, collapsed_at = [], [], []
  for arm in dpo_arms(results):
    verdicts = []
    for seed, arms in results.items():
      start, dpo_end, sft_end = arms[arm][0], arms[arm][-1], arms["sft"][-1]
      margin, margin_se = change(start["margins"], dpo_end["margins"])
      state, state_se = change(start["state_right"], dpo_end["state_right"])
      chosen, chosen_se = change(start["logp_chosen"], dpo_end["logp_chosen"])
      vs_state, vs_state_se = change(sft_end["state_right"], dpo_end["state_right"])
      margin_up, state_up = margin > 2 * margin_se, state > 2 * state_se
      verdicts.append(margin_up and state_up)
      if margin_up and chosen < -2 * chosen_se:
        collapsed_at.append(arm)
      lines.append(
          f"{arm}, seed {seed}: after {dpo_end['step']} steps the held-out margin moved by "
          f"{margin:+.2f} nats (standard error {margin_se:.2f}: "
          f"{direction(margin, margin_se)}), log pi(chosen) by {chosen:+.2f} "
          f"({chosen_se:.2f}) nats, and the generated next states' accuracy by "
          f"{100 * state:+.1f} points ({100 * state_se:.1f}: {direction(state, state_se)}); "
          f"against the SFT control at equal steps, {100 * vs_state:+.1f} "
          f"({100 * vs_state_se:.1f}) points.")
    if all(verdicts):
      reproduced_at.append(arm)
    lines.append("")
  arms = dpo_arms(results)
  if reproduced_at:
    verdict = f"reproduced for {', '.join(reproduced_at)}, every seed"
    if len(reproduced_at) < len(arms):
      verdict += f"; not for {', '.join(a for a in arms if a not in reproduced_at)}"
  else:
    verdict = "not reproduced at any DPO learning rate tried"
  why = []
  if collapsed_at:
    arms_named = ", ".join(sorted(set(collapsed_at)))
    why = [f"Where the margin rose while log pi(chosen) fell ({arms_named}), "
           "DPO widened the gap by lowering both responses' likelihood, the rejected one faster: "
           "the failure Pal et al. (2024, DPO-Positive) describe for pairs a few tokens apart, "
           "as these are (a rejected state differs from the chosen one only in the values the "
           "instruction changes, and shares its format and the rest of its bytes)."]
  return [f"**Reading: {verdict}.** The claim: DPO raises the chosen-over-rejected margin on "
          "held-out pairs and moves what the model generates toward the chosen responses. A "
          "seed reproduces it when both rise from the SFT start by more than twice their "
          "standard error (paired over the same held-out pairs and prompts).", "",
          *lines, *why]


def write_results(results: dict, args, seconds: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  command = (f"python experiments/dpo.py --workdir {args.workdir} --sft_steps {args.sft_steps} "
             f"--steps {args.steps} --evals {args.evals} --beta {args.beta} "
             f"--learning_rate {args.learning_rate} "
             f"--dpo_learning_rates {args.dpo_learning_rates} --prompts {args.prompts} "
             f"--seeds {args.seeds}")
  lines = [*header("DPO on CPU-state preference pairs: held-out margins and generated states",
                   command, seconds, took=" of training"), "",
           f"Model: {MODEL}, byte tokenizer, rows of {SEQ_LEN} tokens, batch {BATCH}, "
           f"constant learning rates after 20 warmup steps: {args.learning_rate} for SFT and "
           f"the sft arm, {args.dpo_learning_rates} for the DPO arms. SFT {args.sft_steps} "
           f"steps on the chosen texts, then {args.steps} steps of each arm from it; beta "
           f"{args.beta}. Held out: every validation pair (margins) and {args.prompts} prompts "
           "(greedy next state, scored by the simulator).", "",
           "| seed | arm | step | margin (nats) | pairs with margin > 0 | log pi(chosen) | "
           "generated states right | bytes right | eval loss (chosen texts) |",
           "|---|---|---|---|---|---|---|---|---|"]
  for seed, arms in results.items():
    for index, (arm, points) in enumerate(arms.items()):
      for point in points[(0 if index == 0 else 1):]:
        lines.append(
            f"| {seed} | {arm if point is not points[0] else 'start (SFT)'} | {point['step']} | "
            f"{point['margins'].mean():.2f} | {100 * (point['margins'] > 0).mean():.1f}% | "
            f"{point['logp_chosen'].mean():.2f} | {100 * point['state_right'].mean():.1f}% | "
            f"{100 * point['byte_right'].mean():.1f}% | {point['eval_loss']:.4f} |")
  lines += ["", *reading(results)]
  write(args.out + ".md", lines)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arm in [*dpo_arms(results), "sft"]:
    runs = [arms[arm] for arms in results.values()]
    steps = [p["step"] for p in runs[0]]
    for ax, value in ((axes[0], lambda p: p["margins"].mean()),
                      (axes[1], lambda p: 100 * p["state_right"].mean())):
      values = np.array([[value(p) for p in run] for run in runs])  # [seeds, points]
      line, = ax.plot(steps, values.mean(0), "--" if arm == "sft" else "-", marker="o",
                      label=f"{arm} ({len(runs)} seeds)")
      ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
  axes[0].set(xlabel="steps after SFT", ylabel="held-out log pi(chosen) - log pi(rejected)",
              title="margin on held-out pairs (seed mean, band: min-max)")
  axes[1].set(xlabel="steps after SFT", ylabel="% of generated next states right",
              title="greedy next state, scored by the simulator")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--sft_steps", type=int, default=400)
  parser.add_argument("--steps", type=int, default=160)
  parser.add_argument("--evals", type=int, default=4)
  parser.add_argument("--beta", type=float, default=0.1)
  parser.add_argument("--learning_rate", type=float, default=1e-3, help="SFT's")
  parser.add_argument("--dpo_learning_rates", default="1e-4,1e-5,1e-6",
                      help="one DPO arm per learning rate (comma-separated)")
  parser.add_argument("--prompts", type=int, default=500)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "dpo"))
  args = parser.parse_args()
  seconds, results = 0.0, {}
  for seed in map(int, args.seeds.split(",")):
    root = os.path.join(args.workdir, f"seed{seed}")
    sft = os.path.join(root, "sft_start")
    seconds += train(run_config(args, "standard", args.sft_steps, seed, args.learning_rate), sft)
    start = evaluated(sft, args.prompts, args.sft_steps)
    results[seed] = {}
    arms = [(f"dpo lr {lr:g}", "dpo", lr, f"dpo_lr{lr:g}")
            for lr in map(float, args.dpo_learning_rates.split(","))]
    arms.append(("sft", "standard", args.learning_rate, f"sft_lr{args.learning_rate:g}"))
    for arm, method, learning_rate, name in arms:
      points = [{**start, "step": 0}]  # the arms count their steps from the start
      for k in range(1, args.evals + 1):
        steps = args.steps * k // args.evals
        seconds += train(run_config(args, method, steps, seed, learning_rate, init_from=sft),
                         os.path.join(root, name))
        points.append(evaluated(os.path.join(root, name), args.prompts, steps))
      results[seed][arm] = points
  write_results(results, args, seconds)


if __name__ == "__main__":
  main()

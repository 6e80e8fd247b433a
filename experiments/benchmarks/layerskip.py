"""LayerSkip: early exit and self-speculative decoding on a small model trained with and without
LayerSkip (layer dropout and the early-exit loss), as the paper's tables compare them.

    python experiments/benchmarks/layerskip.py [--workdir /tmp/layerskip_bench] [--steps 400]
        [--layers 6] [--draft_tokens 4] [--new_tokens 64] [--batch 1] [--repeats 3]
        [--out experiments/results/layerskip_cpu]

Two arms train the same model (`--layers` layers of width 64, byte tokenizer, the tiny stdlib
corpus, seq_len 64, batch 16) from the same seed on the same batches: `standard`, and
`layerskip` (p_max 0.1, early-exit scale 1, every layer's exit: curriculum "none"). For each:
  - the eval loss of the early exit at every layer (the first E layers, the shared final norm and
    head) on 8 validation batches;
  - greedy decoding of `--batch` prompts from the validation text, `--new_tokens` new tokens:
    ordinary `decode.generate` (the peer, measured in the same run) and self-speculative
    decoding (`speculative.generate`, `--draft_tokens` drafts a round) at every exit layer E:
    tokens/s (median of `--repeats` runs after a warm-up), their ratio, and the
    acceptance rate. Both outputs are the full model's greedy text (checked here).
Writes `<out>.md` (tables, machine, date, jax, commit, the reading) and `<out>.png` (eval loss
per exit layer; acceptance rate and speed-up against E). Re-running on the same workdir reads
the finished runs back.
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_research import data, decode, speculative
from llm_research.config import base_config
from llm_research.metrics import median_seconds, read_metrics
from llm_research.models.stack import LayerPlan
from llm_research.sample import load_run
from llm_research.training import train_and_evaluate
from llm_research.training.objective import target_log_probs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
from report import header, write  # noqa: E402  (experiments/report.py)

ARMS = {"standard": {}, "layerskip": {"train.method": "layerskip", "layerskip.p_max": 0.1,
                                      "layerskip.early_exit_scale": 1.0}}
EVAL_BATCHES = 8


def run_config(arm: str, args):
  config = base_config()
  config.model.update(num_layers=args.layers, embed_dim=64, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=176)
  config.data.update(source="stdlib", stdlib_config="tiny", tokenizer="byte", seq_len=64)
  config.train.update(steps=args.steps, batch_size=16, learning_rate=3e-3,
                      warmup_steps=args.steps // 10, log_every=args.steps // 4,
                      eval_every=args.steps, eval_batches=EVAL_BATCHES,
                      checkpoint_every=args.steps, progress_bar=False)
  for key, value in ARMS[arm].items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def trained(arm: str, args):
  """(model config, params, tokenizer, config) of the arm's run, trained unless finished."""
  workdir = os.path.join(args.workdir, arm)
  config = run_config(arm, args)
  metrics = os.path.join(workdir, "metrics.jsonl")
  if not (os.path.isfile(metrics) and read_metrics(workdir)[-1]["step"] == args.steps):
    train_and_evaluate(config, workdir)
  config, tokenizer, model_config, params, _ = load_run(workdir)
  return model_config, params, tokenizer, config


def exit_losses(model_config, params, tokenizer, config) -> list[float]:
  """Eval loss of the exit after each layer 1..L (L: the model), on the validation batches."""
  model = model_config.make_model(plan=LayerPlan(layer_outputs=True))

  @jax.jit
  def sums(batch):
    logits, sown = model.apply({"params": params}, batch["inputs"], batch["positions"],
                               batch["segment_ids"], mutable=["intermediates"])
    exits = jnp.concatenate([sown["intermediates"]["exit_logits"][0], logits[None]])
    log_p, _ = target_log_probs(exits, jnp.broadcast_to(batch["targets"], exits.shape[:-1]))
    weights = batch["segment_ids"] > 0
    return -jnp.sum(log_p * weights, axis=(1, 2)), jnp.sum(weights)

  nll, count = 0.0, 0.0
  batches = data.make_eval_iterator(config.data, tokenizer, global_batch_size=16,
                                    process_index=0, process_count=1, split="validation")
  for _, batch in zip(range(EVAL_BATCHES), batches):
    batch_nll, batch_count = sums(batch)
    nll, count = nll + np.asarray(batch_nll), count + float(batch_count)
  return (nll / count).tolist()


def prompts_from_validation(tokenizer, config, batch: int) -> list[list[int]]:
  """`batch` prompts of 16 tokens: the starts of validation rows."""
  rows = next(data.make_eval_iterator(config.data, tokenizer, global_batch_size=16,
                                      process_index=0, process_count=1, split="validation"))
  return [row[:16].tolist() for row in rows["inputs"][:batch]]


def speeds(model_config, params, prompts, args) -> list[dict]:
  """Ordinary and self-speculative greedy decoding at each exit layer: one row each."""
  settings = dict(max_new_tokens=args.new_tokens)
  want = decode.generate(model_config, params, prompts, **settings)
  ordinary = median_seconds(lambda: decode.generate(model_config, params, prompts, **settings),
                            args.repeats)
  tokens = len(prompts) * args.new_tokens
  rows = []
  for exit_layer in range(1, model_config.num_layers):
    runs = [speculative.generate(model_config, params, prompts, exit_layer=exit_layer,
                                 draft_tokens=args.draft_tokens, **settings)
            for _ in range(args.repeats + 1)][1:]  # the first warms the compiled run up
    assert all(new == want for new, _ in runs), "self-speculation left the greedy output"
    seconds = statistics.median(run["seconds"] for _, run in runs)
    rows.append(dict(exit_layer=exit_layer, acceptance=runs[0][1]["acceptance_rate"],
                     speculative=tokens / seconds, ordinary=tokens / ordinary))
  return rows


def reading(losses: dict, rows: dict) -> str:
  """What the numbers say, from the numbers."""
  layers = len(losses["standard"])
  middle = layers // 2 - 1  # the exit after layer L / 2
  gaps = {arm: losses[arm][middle] - losses[arm][-1] for arm in losses}
  best = {arm: max(rows[arm], key=lambda r: r["speculative"] / r["ordinary"]) for arm in rows}
  acceptance = {arm: statistics.mean(r["acceptance"] for r in rows[arm]) for arm in rows}
  exits_better = gaps["layerskip"] < gaps["standard"]
  text = (f"the exit after layer {middle + 1} of {layers} is "
          f"{gaps['layerskip']:.2f} nats above the full model with LayerSkip, "
          f"{gaps['standard']:.2f} without: LayerSkip's early exits are "
          f"{'better' if exits_better else 'not better'} at this scale "
          f"(full-model loss {losses['layerskip'][-1]:.3f} vs {losses['standard'][-1]:.3f}). "
          f"Mean acceptance over E: {acceptance['layerskip']:.2f} with LayerSkip, "
          f"{acceptance['standard']:.2f} without. ")
  for arm in ("layerskip", "standard"):
    r = best[arm]
    text += (f"Best self-speculative speed-up, {arm}: {r['speculative'] / r['ordinary']:.2f}x "
             f"at E = {r['exit_layer']}. ")
  return text + ("A speed-up needs drafts that are accepted and layers that are costly next to "
                 "the per-round overhead of the draft loop; a model this small on a CPU is "
                 "mostly overhead, so the ratios say more about acceptance than about the paper's "
                 "speed-ups.")


def write_results(losses: dict, rows: dict, args, seconds: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  device = jax.devices()[0]
  command = " ".join(["python experiments/benchmarks/layerskip.py", *sys.argv[1:]])
  layers = len(losses["standard"])
  lines = header("LayerSkip: early exit and self-speculative decoding, with and without "
                 "LayerSkip training", command, seconds)
  lines += [
      f"Device {device.device_kind} ({device.platform}). Model: {layers} layers, width 64, byte "
      f"tokenizer, tiny stdlib corpus, seq_len 64, batch 16, {args.steps} steps, lr 3e-3 "
      f"cosine; LayerSkip arm: p_max 0.1, early-exit scale 1, curriculum none. Decoding: greedy, "
      f"batch {args.batch}, 16-token prompts, {args.new_tokens} new tokens, {args.draft_tokens} "
      f"draft tokens a round; tokens/s the median of {args.repeats} runs after compilation, "
      "ordinary decoding (decode.generate) the peer in the same run; both gave the full "
      "model's greedy output.", "",
      "Eval loss of the early exit after each layer (layer L: the full model):", "",
      "| arm | " + " | ".join(f"layer {l}" for l in range(1, layers + 1)) + " |",
      "|---|" + "---|" * layers]
  for arm, arm_losses in losses.items():
    lines.append(f"| {arm} | " + " | ".join(f"{x:.3f}" for x in arm_losses) + " |")
  lines += ["", "Self-speculative (ours) vs ordinary (peer) greedy decoding, per exit layer E:",
            "", "| arm | E | acceptance | self-speculative tokens/s | ordinary tokens/s | ratio |",
            "|---|---|---|---|---|---|"]
  for arm, arm_rows in rows.items():
    for r in arm_rows:
      lines.append(f"| {arm} | {r['exit_layer']} | {r['acceptance']:.2f} | "
                   f"{r['speculative']:.1f} | {r['ordinary']:.1f} | "
                   f"{r['speculative'] / r['ordinary']:.2f}x |")
  lines += ["", "Reading: " + reading(losses, rows)]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write(args.out + ".md", lines)

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for arm in losses:
    axes[0].plot(range(1, layers + 1), losses[arm], "o-", label=arm)
    exits = [r["exit_layer"] for r in rows[arm]]
    axes[1].plot(exits, [r["acceptance"] for r in rows[arm]], "o-", label=arm)
    axes[2].plot(exits, [r["speculative"] / r["ordinary"] for r in rows[arm]], "o-", label=arm)
  axes[2].axhline(1.0, color="gray", linestyle="--")
  for ax, (xlabel, ylabel) in zip(axes, [("exit layer", "eval loss"),
                                         ("exit layer E", "acceptance rate"),
                                         ("exit layer E", "self-speculative / ordinary tokens/s")]):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
  fig.suptitle(f"LayerSkip on a {layers}-layer model ({device.platform})")
  fig.tight_layout()
  fig.savefig(args.out + ".png", dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/layerskip_bench")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--draft_tokens", type=int, default=4)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "layerskip_cpu"))
  args = parser.parse_args()
  start = time.perf_counter()
  losses, rows = {}, {}
  for arm in ARMS:
    model_config, params, tokenizer, config = trained(arm, args)
    losses[arm] = exit_losses(model_config, params, tokenizer, config)
    prompts = prompts_from_validation(tokenizer, config, args.batch)
    rows[arm] = speeds(model_config, params, prompts, args)
    print(f"{arm}: exit losses {np.round(losses[arm], 3).tolist()}", flush=True)
  write_results(losses, rows, args, time.perf_counter() - start)


if __name__ == "__main__":
  main()

"""The command line: train (and resume) an experiment in a workdir.

    python -m llm_research.main --config experiments/<name>.py --workdir <dir> \
        [--config.<key>=<value> ...]

Exit status: 0 once the run reached train.steps, 1 for input it cannot use (one `error:` line,
nothing written), 75 when SIGTERM stopped it after saving its step (re-run the same command to
resume; a wrapper that reruns until status 0 finishes the run).

Multi-host: every host runs the same command with `--multihost` (TPU pods and SLURM/GPU
clusters are detected by `jax.distributed.initialize()`), or with an explicit
`--coordinator_address`, `--num_processes` and `--process_id`.
"""
import argparse
import sys

import jax

from llm_research import config as config_lib


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m llm_research.main", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="experiments/<name>.py")
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() with auto-detection")
  parser.add_argument("--coordinator_address", help="host:port of process 0")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for i, item in enumerate(rest):
    if not item.startswith("--config."):
      parser.error(f"unrecognized argument {item!r} (config overrides look like "
                   "--config.train.steps=100)")
    key_value = item[len("--config."):]
    overrides.append(key_value)
  for item in overrides:
    if "=" not in item:
      parser.error(f"override --config.{item} needs a value: --config.{item}=<value>")
  return args, overrides


def initialize_distributed(args) -> None:
  if args.coordinator_address:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif args.multihost:
    jax.distributed.initialize()


def main(argv=None) -> dict:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return run(args, overrides)
  except config_lib.ConfigError as error:  # bad input: one line, no traceback
    sys.exit(f"error: {error}")


def _locked_key_message(error: AttributeError) -> str:
  """ml_collections' message without its dump of every other field: the key and the hint."""
  message = error.args[0] if error.args else error  # a KeyError around the text, or the text
  message = message.args[0] if isinstance(message, KeyError) and message.args else str(message)
  lines = message.splitlines()
  return " ".join([lines[0].split(" Other fields present")[0]] +
                  [line for line in lines[1:] if line.startswith("Did you mean")])


def run(args, overrides) -> dict:
  """Trains (or resumes) the run; the final eval metrics."""
  try:
    config = config_lib.load_config(args.config, overrides)
  except AttributeError as error:  # get_config() set a key the locked base config lacks
    raise config_lib.ConfigError(f"{args.config}: {_locked_key_message(error)}") from None
  initialize_distributed(args)

  from llm_research import sample, training  # after distributed init

  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"processes: {jax.process_count()}")
  try:
    final = training.train_and_evaluate(config, args.workdir)
  except training.Preempted as stopped:  # saved: a rerun resumes; a wrapper sees "not done"
    print(stopped)
    sys.exit(training.PREEMPTED_EXIT_STATUS)
  if jax.process_count() == 1 and "eval_loss" in final:  # multi-host: use llm_research.sample
    _, tokenizer, model_config, params, step = sample.load_run(args.workdir)
    if getattr(model_config, "loss_sums", None):  # its own objective (a classifier): no sample
      others = [f"{k.removeprefix('eval_')} {v:.3f}" for k, v in final.items()
                if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity")]
      print(f"step {step}: validation loss {final['eval_loss']:.3f}; {', '.join(others)}")
      return final
    unit = getattr(model_config, "loss_unit", None) or "token"
    bits = final.get(f"eval_bits_per_{unit}")
    baseline = training.unigram_baseline(config, tokenizer)
    print(f"step {step}: validation loss {final['eval_loss']:.3f} nats/{unit}"
          + (f" ({bits:.3f} bits/{unit})" if bits is not None else "")
          + f"; unigram baseline {baseline:.3f}")
    if config.sample.max_new_tokens > 0:
      to_text, show_prompt = sample.display(config, tokenizer)
      text = sample.sample_texts(config, tokenizer, model_config, params, [config.sample.prompt],
                                 to_text=to_text)[0]
      print(f"sample:\n{show_prompt(config.sample.prompt)}{text}")
  return final


if __name__ == "__main__":
  main()

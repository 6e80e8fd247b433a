"""Subprocess entry point for tests/test_train.py: `llm_research.main`, killed hard mid-run.

    python tests/train_worker.py --kill_before_step K -- <llm_research.main arguments>

Runs the CLI unchanged, except that just before training step K it waits until the newest
periodic checkpoint before K is committed, then sends itself SIGKILL: the process dies with no
chance to save, flush or clean up, like a machine that loses power.
"""
import os
import signal
import sys
import time


def main():
  argv = sys.argv[1:]
  split = argv.index("--")
  options, main_args = argv[:split], argv[split + 1:]
  if options[:1] != ["--kill_before_step"] or len(options) != 2:
    sys.exit("usage: train_worker.py --kill_before_step K -- <llm_research.main arguments>")
  kill_before = int(options[1])

  from llm_research import config as config_lib, main as cli, training
  args, overrides = cli.parse_args(main_args)
  config = config_lib.load_config(args.config, overrides)
  every = config.train.checkpoint_every
  last_periodic = (kill_before - 1) // every * every
  # Orbax writes this file last (then, on a local disk, renames the temporary folder to the step).
  committed = os.path.join(args.workdir, "checkpoints", str(last_periodic), "commit_success.txt")
  real_step = training.Trainer.step

  def step_or_die(self, state, batch):
    if int(state.step) + 1 == kill_before:
      deadline = time.monotonic() + 120
      while last_periodic and not os.path.isfile(committed) and time.monotonic() < deadline:
        time.sleep(0.02)
      print(f"train_worker: SIGKILL before step {kill_before}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, state, batch)

  training.Trainer.step = step_or_die
  cli.main(main_args)


if __name__ == "__main__":
  main()

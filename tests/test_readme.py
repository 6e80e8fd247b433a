"""The README's commands work as written: every `python -m llm_research.<cli>` command of its
bash blocks, in the README's order and with its workdirs (moved under a temporary folder), so a
later command finds the runs an earlier one made (sample and `train.init_from` read the
quickstart's run, pack reads the BitNet run).

To stay cheap (about a minute on 2 idle cores, mostly compiling), each training command gets
overrides appended: 2 steps, one eval batch, the tiny stdlib corpus (the quickstart's 4096-piece
SentencePiece model fits it), the session's data dirs, and no sample at the end of training;
`llm_research.sample` gets `--max_new_tokens 4`. A command's other keys (model, tokenizer,
schedule, surgery, bGPT's dataset) stay as the README gives them.

Not run, to halve this test's time, only checked as a run checks before anything runs (its
config's keys and values, and with `train.init_from` the surgery from the source run): the
bfloat16 and bigger-batch variant of the quickstart, the MoE upcycling of the quickstart's run
(`test_surgery.py` trains through `train.init_from`; the depth up-scaling here does too) and
the larger bGPT run on 10k CPU programs (the bGPT command before it trains). Not picked up at
all: the mesh on 8 fake CPU devices (it needs its own process with XLA_FLAGS;
`test_sharding.py` trains on such meshes), the multi-host launches (TPU pods,
`--coordinator_address`, SLURM), the install and test commands, and `python experiments/...`
scripts (each has its own tests or is a benchmark).
"""
import os
import re
import shlex

import pytest

from conftest import TESTS_DIR
from llm_research import init_from
from llm_research import main as train_cli
from llm_research import pack, sample, training
from llm_research.config import load_config

README = os.path.join(os.path.dirname(TESTS_DIR), "README.md")
CLIS = {"llm_research.main": train_cli.main, "llm_research.sample": sample.main,
        "llm_research.pack": pack.main}
MULTI_HOST_FLAGS = ("--multihost", "--coordinator_address")
# Workdirs of the training commands that are checked instead of run (the module docstring).
CHECKED_ONLY = ("/tmp/qs_bf16", "/tmp/qs_moe", "/tmp/bgpt_cpu")
CHEAP_TRAINING = ["train.steps=2", "train.eval_every=2", "train.eval_batches=1",
                  "train.log_every=1", "train.progress_bar=false", "sample.max_new_tokens=0",
                  "data.stdlib_config=tiny"]


def readme_text() -> str:
  with open(README) as f:
    return f.read()


def readme_commands() -> list[list[str]]:
  """The README's single-host `python -m llm_research.<cli>` commands, in order, as argument
  lists: continuation lines joined, `&&` chains split, comments and `[...]` brackets (optional
  flags, given as written) dropped."""
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", readme_text(), re.DOTALL):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        if (part.strip().startswith("python -m llm_research.")
            and not any(flag in part for flag in MULTI_HOST_FLAGS)):
          commands.append([word.strip("[]") for word in shlex.split(part, comments=True)])
  return commands


def workdir_of(words: list[str]) -> str:
  return words[words.index("--workdir") + 1]


def check_before_running(argv: list[str]) -> None:
  """What a training command checks before anything runs: its config's values, and the
  surgery from the run `train.init_from` names (read from that run's config and checkpoint)."""
  args, overrides = train_cli.parse_args(argv)
  config = load_config(args.config, overrides)
  training.check_config_values(config)
  if config.train.init_from:
    init_from.check(config)


@pytest.mark.slow
def test_readme_commands_run_as_written(tiny_overrides, tmp_path, capsys):
  commands = readme_commands()
  assert [(words[2], workdir_of(words)) for words in commands] == [
      ("llm_research.main", "/tmp/quickstart"), ("llm_research.main", "/tmp/qs_bf16"),
      ("llm_research.sample", "/tmp/quickstart"), ("llm_research.main", "/tmp/b158"),
      ("llm_research.pack", "/tmp/b158"), ("llm_research.sample", "/tmp/b158_packed"),
      ("llm_research.main", "/tmp/qs_moe"), ("llm_research.main", "/tmp/qs_deep"),
      ("llm_research.main", "/tmp/sft"), ("llm_research.main", "/tmp/dpo"),
      ("llm_research.main", "/tmp/layerskip"), ("llm_research.sample", "/tmp/layerskip"),
      ("llm_research.main", "/tmp/bgpt"), ("llm_research.sample", "/tmp/bgpt"),
      ("llm_research.main", "/tmp/bgpt_cpu")]  # the README changed: update the docstring too
  cheap = [f"--config.{o}" for o in [*tiny_overrides, *CHEAP_TRAINING]]
  appended = {"llm_research.main": cheap, "llm_research.sample": ["--max_new_tokens", "4"],
              "llm_research.pack": []}
  for words in commands:
    module, argv = words[2], [w.replace("/tmp/", f"{tmp_path}/") for w in words[3:]]
    if module == "llm_research.main" and workdir_of(words) in CHECKED_ONLY:
      check_before_running(argv + cheap)
      continue
    CLIS[module](argv + appended[module])
    out = capsys.readouterr().out
    if module == "llm_research.main":
      assert "step 2: validation loss" in out, out
    if module == "llm_research.sample":
      assert out.count("--- step 2, prompt") == argv.count("--prompt"), out
    if module == "llm_research.sample" and workdir_of(words) == "/tmp/bgpt":
      assert out.replace("\n", "").isprintable(), out  # a byte model's output, escaped


def test_readme_error_example_is_what_the_command_prints(tmp_path):
  (command, shown), = re.findall(r"\n\$ (python -m llm_research\.main .*)\n(error: .*)\n",
                                 readme_text())
  with pytest.raises(SystemExit) as raised:
    train_cli.main([w.replace("/tmp/", f"{tmp_path}/") for w in shlex.split(command)[3:]])
  assert raised.value.code == shown

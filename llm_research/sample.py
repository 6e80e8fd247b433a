"""Sample from a run's newest checkpoint.

    python -m llm_research.sample --workdir <dir> [--prompt "def "]... [--temperature 0.8]
    python -m llm_research.sample --workdir <dir> --self_speculative_exit E [--draft_tokens K]
    python -m llm_research.sample --workdir <dir> --early_exit E

Defaults come from the run's `config.sample`; several --prompt flags decode as one batch. A
byte model (bGPT, data.source='bytes') takes a prompt's UTF-8 bytes, and its output is printed
with the bytes a terminal cannot show escaped (\\x00, \\xff). With a model trained for it
(train.method=layerskip), --self_speculative_exit E drafts K tokens at a time with the first E
layers and verifies them with the rest (the full model's output; it prints tokens/s and the
acceptance rate), and --early_exit E decodes with the first E layers alone
(llm_research/speculative.py).
"""
import argparse
import functools
import json
import os
import sys

import jax
import ml_collections

from llm_research import data, decode, speculative, training
from llm_research.checkpoints import Checkpointer, holds_params_only, restore_params
from llm_research.errors import ConfigError
from llm_research.methods.ternary_packing import abstract_params


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` (its config.json)."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise ConfigError(f"{workdir!r} holds no run: {config_path} does not exist")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, to: str = "sample from"):
  """(config, tokenizer, model_config, params, step) of the newest good checkpoint in
  `workdir`: a training run, or an inference run written by `llm_research.pack` or
  `llm_research.convert`. Only reads the workdir; `to` says in an error what the run was loaded
  for ("pack")."""
  config = read_config(workdir)
  tokenizer = data.get_tokenizer(config.data)
  # An inference run (params alone): convert's, or pack's (known by its config even when its
  # checkpoint is damaged, so that the error is about that checkpoint).
  if config.model.get("linear_impl") == "ternary_packed" or holds_params_only(workdir):
    model_config = training.model_config_from(config, tokenizer.vocab_size)
    params, step = restore_params(workdir, abstract_params(model_config))
    return config, tokenizer, model_config, params, step
  trainer = training.Trainer(config, tokenizer)
  checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, read_only=True)
  state, step = checkpointer.restore_latest(trainer.abstract_state())
  checkpointer.close()
  if state is None:
    raise ConfigError(f"{workdir!r} has no checkpoint to {to}")
  return config, tokenizer, trainer.model_config, trainer.model_params(state), step


def sample_texts(config, tokenizer, model_config, params, prompts, *, to_text=None,
                 generate=decode.generate, **overrides) -> list[str]:
  """Continuations of `prompts` (strings), with `config.sample` settings unless overridden;
  `to_text` (token ids -> str) is the tokenizer's decode unless given; `generate` takes
  `decode.generate`'s arguments (e.g. an early exit's)."""
  to_text = to_text or tokenizer.decode
  settings = {**config.sample.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
  # bos first, unless the model starts a sequence itself (bGPT: its beginning-of-sequence patch).
  start = [] if getattr(model_config, "supplies_start", False) else [tokenizer.bos_id]
  encoded = [start + tokenizer.encode(p) for p in prompts]
  new = generate(model_config, params, encoded,
                 max_new_tokens=settings["max_new_tokens"],
                 rng=jax.random.key(settings["seed"]),
                 temperature=settings["temperature"], top_k=settings["top_k"],
                 top_p=settings["top_p"], eos_id=tokenizer.eos_id)
  # Decoded after the prompt, not alone: SentencePiece drops the leading space of the first
  # piece of a sequence, which would eat the space between the prompt and its continuation.
  texts = []
  for prompt_ids, tokens in zip(encoded, new):
    prompt, full = to_text(prompt_ids), to_text(prompt_ids + tokens)
    texts.append(full[len(prompt):] if full.startswith(prompt) else to_text(tokens))
  return texts


def display(config, tokenizer):
  """(token ids -> str, prompt -> str) to print a run's samples: a byte model's (bGPT: the
  bytes of any file, not text) as a terminal can show them (`printable`), text as it is."""
  if config.data.source != "bytes":
    return tokenizer.decode, lambda prompt: prompt
  return (lambda ids: printable(tokenizer.decode_bytes(ids))), (
      lambda prompt: printable(bytes(tokenizer.encode(prompt))))


def printable(data: bytes) -> str:
  """`data` as a terminal can show it: UTF-8 text as it is (newlines and tabs too), but each
  character a terminal would act on instead of showing (NUL, ESC, ...) and each byte that is
  not UTF-8 as an escape: \\x00, \\x1b, \\xff."""
  text = data.decode("utf-8", errors="backslashreplace")
  return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode()
                 for c in text)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m llm_research.sample", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
  parser.add_argument("--max_new_tokens", type=int)
  parser.add_argument("--temperature", type=float, help="0 is greedy")
  parser.add_argument("--top_k", type=int, help="0 is off")
  parser.add_argument("--top_p", type=float, help="1 is off")
  parser.add_argument("--seed", type=int)
  exits = parser.add_mutually_exclusive_group()
  exits.add_argument("--self_speculative_exit", type=int, metavar="E",
                     help="draft with the first E layers, verify with the others")
  exits.add_argument("--early_exit", type=int, metavar="E", help="decode with the first E layers")
  parser.add_argument("--draft_tokens", type=int, default=4,
                      help="tokens drafted a round (--self_speculative_exit)")
  args = parser.parse_args(argv)
  for flag, ok, what in [
      ("draft_tokens", lambda k: k >= 1, "must be at least 1"),
      ("max_new_tokens", lambda n: n >= 0, "must not be negative"),
      ("temperature", lambda t: t >= 0, "must not be negative (0 is greedy)"),
      ("top_k", lambda k: k >= 0, "must not be negative (0 is off)"),
      ("top_p", lambda p: 0 < p <= 1, "must be in (0, 1] (1 is off)")]:
    value = getattr(args, flag)
    if value is not None and not ok(value):  # before the run is loaded, not a JAX traceback
      sys.exit(f"error: --{flag}={value} {what}")
  try:
    config, tokenizer, model_config, params, step = load_run(args.workdir)
    prompts = args.prompt or [config.sample.prompt]
    to_text, show_prompt = display(config, tokenizer)
    generate, stats = exit_generator(model_config, args)
    texts = sample_texts(config, tokenizer, model_config, params, prompts, to_text=to_text,
                         generate=generate, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed)
  except ConfigError as error:  # e.g. a run that does not generate (a bGPT classifier)
    sys.exit(f"error: {error}")
  for prompt, text in zip(prompts, texts):
    print(f"--- step {step}, prompt {prompt!r} ---\n{show_prompt(prompt)}{text}")
  if stats:
    print(f"self-speculative decoding, exit layer {args.self_speculative_exit}, "
          f"{args.draft_tokens} draft tokens: {stats['tokens']} tokens in "
          f"{stats['seconds']:.3f} s, {stats['tokens'] / stats['seconds']:.1f} tokens/s, "
          f"acceptance rate {stats['acceptance_rate']:.3f}")
  return texts


def exit_generator(model_config, args):
  """(the generate function of the flags, the dict a self-speculative run fills with its
  stats: speculative.generate's). Refuses an exit the model cannot take."""
  stats = {}
  if args.early_exit is not None:
    speculative.check_exit_layer(model_config, args.early_exit, speculative=False)
    return functools.partial(speculative.early_exit_generate, exit_layer=args.early_exit), stats
  if args.self_speculative_exit is None:
    return decode.generate, stats
  speculative.check_exit_layer(model_config, args.self_speculative_exit, speculative=True)

  def speculate(config, params, prompts, **settings):
    new, run_stats = speculative.generate(config, params, prompts,
                                          exit_layer=args.self_speculative_exit,
                                          draft_tokens=args.draft_tokens, **settings)
    stats.update(run_stats)
    return new

  return speculate, stats


if __name__ == "__main__":
  main()

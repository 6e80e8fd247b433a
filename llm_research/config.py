"""Config schema, loading and command-line overrides.

An experiment is a Python file whose `get_config()` returns an ml_collections ConfigDict built
from `base_config()`. The base config is locked: a key it does not define, set in an experiment
or on the command line, is an error that names it (`ConfigError`).
"""
import ast
import copy
import difflib
import importlib.util
import os
from typing import Iterable

import ml_collections

from llm_research.errors import ConfigError
from llm_research.models import registry
from llm_research.training import method as training


def base_config(model: str = registry.DEFAULT_MODEL) -> ml_collections.ConfigDict:
  """Every key and its default; `model` names the registered model whose section
  `config.model` is (`set_model` switches it)."""
  c = ml_collections.ConfigDict()

  # `name` picks the model in llm_research.models.registry; the other keys are the fields of
  # that model's config class, with their defaults (vocab_size comes from the tokenizer).
  c.model = ml_collections.ConfigDict(registry.config_section(model))

  # Data (llm_research.data.pipeline documents each field). source="bytes" is bGPT's raw bytes:
  # byte_dataset "cpu_states" | "abc_to_midi" | "midi_to_abc" | "abc" | "midi" | "digits_bmp" |
  # "wav_tones" (local TFDS builders, config byte_config: "tiny" | "full" and others,
  # data/byte_datasets.py lists them)
  # or "files" (every file under byte_dir is one example); seq_len is then bytes per row.
  # source="preferences" is DPO's pairs: preference_dataset "cpu_states" | "jsonl" (from
  # preference_file).
  cache = os.path.join(os.path.expanduser("~"), ".cache", "llm_research")
  c.data = ml_collections.ConfigDict(dict(
      source="stdlib", stdlib_config="full", tfds_name="", text_key="text", text_dir="",
      byte_dataset="cpu_states", byte_config="full", byte_dir="",
      preference_dataset="cpu_states", preference_file="",
      data_dir=os.path.join(cache, "tensorflow_datasets"), cache_dir=cache,
      tokenizer="sentencepiece", vocab_size=4096, tokenizer_file="", seq_len=256,
      shuffle_seed=0, shuffle_tokens=2 ** 18,
      eval_split="validation"))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, grad_accum=1, learning_rate=3e-3, warmup_steps=100,
      schedule="cosine", final_lr_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
      grad_clip=1.0, z_loss=0.0, seed=0,
      trainable="",  # regex over param paths ('layers/attn/query/lora_a'): only those train
      # A new run starts from this workdir's newest params, converted by the surgery the two
      # model configs imply (depth up-scaling, MoE upcycling), with a fresh optimizer.
      init_from="",
      # A registered training method (llm_research/training/method.py): "standard", "lte"
      # (LoRA-the-Explorer), "dpo", "layerskip"; a method's own keys are in the config section
      # named after it.
      method=training.DEFAULT_METHOD,

      log_every=10, eval_every=200, eval_batches=16,
      checkpoint_every=200, keep_checkpoints=3, async_checkpoints=True,
      peak_flops_per_device=0.0,  # 0: look it up by device kind (unknown on CPU: no MFU)
      progress_bar=True))

  # Each registered training method's own section (e.g. `lte`: llm_research/training/lte.py).
  for name, section in training.config_sections().items():
    c[name] = ml_collections.ConfigDict(section)

  # Mesh axes; one may be -1 (fills the devices left). Rules map logical axes to mesh axes in
  # priority order: a mesh axis already used by an earlier rule in the same array is skipped.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  # `expert` holds the MoE experts (params and dispatched tokens) and splits the rows like a data
  # axis everywhere else (a later rule for the same name applies where an earlier one cannot).
  c.logical_axis_rules = [
      ("expert", "expert"),
      ("batch", ("data", "fsdp", "expert")),
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
      ("embed", "fsdp"),
      ("length", None), ("head_dim", None), ("layers", None),
      ("lora_heads", None), ("lora_rank", None),
  ]

  c.sample = ml_collections.ConfigDict(dict(
      prompt="def ", max_new_tokens=64, temperature=0.8, top_k=0, top_p=0.95, seed=0))
  c.lock()
  return c


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Runs `get_config()` from a Python file, then applies `key=value` overrides."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  return with_overrides(module.get_config(), overrides)


def set_model(config: ml_collections.ConfigDict, name: str) -> None:
  """Makes `config.model` the section of the registered model `name`, with that model's
  defaults (nothing of the previous model's section is kept)."""
  with config.unlocked():
    config.model = ml_collections.ConfigDict(registry.config_section(name))
  config.lock()


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `key=value` overrides applied. A `model.name` naming
  another model comes first: the model section becomes that model's (`set_model`), and the
  other `model.*` overrides apply to it."""
  config = copy.deepcopy(config)
  config.lock()
  pairs = []
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    pairs.append((key, value))
  for key, value in sorted(pairs, key=lambda pair: pair[0] != "model.name"):  # stable
    if key == "model.name" and value != config.model.name:
      set_model(config, value)
    else:
      set_key(config, key, value)
  return config


def set_key(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
  """Sets `a.b.c` from its command-line text, keeping the type the config gives the key."""
  *parents, leaf = dotted_key.split(".")
  node, path = config, []
  for name in parents + [leaf]:
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      hint = difflib.get_close_matches(name, keys, n=1)
      where = ".".join(path) or "the config"
      raise ConfigError(f"unknown config key {dotted_key!r}: {where} has no {name!r}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if name != leaf:
      node = node[name]
      path.append(name)
  node[leaf] = _parse(text, node[leaf], dotted_key)


def _parse(text: str, current, key: str):
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r} takes true/false, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config key {key!r}: cannot parse {text!r}") from None
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  if current is not None and not isinstance(value, type(current)):
    raise ConfigError(f"config key {key!r} takes {type(current).__name__} values, got {text!r}")
  return value

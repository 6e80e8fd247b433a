"""Checks of a run's config before anything runs: values (`check_config_values`), the mesh
(`checked_mesh`), and a workdir's existing run (`check_same_shapes`, by `shape_keys`)."""
import json
import os
import re

import jax

from llm_research import data, sharding
from llm_research.errors import ConfigError
from llm_research.models import registry
from llm_research.training.method import method_class
from llm_research.training.optimizer import learning_rate_schedule


def model_config_from(config, vocab_size: int):
  """The registered model config `config.model` describes (llm_research.models.registry)."""
  return registry.model_config(config.model, vocab_size)


def data_options(model_config) -> dict:
  """Keyword arguments the model adds to the data iterators (its config's `data_options()`,
  e.g. bGPT's patch_size), else none."""
  options = getattr(model_config, "data_options", None)
  return options() if options else {}


def checked_mesh(config) -> jax.sharding.Mesh:
  """The run's mesh; refuses a batch or micro-batch its data axes cannot split evenly, MoE
  experts its expert axis cannot, and what the training method cannot split."""
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  sharding.check_batch_size(tc.batch_size, mesh, rules)
  if tc.grad_accum < 1 or tc.batch_size % tc.grad_accum:
    raise ConfigError(f"train.grad_accum={tc.grad_accum} must divide "
                      f"train.batch_size={tc.batch_size}")
  sharding.check_batch_size(
      tc.batch_size // tc.grad_accum, mesh, rules,
      what=f"the micro-batch of train.batch_size={tc.batch_size} / "
           f"train.grad_accum={tc.grad_accum} = {tc.batch_size // tc.grad_accum} rows")
  if config.model.get("mlp_impl") == "moe":
    sharding.check_expert_axis(config.model.moe.num_experts, mesh, rules)
  method_class(tc.method).check_mesh(config, mesh)
  return mesh


def need(config, ok: bool, key: str, what: str) -> None:
  """Raises "<key>=<its value> <what>" unless `ok`."""
  if not ok:
    raise ConfigError(f"{key}={_value(config, key)!r} {what}")


def check_config_values(config) -> None:
  """Refuses, naming the key, a `model`, `train`, `data`, `sample` or training-method value no
  run can use; cheap, so runs first (the mesh is `checked_mesh`'s)."""
  tc, dc, sc = config.train, config.data, config.sample
  if config.model.get("linear_impl") == "ternary_packed":
    raise ConfigError("model.linear_impl='ternary_packed' is for inference: train with "
                      "'bitnet', then pack the run (python -m llm_research.pack)")
  check = lambda ok, key, what: need(config, ok, key, what)
  for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
               "checkpoint_every", "keep_checkpoints"):
    check(tc[name] >= 1, f"train.{name}", "must be at least 1")
  for name in ("learning_rate", "warmup_steps", "weight_decay", "grad_clip", "z_loss",
               "peak_flops_per_device"):
    check(tc[name] >= 0, f"train.{name}", "must not be negative")
  check(0 <= tc.final_lr_fraction <= 1, "train.final_lr_fraction", "must be in [0, 1]")
  check(0 <= tc.b1 < 1, "train.b1", "must be in [0, 1)")
  check(0 <= tc.b2 < 1, "train.b2", "must be in [0, 1)")
  learning_rate_schedule(tc)  # an unknown train.schedule is a ConfigError naming it
  try:
    re.compile(tc.trainable)
  except re.error as error:
    raise ConfigError(f"train.trainable={tc.trainable!r} is not a regular expression: "
                      f"{error}") from None
  method = method_class(tc.method)  # an unknown train.method is a ConfigError naming it
  check(dc.source in data.pipeline.SOURCES, "data.source",
        f"is not one of {data.pipeline.SOURCES}")
  check(dc.source != "stdlib" or dc.stdlib_config in ("full", "tiny"), "data.stdlib_config",
        "is not 'full' or 'tiny'")
  check(dc.tokenizer in ("sentencepiece", "byte"), "data.tokenizer",
        "is not 'sentencepiece' or 'byte'")
  # SentencePiece's byte-fallback BPE holds 256 byte pieces and pad, bos, eos, unk, plus one
  # piece per distinct character of the corpus (its exact need shows when it trains).
  check(dc.tokenizer != "sentencepiece" or dc.vocab_size > 260, "data.vocab_size",
        "is too small for data.tokenizer='sentencepiece': its 256 byte pieces and 4 special "
        "pieces leave no room for the corpus's characters (use a few hundred or more)")
  check(dc.seq_len >= 1, "data.seq_len", "must be at least 1")
  check(sc.max_new_tokens >= 0, "sample.max_new_tokens", "must not be negative")
  check(sc.temperature >= 0, "sample.temperature", "must not be negative (0 is greedy)")
  check(sc.top_k >= 0, "sample.top_k", "must not be negative (0 is off)")
  check(0 < sc.top_p <= 1, "sample.top_p", "must be in (0, 1] (1 is off)")
  # The model's own checks (its config class, and the data it takes: `check_data`), at the
  # vocab the tokenizer will have.
  model_config = model_config_from(config, data.pipeline.vocab_size(dc))
  if hasattr(model_config, "check_data"):
    model_config.check_data(dc)
  if dc.source == "bytes":  # rows whose inputs are their targets: the model shifts (bGPT)
    if not getattr(model_config, "supplies_start", False):
      raise ConfigError(f"data.source='bytes' is for a model that predicts each byte from the "
                        f"ones before it by itself (model.name='bgpt'), not "
                        f"model.name={config.model.name!r}")
    data.pipeline.check_byte_config(dc, **data_options(model_config))
  method.check_config(config, model_config)


def shape_keys(config) -> tuple[str, ...]:
  """The keys that fix the shapes of a run's checkpoints (a workdir's run keeps them): the
  model, its shape fields (registry.shape_field), the tokenizer, the training method and the
  method's own (its `shape_keys`)."""
  return (("model.name",) + tuple(f"model.{k}" for k in registry.shape_keys(config.model.name))
          + ("data.tokenizer", "data.vocab_size", "train.method")
          + method_class(config.train.method).shape_keys)


def _value(tree, key: str):
  """The value at a dotted key ('model.moe.num_experts') of a config or dict; None if absent."""
  for name in key.split("."):
    if name not in tree:
      return None
    tree = tree[name]
  return tree


def check_same_shapes(config, workdir: str) -> None:
  """Refuses a config whose checkpoints could not be those already in `workdir`."""
  path = os.path.join(workdir, "config.json")
  if not (os.path.isfile(path) and os.path.isdir(os.path.join(workdir, "checkpoints"))):
    return
  with open(path) as f:
    previous = json.load(f)
  if "model" in previous:  # keys an older layout held elsewhere: where they are now
    previous["model"] = registry.upgraded_section(previous["model"])
  changed = []
  for key in shape_keys(config):
    before, now = _value(previous, key), _value(config, key)
    if before is not None and before != now:
      changed.append(f"{key}: {before!r} there, {now!r} here")
  if changed:
    raise ConfigError(f"workdir {workdir!r} holds a run with other shapes ({'; '.join(changed)}): "
                      "use a new --workdir, or the run's own config to resume it")

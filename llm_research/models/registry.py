"""The model registry: `config.model.name` -> the model's config class.

A model is a frozen dataclass registered with `@register("name")`. Its fields are its
hyperparameters (one of them `vocab_size`, which the tokenizer fixes); training, generation,
FLOP counting and parameter counting reach the model only through these methods:

    make_model(decode=False, cache_len=0) -> nn.Module
        `__call__(tokens, positions=None, segment_ids=None)` -> float32 logits
        [batch, length, vocab]. With `decode=True` the module keeps a 'cache' collection of
        `cache_len` slots and `positions` are absolute cache slots (llm_research.decode).
        Auxiliary losses are sown into the 'aux_loss' collection (`sow_aux_loss`).
    num_params(include_embeddings=True) -> int
    flops_per_token(seq_len) -> float     training (forward + backward) FLOPs per token

Optional, looked up with getattr (the transformer defines none; bGPT, models/bgpt.py, all):
    generate(params, prompts, **settings)   decode.generate hands generation over to it
    supplies_start                          True: prompts carry no bos (the model starts itself)
    loss_sums(outputs, batch, z_loss)       the objective (train.py; default: next-token loss)
    loss_unit                               e.g. "byte": eval adds `eval_bits_per_byte`
    data_options()                          keyword arguments of the data iterators
    check_data(data_config)                 refuses `data.*` values at config-check time
    HEAD_KEYS                               shape keys `train.init_from` may change

The dataclass is the one place a model's defaults live: `config.model` is `name` plus the
fields of that model's class with their defaults (`config_section`; `--config.model.name=bgpt`
gives bGPT's), and the fields declared with `shape_field` are the keys that fix the shapes of
a run's checkpoints.
"""
import dataclasses
from typing import Any

from llm_research.errors import ConfigError

DEFAULT_MODEL = "transformer"
MODELS: dict[str, type] = {}
_REQUIRED_METHODS = ("make_model", "num_params", "flops_per_token")


def register(name: str):
  """Class decorator: registers a model config dataclass under `name`."""
  def add(cls):
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if not dataclasses.is_dataclass(cls) or missing:
      raise TypeError(f"model {name!r}: {cls.__name__} must be a dataclass with {missing}")
    if "vocab_size" not in {f.name for f in dataclasses.fields(cls)}:
      raise TypeError(f"model {name!r}: {cls.__name__} has no vocab_size field")
    MODELS[name] = cls
    return cls
  return add


def shape_field(default: Any) -> Any:
  """A dataclass field that fixes parameter shapes (a run's checkpoints keep it)."""
  return dataclasses.field(default=default, metadata={"shapes": True})


def _configurable_fields(cls) -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(cls) if f.name != "vocab_size"]


def config_section(name: str = DEFAULT_MODEL) -> dict:
  """The config's model section for model `name`: `name` and its fields with their defaults."""
  return {"name": name, **{f.name: f.default for f in _configurable_fields(model_class(name))}}


def model_class(name: str) -> type:
  if name not in MODELS:
    raise ConfigError(f"model.name={name!r} is not a registered model: {sorted(MODELS)}")
  return MODELS[name]


def model_config(model_section, vocab_size: int):
  """The registered config of `model_section.name`, built from the section's keys; a key the
  section lacks (a run's config.json written before the field existed) takes its default,
  and keys that are not the model's fields are ignored (a config.json written before each
  model had its own section holds every registered model's fields: it loads as it is)."""
  cls = model_class(model_section.get("name", DEFAULT_MODEL))
  return cls(vocab_size=vocab_size, **{f.name: model_section.get(f.name, f.default)
                                       for f in _configurable_fields(cls)})


def shape_keys(name: str) -> tuple[str, ...]:
  """The model keys whose values fix the shapes of `name`'s params."""
  return tuple(f.name for f in _configurable_fields(model_class(name))
               if f.metadata.get("shapes"))

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
    LEGACY_KEYS                             old config.json keys -> 'group.field' (moved)

The dataclass is the one place a model's defaults live: `config.model` is `name` plus the
fields of that model's class with their defaults (`config_section`; `--config.model.name=bgpt`
gives bGPT's). A field whose default is itself a dataclass (`default_factory`) is a group of
settings, a sub-section of its own (the transformer's `moe`: `model.moe.num_experts`). The
fields declared with `shape_field` are the keys that fix the shapes of a run's checkpoints.
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


def _group_class(field: dataclasses.Field):
  """The dataclass of a field that is a group of settings (e.g. the transformer's `moe`:
  MoEConfig, a sub-section `model.moe.*`), else None."""
  if field.default_factory is dataclasses.MISSING:
    return None
  default = field.default_factory()
  return type(default) if dataclasses.is_dataclass(default) else None


def _defaults(cls) -> dict:
  """{field: default} of a config class, a group's as a nested dict."""
  defaults = {}
  for f in _configurable_fields(cls):
    group = _group_class(f)
    defaults[f.name] = _defaults(group) if group else f.default
  return defaults


def config_section(name: str = DEFAULT_MODEL) -> dict:
  """The config's model section for model `name`: `name` and its fields with their defaults
  (a group of settings as a sub-section)."""
  return {"name": name, **_defaults(model_class(name))}


def model_class(name: str) -> type:
  if name not in MODELS:
    raise ConfigError(f"model.name={name!r} is not a registered model: {sorted(MODELS)}")
  return MODELS[name]


def _build(cls, section, **given):
  """An instance of config class `cls` from `section`'s keys (a group from its sub-section);
  a key the section lacks takes its default."""
  values = dict(given)
  for f in _configurable_fields(cls):
    group = _group_class(f)
    if group:
      values[f.name] = _build(group, section.get(f.name) or {})
    elif f.name in section:
      values[f.name] = section[f.name]
  return cls(**values)


def upgraded_section(section) -> dict:
  """A model section (a dict) with the keys a config.json written by an older layout holds
  moved where the model's class has them now (its LEGACY_KEYS: old key -> 'group.field')."""
  cls = model_class(section.get("name", DEFAULT_MODEL))
  section = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in section.items()}
  for old, new in getattr(cls, "LEGACY_KEYS", {}).items():
    if old in section:
      group, field = new.split(".")
      section.setdefault(group, {}).setdefault(field, section.pop(old))
  return section


def model_config(model_section, vocab_size: int):
  """The registered config of `model_section.name`, built from the section's keys. Old runs'
  config.json load as they are: a key the section lacks (written before the field existed)
  takes its default, keys that are not the model's fields are ignored (a config.json written
  before each model had its own section holds every registered model's fields), and keys the
  model moved into a group are read from where they were (its LEGACY_KEYS)."""
  cls = model_class(model_section.get("name", DEFAULT_MODEL))
  return _build(cls, upgraded_section(model_section), vocab_size=vocab_size)


def shape_keys(name: str) -> tuple[str, ...]:
  """The model keys whose values fix the shapes of `name`'s params ('moe.num_experts' for a
  group's field)."""
  def keys(cls, prefix=""):
    for f in _configurable_fields(cls):
      group = _group_class(f)
      if group:
        yield from keys(group, f"{prefix}{f.name}.")
      elif f.metadata.get("shapes"):
        yield prefix + f.name
  return tuple(keys(model_class(name)))


def field_value(model_config, key: str):
  """The value of a model key ('num_layers', or 'moe.num_experts') in a model config."""
  for name in key.split("."):
    model_config = getattr(model_config, name)
  return model_config

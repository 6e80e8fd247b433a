"""The training-method seam: the interface a method implements, and the registry keyed by
`train.method`.

A method is a subclass of `TrainingMethod` registered with `@register("name")`. The loop,
checkpoints, metrics and CLIs reach it only through this interface, and nothing outside the
method's own file names it. What a method brings:

  config_section    its config section `config.<name>` and the defaults of its keys ({}: none)
  shape_keys        the config keys that fix its checkpoints' shapes ("lte.heads", ...)
  check_config      refuses values it cannot use, naming the key (before anything runs)
  check_mesh        refuses a mesh or batch it cannot split (once per run, before the data)
  rules             the logical-axis rules its arrays shard by (default: the config's)
  init              its state (params, optimizer state) from the model's params, fresh or
                    given (train.init_from works for every method)
  step              one update: (state, batch) -> (state, metrics); after-step hooks included
  trained           the params its optimizer trains (what train.trainable selects from)
  model_params      the model's params in its state: what eval, sampling and export read

A new method is one file: subclass `Standard` (llm_research/training/standard.py) to change the
objective (`objective`) or what the state holds, or `TrainingMethod` for a step of its own;
register it; import the file before `base_config()` is built so its section is in the config.
"""
import abc
from typing import Any, ClassVar

import jax
import ml_collections
import optax

from llm_research import sharding
from llm_research.errors import ConfigError
from llm_research.training.state import AfterStepHook, TrainState

DEFAULT_METHOD = "standard"
METHODS: dict[str, type["TrainingMethod"]] = {}


class TrainingMethod(abc.ABC):
  """One way of training a model (the module docstring). An instance is built per run from
  the config and the registered model config; `hooks` run after its updates, inside the step."""

  name: ClassVar[str] = ""  # set by `register`
  config_section: ClassVar[dict[str, Any]] = {}
  shape_keys: ClassVar[tuple[str, ...]] = ()
  optimizer: optax.GradientTransformation  # of `trained(state.params)`; set by __init__

  def __init__(self, config: ml_collections.ConfigDict, model_config,
               hooks: tuple[AfterStepHook, ...] = ()):
    self.config, self.model_config, self.hooks = config, model_config, tuple(hooks)
    self.model = model_config.make_model()

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict, model_config) -> None:
    """Raises a ConfigError naming a key this method cannot use (cheap: no arrays)."""

  @classmethod
  def check_mesh(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises a ConfigError for a mesh or batch this method cannot split."""

  @property
  def rules(self) -> tuple:
    """The logical-axis rules of this method's arrays."""
    return sharding.rules_from_config(self.config)

  @abc.abstractmethod
  def init(self, params, rng: jax.Array) -> tuple[Any, Any]:
    """(state.params, state.opt_state) at step 0 from the model's `params` (boxed in their
    logical axes when fresh, plain arrays when given: train.init_from), drawing what it needs
    from `rng`. The trainer sets the step and the run's key."""

  @abc.abstractmethod
  def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One update on a global batch, then the hooks due: (state, metrics with "loss")."""

  def trained(self, params):
    """The part of `state.params` the optimizer trains."""
    return params

  def model_params(self, params):
    """The model's params in `state.params` (a pure function, jitted by the trainer)."""
    return params

  def model_param_shardings(self, shardings):
    """The shardings of `model_params(params)` from those of `params`."""
    return shardings


def register(name: str):
  """Class decorator: registers a TrainingMethod subclass as `train.method=name`."""
  def add(cls):
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
      raise TypeError(f"training method {name!r}: {cls!r} is not a TrainingMethod subclass")
    if name in METHODS and METHODS[name] is not cls:
      raise TypeError(f"training method {name!r} is already registered ({METHODS[name]})")
    cls.name = name
    METHODS[name] = cls
    return cls
  return add


def method_class(name: str) -> type[TrainingMethod]:
  if name not in METHODS:
    raise ConfigError(f"train.method={name!r} is not one of {tuple(METHODS)}")
  return METHODS[name]


def config_sections() -> dict[str, dict]:
  """{method name: its config section} of the registered methods that have one."""
  return {name: dict(cls.config_section) for name, cls in METHODS.items() if cls.config_section}

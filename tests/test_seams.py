"""The core's seams, each used through the paths the transformer uses: the model registry (a toy
second model trains, generates and counts its FLOPs), the decoder stack and auxiliary losses sown
inside it, composable linear layers (LoRA on any base), the trainable mask, after-step hooks,
remat that keeps the flash-attention residuals, and an import graph without circles.
"""
import ast
import dataclasses
import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_research import decode, sample, training
from llm_research.data import ByteTokenizer
from llm_research.errors import ConfigError
from llm_research.metrics import read_metrics
from llm_research.models import Transformer, TransformerConfig, registry
from llm_research.models import bgpt as bgpt_module
from llm_research.models.linear import Linear, LoRA
from llm_research.models import stack
from llm_research.models.stack import decoder_stack, sow_aux_loss, sow_metric

AUX_WEIGHT = 1e-2


class ToyBlock(nn.Module):
  """x + tanh(x W): per token (trivially causal), and sows AUX_WEIGHT * mean((x W)^2)."""

  config: "ToyConfig"
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    h = self.config.linear_layer(name="mix")(x)
    sow_aux_loss(self, "toy_l2", AUX_WEIGHT * jnp.mean(jnp.square(h)))
    if self.has_rng("dropout"):  # in training: the step's key, one per layer (a stand-in)
      sow_metric(self, "dropout_draw", jax.random.uniform(self.make_rng("dropout")))
    return x + jnp.tanh(h)


class Toy(nn.Module):
  config: "ToyConfig"
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None):
    cfg = self.config
    embedding = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")), (cfg.vocab_size, cfg.embed_dim))
    x = decoder_stack(ToyBlock, cfg, embedding[tokens], positions, segment_ids,
                      decode=self.decode, cache_len=self.cache_len)
    return x @ embedding.T


@registry.register("toy")
@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """A second model: its config section holds its fields alone (shared names included)."""

  vocab_size: int
  num_layers: int = 3
  embed_dim: int = 16
  scan_layers: bool = True
  remat_policy: str = "none"

  def linear_layer(self, *, name):
    return Linear((self.embed_dim,), ("embed",), ("mlp",), name=name)

  def make_model(self, *, decode=False, cache_len=0):
    return Toy(self, decode=decode, cache_len=cache_len)

  def num_params(self, include_embeddings=True):
    layers = self.num_layers * self.embed_dim**2
    return layers + (self.vocab_size * self.embed_dim if include_embeddings else 0)

  def flops_per_token(self, seq_len):
    return 6.0 * (self.num_params(include_embeddings=False) + self.vocab_size * self.embed_dim)


def toy_forward_numpy(params, tokens):
  """The toy model and its summed auxiliary loss, written out in numpy."""
  x = np.asarray(params["embedding"])[tokens]
  aux = 0.0
  for kernel in np.asarray(params["layers"]["mix"]["kernel"]):
    h = x @ kernel
    aux += AUX_WEIGHT * np.mean(h**2)
    x = x + np.tanh(h)
  return x @ np.asarray(params["embedding"]).T, aux


@pytest.fixture(scope="module")
def toy_run(tiny_overrides, tmp_path_factory):
  """The tiny config with model.name=toy, trained by train_and_evaluate; (config, workdir)."""
  from llm_research.config import load_config
  from conftest import TINY_CONFIG
  config = load_config(TINY_CONFIG, [*tiny_overrides, "model.name=toy", "model.num_layers=3",
                                     "model.embed_dim=16", "train.peak_flops_per_device=1e12",
                                     "train.learning_rate=0.05"])
  workdir = str(tmp_path_factory.mktemp("toy_run"))
  training.train_and_evaluate(config, workdir)
  return config, workdir


def test_toy_model_trains_logs_its_aux_loss_and_counts_its_flops(toy_run):
  config, workdir = toy_run
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, 7))
  assert records[-1]["loss"] < records[0]["loss"]
  assert all(r["aux_loss/toy_l2"] > 0 for r in records)
  toy = ToyConfig(vocab_size=259)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  for r in records[1:]:  # MFU from the toy's own FLOP count, through the trainer's path
    flops = r["mfu"] * 1e12 * r["step_time_s"]
    assert flops == pytest.approx(toy.flops_per_token(config.data.seq_len) * tokens_per_step,
                                  rel=1e-6)


def test_toy_model_generates_from_its_run_through_the_shared_decoder(toy_run):
  _, workdir = toy_run
  _, _, model_config, params, step = sample.load_run(workdir)
  assert isinstance(model_config, ToyConfig) and step == 6
  prompts = [[1, 70, 71], [1]]
  new = decode.generate(model_config, params, prompts, max_new_tokens=4)
  for prompt, tokens in zip(prompts, new):
    logits, _ = toy_forward_numpy(params, np.array(prompt + tokens))
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:-1], -1), tokens)


def test_aux_loss_sown_in_scanned_blocks_is_summed_into_the_objective():
  cfg = ToyConfig(vocab_size=11)
  model = cfg.make_model()
  tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 11)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens)["params"])
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "segment_ids": jnp.ones_like(tokens), "positions": jnp.zeros_like(tokens)}
  optimizer = optax.sgd(0.1)
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params), rng=jnp.zeros((2,), jnp.uint32))
  _, metrics = training.train_step(state, batch, objective=training.model_objective(model),
                                   optimizer=optimizer, schedule=lambda step: 0.1, grad_accum=1)
  logits, aux = toy_forward_numpy(params, np.asarray(tokens))
  assert float(metrics["aux_loss/toy_l2"]) == pytest.approx(aux, rel=1e-5)
  log_probs = jax.nn.log_softmax(logits)
  nll = -np.take_along_axis(np.asarray(log_probs), np.asarray(batch["targets"])[..., None],
                            -1).mean()
  assert float(metrics["loss"]) == pytest.approx(nll, rel=1e-5)


def test_each_model_has_its_own_config_section_with_its_own_defaults(tiny_config):
  from llm_research.config import base_config, with_overrides
  fields = lambda cls: {f.name: f.default for f in dataclasses.fields(cls)
                        if f.name != "vocab_size"}
  transformer = base_config().model.to_dict()
  assert transformer == registry.config_section("transformer")
  assert set(transformer) == {"name"} | set(fields(TransformerConfig))
  assert transformer["moe"] == dataclasses.asdict(TransformerConfig(vocab_size=1).moe)  # a group
  assert base_config("toy").model.to_dict() == {"name": "toy", **fields(ToyConfig)}
  # On the command line: the named model's defaults, whatever the experiment set for another
  # model (the tiny config's transformer sizes), and the other model.* keys apply to it,
  # whatever their order.
  config = tiny_config("model.num_layers=5", "model.name=toy")
  assert config.model.to_dict() == {"name": "toy", **fields(ToyConfig), "num_layers": 5}
  bgpt = with_overrides(base_config(), ["model.name=bgpt"]).model
  assert bgpt.embed_dim == bgpt_module.BgptConfig.embed_dim != TransformerConfig.embed_dim
  with pytest.raises(ValueError, match="unknown config key 'model.mlp_dim': model has no"):
    tiny_config("model.name=toy", "model.mlp_dim=8")  # a transformer key, not the toy's
  assert registry.shape_keys("toy") == ()
  with pytest.raises(ValueError, match="model.name='nope' is not a registered model"):
    tiny_config("model.name=nope")


# ---- a training method plugs in ------------------------------------------------------------------

@training.register("toy_method")
class ToyMethod(training.Standard):
  """Standard training on the model's loss plus `toy_method.weight` x the params' squared norm
  per token, logged as aux_loss/toy_weight_l2: a method is one file and a config section."""

  config_section = {"weight": 0.0}

  @classmethod
  def check_config(cls, config, model_config):
    if config.toy_method.weight < 0:
      raise ConfigError(f"toy_method.weight={config.toy_method.weight!r} must not be negative")

  def objective(self, params, batch, rng):
    value, sums = super().objective(params, batch, rng)
    l2 = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))
    penalty = self.config.toy_method.weight * l2 * sums["count"]
    return value + penalty, {**sums, "aux_loss/toy_weight_l2": penalty}


def test_a_method_registered_in_a_test_file_trains_checkpoints_and_resumes(
    tiny_overrides, tmp_path, monkeypatch):
  """The toy method on the toy model through train_and_evaluate: its section is in the config
  and config.json, its checks run first, its objective trains; stopped by SIGTERM at step 2 and
  run again, it repeats the uninterrupted run exactly, the step keys (the model's "dropout"
  stream) included: a new key every step, the same ones after resuming."""
  from llm_research.config import load_config
  from conftest import TINY_CONFIG, preempted_then_resumed
  overrides = [*tiny_overrides, "model.name=toy", "train.method=toy_method",
               "toy_method.weight=0.001"]
  with pytest.raises(ConfigError, match="toy_method.weight=-1.0 must not be negative"):
    training.train_and_evaluate(load_config(TINY_CONFIG, [*overrides, "toy_method.weight=-1"]),
                                str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()

  config = load_config(TINY_CONFIG, overrides)
  training.train_and_evaluate(config, str(tmp_path / "reference"))
  preempted_then_resumed(config, str(tmp_path / "run"), monkeypatch)

  reference, resumed = (read_metrics(str(tmp_path / name)) for name in ("reference", "run"))
  keys = ("loss", "aux_loss/toy_weight_l2", "dropout_draw", "eval_loss")
  assert [{k: r.get(k) for k in keys} for r in resumed] == [
      {k: r.get(k) for k in keys} for r in reference]
  draws = [r["dropout_draw"] for r in reference]
  assert len(set(draws)) == len(draws) == 6  # every step its own key
  assert all(r["aux_loss/toy_weight_l2"] > 0 for r in reference)
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["toy_method"] == {"weight": 0.001}


# ---- linear layers compose ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["dense", "bitnet"])
def test_lora_adds_scale_times_the_sum_of_its_heads_to_any_base(impl):
  x = jax.random.normal(jax.random.key(0), (2, 3, 12))
  lora = LoRA(rank=2, alpha=6.0, heads=3)
  base = Linear((5,), ("embed",), ("mlp",), impl=impl)
  adapted = Linear((5,), ("embed",), ("mlp",), impl=impl, lora=lora)
  params = nn.meta.unbox(adapted.init(jax.random.key(1), x)["params"])
  assert params["lora_a"].shape == (3, 12, 2) and params["lora_b"].shape == (3, 2, 5)
  base_out = base.apply({"params": {"kernel": params["kernel"]}}, x)
  # Fresh adapters (B = 0) leave the base's function unchanged.
  np.testing.assert_array_equal(adapted.apply({"params": params}, x), base_out)
  params["lora_b"] = jax.random.normal(jax.random.key(2), params["lora_b"].shape)
  a, b = np.asarray(params["lora_a"]), np.asarray(params["lora_b"])
  delta = sum(np.asarray(x) @ a[n] @ b[n] for n in range(3)) * 6.0 / 2 / 3
  np.testing.assert_allclose(adapted.apply({"params": params}, x), base_out + delta,
                             rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lora_trainer():
  from llm_research.config import base_config, with_overrides
  config = with_overrides(base_config(), [
      "model.num_layers=2", "model.embed_dim=32", "model.num_heads=2", "model.num_kv_heads=2",
      "model.head_dim=16", "model.mlp_dim=48", "model.lora_rank=4",
      "model.linear_impl=bitnet", "data.seq_len=16", "train.batch_size=4",
      "train.warmup_steps=0", "train.learning_rate=0.01", "train.trainable=/lora_[ab]$"])
  return training.Trainer(config, ByteTokenizer())


def random_batch(seed, rows=4, length=16):
  tokens = np.random.default_rng(seed).integers(3, 259, (rows, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length), (rows, length)).astype(np.int32)}


def test_frozen_params_keep_their_values_and_have_no_optimizer_state(lora_trainer):
  """LoRA on a BitNet base, training only the adapters (train.trainable='/lora_[ab]$': anchored,
  so the pattern must see the same paths when the optimizer is built as when it updates)."""
  state = lora_trainer.init_state()
  before = jax.device_get(state.params)
  for seed in range(2):
    state, metrics = lora_trainer.step(state, random_batch(seed))
  after = jax.device_get(state.params)
  flat = lambda tree: {training.param_path(p): x for p, x in
                       jax.tree_util.tree_leaves_with_path(tree)}
  changed = {k for k, v in flat(after).items() if not np.array_equal(v, flat(before)[k])}
  assert changed and all("lora_" in k for k in changed)
  assert any(k.endswith("lora_a") for k in changed) and any(k.endswith("lora_b") for k in changed)
  # Adam's moments exist for the adapters only: no optimizer state for a frozen param.
  adapter_elements = sum(x.size for k, x in flat(after).items() if "lora_" in k)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # scalars: step counts
  assert sum(x.size for x in moments) == 2 * adapter_elements
  assert np.isfinite(float(metrics["grad_norm"]))


def test_after_step_hook_runs_at_its_interval_inside_the_step(lora_trainer):
  set_scale = lambda s: s.replace(params={**s.params, "final_norm": {
      "scale": jnp.full_like(s.params["final_norm"]["scale"], s.step.astype(jnp.float32))}})
  trainer = training.Trainer(lora_trainer.config, ByteTokenizer(),
                          hooks=(training.AfterStepHook(2, set_scale),))
  state = trainer.init_state()
  scales = []
  for seed in range(4):
    state, _ = trainer.step(state, random_batch(seed))
    scales.append(np.asarray(state.params["final_norm"]["scale"]))
  assert np.all(scales[0] == 1.0) and np.all(scales[1] == 2.0)  # frozen: only the hook moves it
  assert np.all(scales[2] == 2.0) and np.all(scales[3] == 4.0)


# ---- remat keeps the attention residuals ---------------------------------------------------------

# attention_impl -> what its forward looks like in a jaxpr
ATTENTION_FORWARD_IN_JAXPR = {"pallas": "name=flash_attention_forward",
                              "cudnn": f"{stack.CUDNN_ATTENTION_FORWARD}["}


@pytest.mark.parametrize("impl", sorted(ATTENTION_FORWARD_IN_JAXPR))
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_does_not_rerun_the_attention_forward_kernel(policy, impl, monkeypatch):
  """Rematerialisation keeps the attention residuals: one forward kernel in the scanned body.
  cuDNN's forward is only traced, on CPU posing as a GPU with cuDNN's device checks stubbed."""
  if impl == "cudnn":
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: None)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
  cfg = TransformerConfig(vocab_size=32, num_layers=2, embed_dim=64, num_heads=2,
                          num_kv_heads=1, head_dim=64, mlp_dim=64, attention_impl=impl,
                          remat_policy=policy, dtype="bfloat16")
  model = Transformer(cfg)
  tokens = jnp.zeros((1, 16), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  loss = lambda p: model.apply({"params": p}, tokens).astype(jnp.float32).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  assert jaxpr.count(ATTENTION_FORWARD_IN_JAXPR[impl]) == 1  # in the scanned body, once
  if impl == "pallas":
    assert jaxpr.count("name=flash_attention_dq") == 1


# ---- no import circles ---------------------------------------------------------------------------

def import_cycles(top: pathlib.Path) -> list[str]:
  """The modules of `top`/llm_research and `top`/kernels (as llm_research.kernels) that reach
  themselves through imports, counting every import at module level or inside a function or
  class (TYPE_CHECKING ones too). A package's __init__ is not counted as a dependency of its
  own submodules."""
  modules = {}
  for path in list((top / "llm_research").rglob("*.py")) + list((top / "kernels").glob("*.py")):
    parts = path.relative_to(top).with_suffix("").parts
    name = ".".join(("llm_research",) + parts if parts[0] == "kernels" else parts)
    modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    deps = set()
    for imp in ast.walk(ast.parse(path.read_text())):
      if isinstance(imp, ast.Import):
        names = [a.name for a in imp.names]
      elif isinstance(imp, ast.ImportFrom):  # `from package import module` needs the module
        names = [f"{imp.module}.{a.name}" if f"{imp.module}.{a.name}" in modules
                 else imp.module for a in imp.names]
      else:
        continue
      deps |= {n for n in names if n in modules and n != name}
    graph[name] = deps

  @functools.cache
  def reaches(start, target, seen=frozenset()):
    return any(d == target or (d not in seen and reaches(d, target, seen | {d}))
               for d in graph[start])

  return sorted(name for name in graph if reaches(name, name))


def test_the_package_has_no_import_cycles():
  """No module imports one that imports it back, directly or through others."""
  assert import_cycles(pathlib.Path(training.__file__).parents[2]) == []


def test_import_cycles_are_found_inside_functions_and_through_private_names(tmp_path):
  """The cycles this repository once had: a method imported inside a function of the module
  it builds on (train.py <-> methods/lte.py), and a kernel importing private helpers of the
  file that dispatches to it (flash_attention.py <-> flash_attention_tpu.py)."""
  files = {
      "llm_research/__init__.py": "",
      "llm_research/train.py": "def method_class():\n  from llm_research.methods import lte\n",
      "llm_research/methods/__init__.py": "",
      "llm_research/methods/lte.py": "from llm_research import train\n",
      "llm_research/other.py": "from llm_research import train\n",
      "kernels/flash_attention.py": "def dispatch():\n"
                                    "  from llm_research.kernels import flash_attention_tpu\n",
      "kernels/flash_attention_tpu.py": "from llm_research.kernels.flash_attention import _dot\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert import_cycles(tmp_path) == [
      "llm_research.kernels.flash_attention", "llm_research.kernels.flash_attention_tpu",
      "llm_research.methods.lte", "llm_research.train"]

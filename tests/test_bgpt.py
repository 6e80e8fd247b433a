"""bGPT (llm_research/models/bgpt.py): byte-level causality across patches, padding outside the
loss, bits per byte, cached generation and conversion, training and classification fine-tuning
through the trainer, sharded training equal to one device, its config errors (one line through
the CLI for bad byte data), the sample CLI's escaped bytes, and pack's refusal of a bGPT run.

    pytest -q tests/test_bgpt.py

Batches are built here, in the layout data.source="bytes" gives (byte_rows.make_row: the file
padded with 256 to whole patches, an end patch of 256s, then 256 with segment_ids 0), from files
of a repeated 3-byte motif: low bytes for class 0, high bytes for class 1. Run as a script, this
file is the 8-device worker of the sharding test.
"""
import dataclasses
import functools
import math
import os
import shutil
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import cli_args, snapshot
from llm_research import decode, init_from, sample, training
from llm_research.config import ConfigError, base_config, with_overrides
from llm_research import main as cli
from llm_research import pack
from llm_research.data import byte_rows
from llm_research.data.stdlib_corpus import split_of
from llm_research.data.tokenizers import RawByteTokenizer
from llm_research.metrics import read_metrics
from llm_research.models import bgpt, registry
from llm_research.models.bgpt import PAD, BgptConfig

SIZE = 4  # patch size
SEQ_LEN = 32  # 8 patches
TINY = bgpt.PRESETS["tiny"]
OVERRIDES = [
    "model.name=bgpt", *(f"model.{k}={v}" for k, v in TINY.items()),
    "data.source=bytes", f"data.seq_len={SEQ_LEN}",
    "train.steps=6", "train.batch_size=8", "train.learning_rate=0.01", "train.warmup_steps=2",
    "train.log_every=1", "train.eval_every=6", "train.eval_batches=2",
    "train.checkpoint_every=6", "train.progress_bar=false", "train.peak_flops_per_device=1e12",
    "sample.max_new_tokens=8", "sample.temperature=0.0"]


def tiny(**overrides) -> BgptConfig:
  return BgptConfig(vocab_size=257, **{**TINY, **overrides})


@functools.cache
def init(cfg: BgptConfig, seed: int = 0):
  """(jitted apply, params) of a fresh model."""
  model = cfg.make_model()
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, SEQ_LEN), jnp.int32))
  return jax.jit(model.apply), nn.meta.unbox(params["params"])


def random_bytes(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, 256)


def log_probs_of(logits, tokens):
  """log p(byte t) at every t, from logits [..., length, 257]."""
  return np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None],
                            -1)[..., 0]


def row(file: bytes, label: int | None = None) -> dict:
  """One row in the layout of data.source="bytes" (byte_rows.make_row)."""
  return byte_rows.make_row([file], SEQ_LEN, SIZE, label)


def motif_file(rng, label: int) -> bytes:
  motif = rng.integers(128 * label, 128 * label + 128, 3)
  return bytes(np.resize(motif, rng.integers(4, SEQ_LEN - 2 * SIZE + 1)).tolist())


def rows(count: int, seed: int, labelled: bool = False) -> list[dict]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, count)
  return [row(motif_file(rng, label), label if labelled else None) for label in labels]


def stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class ByteValues:
  """The tokenizer of data.source="bytes" as the trainer sees it: 257 ids, 256 = pad/bos/eos."""

  vocab_size, pad_id, bos_id, eos_id = 257, PAD, PAD, PAD

  def encode(self, text):
    return list(text.encode())

  def decode(self, ids):
    return bytes(i for i in ids if i < 256).decode(errors="replace")


class InTestBytes:
  """Stands in for llm_research.data while a run trains: these rows, checkpointable (grain)."""

  def __init__(self, labelled: bool):
    self.train_rows, self.eval_rows = rows(64, 0, labelled), rows(16, 1, labelled)
    self.patch_sizes = []

  def get_tokenizer(self, data_config):
    return ByteValues()

  def make_train_iterator(self, data_config, tokenizer, *, global_batch_size, seed, patch_size,
                          **_):
    self.patch_sizes.append(patch_size)
    dataset = grain.MapDataset.source(self.train_rows).shuffle(seed).repeat()
    return iter(dataset.batch(global_batch_size).to_iter_dataset())

  def make_eval_iterator(self, data_config, tokenizer, *, global_batch_size, patch_size, **_):
    self.patch_sizes.append(patch_size)
    return iter(grain.MapDataset.source(self.eval_rows).batch(global_batch_size)
                .to_iter_dataset())


def trained(tmp_path_factory, name: str, labelled: bool, *overrides):
  """Trains OVERRIDES + overrides on in-test rows: (config, workdir, the in-test data,
  sample.load_run of the workdir)."""
  config = with_overrides(base_config(), [*OVERRIDES, *overrides])
  workdir = str(tmp_path_factory.mktemp(name))
  source = InTestBytes(labelled)
  with pytest.MonkeyPatch.context() as patch:
    for function in ("get_tokenizer", "make_train_iterator", "make_eval_iterator"):
      patch.setattr(training.loop.data, function, getattr(source, function))
    training.train_and_evaluate(config, workdir)
    assert set(source.patch_sizes) == {SIZE}  # the model's data_options reach the data
    run = sample.load_run(workdir)
  return config, workdir, source, run


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
  return trained(tmp_path_factory, "bgpt_generative", False)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, generative_run):
  _, source_workdir, *_ = generative_run
  # The in-test rows stand in for a labelled dataset's (a classifier needs one).
  return trained(tmp_path_factory, "bgpt_classifier", True, "model.num_classes=2",
                 "data.byte_dataset=digits_bmp", f"train.init_from={source_workdir}",
                 "train.learning_rate=0.003")


# ---- the model -----------------------------------------------------------------------------------

def test_a_byte_sees_every_earlier_byte_and_never_itself_or_a_later_one():
  """Byte s changed, in a batch of one copy per s: logits[t] change exactly for t > s, within
  a patch and across patch boundaries (through the patch decoder). The row ends mid-patch (the
  model pads it inside). An untied head here, tied in the generation tests."""
  apply, params = init(tiny(tie_embeddings=False))
  length = 4 * SIZE - 1
  tokens = random_bytes(1, (1, length))
  changed = jnp.tile(tokens, (length, 1))
  changed = changed.at[jnp.arange(length), jnp.arange(length)].set(
      (tokens[0] + 101) % 256)  # row s: byte s changed
  logits = apply({"params": params}, jnp.concatenate([tokens, changed]))  # one batch: exact
  assert logits.shape == (length + 1, length, 257)
  moved = np.asarray(logits[1:] != logits[:1]).any(-1)  # [s, t]
  np.testing.assert_array_equal(moved, np.triu(np.ones((length, length), bool), k=1))


def test_padding_never_enters_the_loss_and_the_loss_is_the_mean_nll_of_real_bytes():
  cfg = tiny()
  _, params = init(cfg)
  batch = stack(rows(4, 2))
  losses = jax.jit(lambda p, b: training.batch_losses(p, b, model=cfg.make_model())[1])
  sums = losses(params, batch)
  real = batch["segment_ids"] > 0
  apply, _ = init(cfg)
  reference = -log_probs_of(apply({"params": params}, batch["inputs"]), batch["targets"])[real]
  assert float(sums["count"]) == real.sum()
  np.testing.assert_allclose(float(sums["nll"]), reference.sum(), rtol=1e-5)
  scrambled = dict(batch)
  noise = np.random.default_rng(3).integers(0, 256, batch["inputs"].shape)
  scrambled["inputs"] = scrambled["targets"] = np.where(real, batch["inputs"], noise)
  assert float(losses(params, scrambled)["nll"]) == float(sums["nll"])  # bit for bit
  # ...while a real byte (the last before the end patch) moves it.
  last = real[0].sum() - SIZE - 1
  poked = dict(batch)
  poked["inputs"] = poked["targets"] = batch["inputs"].copy()
  poked["inputs"][0, last] = (batch["inputs"][0, last] + 1) % 256
  assert float(losses(params, poked)["nll"]) != float(sums["nll"])


@pytest.mark.parametrize("cfg", [tiny(), tiny(tie_embeddings=False),
                                 tiny(num_classes=3), tiny(scan_layers=False)],
                         ids=["tied", "untied", "classifier", "loop"])
def test_num_params_counts_the_params_the_model_makes(cfg):
  params = jax.eval_shape(cfg.make_model().init, jax.random.key(0),
                          jnp.zeros((1, SEQ_LEN), jnp.int32))["params"]
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))
  assert cfg.num_params(include_embeddings=False) < cfg.num_params()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"num_classes": 5}], ids=["generative", "classifier"])
def test_flops_per_byte_are_within_a_tenth_of_xlas_count_of_a_training_gradient(extra):
  cfg = tiny(embed_dim=128, num_heads=2, num_kv_heads=2, head_dim=64, mlp_dim=256,
             patch_size=16, **extra)
  batch, length = 2, 128
  model, tokens = cfg.make_model(), jnp.zeros((batch, length), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, tokens))
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] / (batch * length) == pytest.approx(cfg.flops_per_token(length), rel=0.1)


def test_the_paper_size_is_about_110m_params():
  assert 100e6 < BgptConfig(vocab_size=257).num_params() < 120e6


# ---- generation ----------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7], [], list(range(40, 40 + 2 * SIZE)), [PAD] * SIZE + [1, 2, 3, 4, 5]]


def test_cached_generation_equals_the_full_forward():
  """Prompts ending mid-patch, empty, on a patch boundary, after a separator patch: the logits
  each new byte was drawn from are the full forward's at its position, and greedy bytes are
  their argmax."""
  cfg = tiny()
  apply, params = init(cfg)
  new, logits, steps = bgpt.generate_arrays(cfg, params, PROMPTS, max_new_tokens=9,
                                            with_logits=True)
  assert steps == 9
  # One forward over every row (causal: what follows a row's end changes none of its logits).
  rows = [prompt + np.asarray(new[r]).tolist() for r, prompt in enumerate(PROMPTS)]
  full = apply({"params": params}, jnp.array([r + [0] * (SEQ_LEN - len(r)) for r in rows]))
  for r, prompt in enumerate(PROMPTS):
    np.testing.assert_allclose(logits[r], full[r, len(prompt):len(rows[r])], atol=1e-4)
    np.testing.assert_array_equal(new[r], np.argmax(full[r, len(prompt):len(rows[r])], -1))


def constant_writer(value: int):
  """Params of a tiny untied model that writes `value` whatever it reads: every block adds
  nothing (zero output projections), the residual stream's first dim is positive, and the head
  maps that dim to `value` alone."""
  cfg = tiny(tie_embeddings=False)
  _, params = init(cfg)
  def edit(path, x):
    name = training.param_path(path)
    if name.endswith(("attn/out/kernel", "mlp/down/kernel")):
      return jnp.zeros_like(x)
    if name in ("patch_decoder/embedding", "byte_decoder/embedding"):
      return jnp.zeros_like(x).at[..., 0].set(1.0)
    if name.endswith("norm/scale") and "layers" not in name:
      return jnp.zeros_like(x).at[0].set(1.0)
    if name == "byte_decoder/head/kernel":
      return jnp.zeros_like(x).at[0, value].set(1.0)
    return x
  return cfg, jax.tree_util.tree_map_with_path(edit, params)


def test_conversion_writes_after_the_separator_and_stops_at_the_end_patch():
  """Every call generates 5 patches at most after 2 prompt patches (one compilation)."""
  cfg, params = constant_writer(PAD)  # ends the file at once: an end patch, then stop
  new, _, steps = bgpt.generate_arrays(cfg, params, [[9] * SIZE + [PAD] * SIZE] * 2,
                                       max_new_tokens=5 * SIZE)
  assert steps == SIZE and np.all(np.asarray(new)[:, :SIZE] == PAD)
  assert bgpt.convert(cfg, params, [b"\x09\x08", b"\x07"], max_bytes=16) == [b"", b""]
  cfg, params = constant_writer(65)  # never ends: cut at max_bytes
  assert bgpt.convert(cfg, params, [b"xyz", b""], max_bytes=14) == [b"A" * 14] * 2


# ---- training, sampling and classification through the trainer ----------------------------------

def test_a_run_trains_logs_bits_per_byte_and_mfu_from_its_own_flops(generative_run):
  config, workdir, source, (_, _, model_config, params, step) = generative_run
  records = read_metrics(workdir)
  assert step == 6 and [r["step"] for r in records] == list(range(1, 7))
  assert records[-1]["loss"] < records[0]["loss"]
  tokens_per_step = config.train.batch_size * SEQ_LEN
  for r in records[1:]:
    flops = r["mfu"] * 1e12 * r["step_time_s"]
    assert flops == pytest.approx(model_config.flops_per_token(SEQ_LEN) * tokens_per_step,
                                  rel=1e-6)
  # The final eval, recomputed here over the same rows (2 batches of 8: all 16).
  batch = stack(source.eval_rows)
  apply, _ = init(model_config)
  real = batch["segment_ids"] > 0
  nll = -log_probs_of(apply({"params": params}, batch["inputs"]), batch["targets"])[real].mean()
  assert records[-1]["eval_loss"] == pytest.approx(nll, rel=1e-5)
  assert records[-1]["eval_bits_per_byte"] == pytest.approx(nll / math.log(2), rel=1e-5)


def test_sampling_a_run_goes_through_bgpts_generation_and_prompts_without_bos(generative_run):
  config, _, _, (_, tokenizer, model_config, params, _) = generative_run
  text = sample.sample_texts(config, tokenizer, model_config, params, ["ab"])[0]
  settings = dict(max_new_tokens=8, rng=jax.random.key(config.sample.seed), eos_id=PAD)
  new = decode.generate(model_config, params, [list(b"ab")], **settings)
  assert new == bgpt.generate(model_config, params, [list(b"ab")], **settings)
  assert text == tokenizer.decode(new[0])


def test_sample_cli_escapes_the_bytes_a_terminal_cannot_show(generative_run, capsys):
  assert sample.printable(b"ok\x00\tab\n\xff\xe2\x82\xac\x1b[0m\x7f") == (
      "ok\\x00\tab\n\\xff\u20ac\\x1b[0m\\x7f")  # printable UTF-8, newline and tab kept
  config, workdir, _, (_, _, model_config, params, _) = generative_run
  settings = dict(max_new_tokens=8, rng=jax.random.key(config.sample.seed), eos_id=PAD)
  new = decode.generate(model_config, params, [[1, 97]], **settings)[0]
  written = RawByteTokenizer.decode_bytes(new)
  texts = sample.main(["--workdir", workdir, "--prompt", "\x01a"])
  assert texts == [sample.printable(written)]
  assert capsys.readouterr().out == f"--- step 6, prompt '\\x01a' ---\n\\x01a{texts[0]}\n"
  # A prompt byte that is not UTF-8 ($'\xff' in a shell: Python's argv holds it as '\udcff')
  # is that byte, shown escaped.
  sample.main(["--workdir", workdir, "--prompt", "\udcff", "--max_new_tokens", "0"])
  assert capsys.readouterr().out == "--- step 6, prompt '\\udcff' ---\n\\xff\n"


def test_fine_tuning_a_classifier_from_a_generative_run(generative_run, classifier_run):
  """init_from copies the patch decoder, drops the byte decoder and draws a head; the run
  reports accuracy, which matches the argmax of its final model on the eval rows."""
  _, _, _, (_, _, generative, source_params, _) = generative_run
  config, workdir, source, (_, _, classifier, params, _) = classifier_run
  converted = init_from.convert(generative, classifier, source_params, seed=0)
  assert set(converted) == {"patch_decoder", "classifier"}
  jax.tree.map(np.testing.assert_array_equal, converted["patch_decoder"],
               source_params["patch_decoder"])
  records = read_metrics(workdir)
  assert all(0 <= r["accuracy"] <= 1 for r in records)
  batch = stack(source.eval_rows)
  apply, _ = init(classifier)
  predicted = np.argmax(apply({"params": params}, batch["inputs"], batch["positions"],
                              batch["segment_ids"]), -1)
  assert records[-1]["eval_accuracy"] == pytest.approx(np.mean(predicted == batch["label"]))
  assert "eval_bits_per_byte" not in records[-1]
  with pytest.raises(ConfigError, match="a classifier does not generate"):
    decode.generate(classifier, params, [[1]], max_new_tokens=2)


def test_init_from_refuses_a_changed_patch_size(generative_run):
  _, _, _, (_, _, generative, _, _) = generative_run
  with pytest.raises(ConfigError, match="model.patch_size is 4 there, 8 here"):
    init_from.convert(generative, dataclasses.replace(generative, patch_size=8), {})


def test_init_from_a_bgpt_run_into_a_transformer_names_the_models(generative_run,
                                                                   tiny_overrides, tmp_path):
  _, workdir, _, _ = generative_run
  before = snapshot(workdir)
  with pytest.raises(SystemExit) as raised:
    cli.main(cli_args([*tiny_overrides, f"train.init_from={workdir}"], tmp_path / "new_run"))
  assert raised.value.code == (f"error: train.init_from={workdir!r} is a model.name='bgpt' run, "
                               "this one model.name='transformer': init_from converts between "
                               "runs of the same model")
  assert snapshot(workdir) == before and not (tmp_path / "new_run").exists()


# ---- config errors -------------------------------------------------------------------------------

def train_only_folder(path) -> str:
  """A folder of one file, which goes to the train split: its validation split is empty."""
  path.mkdir()
  name = next(f"file{i}.bin" for i in range(100) if split_of(f"file{i}.bin") == "train")
  (path / name).write_bytes(bytes(range(40)))
  return str(path)


@pytest.mark.parametrize("overrides, message", [
    (["model.num_classes=10"], "model.num_classes=10 is a classifier, but "
                               "data.byte_dataset='cpu_states' has no labels"),
    (["data.byte_dataset=files", "data.byte_dir={train_only}"],
     "data.byte_dir '{train_only}' has no files in split 'validation'"),
    (["data.byte_dataset=files", "data.byte_dir={a_file}"],
     "data.byte_dir '{a_file}' is not a directory"),
], ids=["classifier-without-labels", "byte-dir-without-validation-files", "byte-dir-is-a-file"])
def test_bad_byte_data_is_one_line_before_anything_runs(overrides, message, generative_run,
                                                        tiny_overrides, tmp_path):
  (tmp_path / "a_file").write_bytes(bytes(range(40)))
  fill = dict(train_only=train_only_folder(tmp_path / "train_only"),
              a_file=str(tmp_path / "a_file"))
  existing_run = shutil.copytree(generative_run[1], tmp_path / "existing_run")
  before = snapshot(existing_run)
  for workdir in (existing_run, tmp_path / "new_run"):
    with pytest.raises(SystemExit) as raised:
      cli.main(cli_args([*tiny_overrides, *OVERRIDES, *(o.format(**fill) for o in overrides)],
                        workdir))
    assert raised.value.code.startswith(f"error: {message.format(**fill)}"), raised.value.code
    assert "\n" not in raised.value.code
  assert snapshot(existing_run) == before
  assert not (tmp_path / "new_run").exists()


def test_pack_refuses_a_bgpt_run_by_name(generative_run, tmp_path):
  _, workdir, _, _ = generative_run
  before = snapshot(workdir)
  with pytest.raises(SystemExit) as raised:
    pack.main(["--workdir", workdir, "--out", str(tmp_path / "packed")])
  assert raised.value.code == (f"error: {workdir!r}: model.name='bgpt' has no BitNet linear "
                               "layers to pack")
  assert snapshot(workdir) == before
  assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize("bad, message", [
    (dict(patch_size=0), "model.patch_size=0 must be at least 1"),
    (dict(num_byte_layers=0), "model.num_byte_layers=0 must be at least 1"),
    (dict(num_classes=-1), "model.num_classes=-1 must not be negative"),
    (dict(vocab_size=259), "model.vocab_size=259: bgpt reads bytes"),
    (dict(num_heads=3, num_kv_heads=2), "model.num_kv_heads=2 must divide num_heads=3"),
    (dict(dtype="fp8"), "model.dtype='fp8'"),
])
def test_bad_model_values_name_the_key(bad, message):
  with pytest.raises(ConfigError, match=message):
    BgptConfig(**{"vocab_size": 257, **TINY, **bad})


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=30"], "data.seq_len=30 is not a multiple of model.patch_size=4"),
    (["model.max_patches=4"], "data.seq_len=32 is 8 patches of model.patch_size=4: more than "
                              "model.max_patches=4"),
])
def test_a_row_length_the_model_cannot_take_is_refused_before_the_run(overrides, message):
  with pytest.raises(ConfigError, match=message):
    training.check_config_values(with_overrides(base_config(), [*OVERRIDES, *overrides]))


def test_bad_generation_input_is_refused():
  cfg = tiny()
  _, params = init(cfg)
  with pytest.raises(ConfigError, match="values 0..256, not 0..300"):
    bgpt.generate(cfg, params, [[0, 300]], max_new_tokens=1)
  with pytest.raises(ConfigError, match="more than model.max_patches=64"):
    bgpt.generate(cfg, params, [[1] * 250], max_new_tokens=10)


def test_bgpt_has_its_own_model_section():
  section = registry.config_section("bgpt")
  bgpt_only = {"patch_size", "num_patch_layers", "num_byte_layers", "max_patches", "num_classes"}
  assert bgpt_only <= set(section) and not bgpt_only & set(registry.config_section())
  assert section["embed_dim"] == bgpt.PRESETS["paper"]["embed_dim"] == 768  # its own default
  assert "num_classes" in registry.shape_keys("bgpt")


# ---- sharded equals one device -------------------------------------------------------------------

MESHES = {"data4_tensor2": ["mesh.data=4", "mesh.tensor=2"],
          "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}
STEPS = 2
# A projection of each decoder [layers, embed, heads / mlp, ...]: split over tensor (and fsdp).
WATCHED = ("patch_decoder/layers/attn/query/kernel", "byte_decoder/layers/mlp/up/kernel")


def sharded_run(mesh_overrides, labelled: bool = False) -> dict:
  """STEPS train steps of the tiny model (a classifier if `labelled`) on fixed rows under a
  mesh: the losses, the final params and the layouts of the WATCHED ones."""
  extra = ["model.num_classes=2"] if labelled else []
  config = with_overrides(base_config(), [*OVERRIDES, *extra, *mesh_overrides])
  trainer = training.Trainer(config, ByteValues())
  state = trainer.init_state()
  examples = rows(STEPS * 8, 5, labelled)
  losses = []
  for k in range(STEPS):
    state, metrics = trainer.step(state, stack(examples[8 * k:8 * (k + 1)]))
    losses.append(float(metrics["loss"]))
  flat = {training.param_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  return {"losses": np.array(losses), **{k: np.asarray(x) for k, x in flat.items()},
          **{f"layout|{k}": np.array(str(flat[k].sharding.spec)) for k in WATCHED if k in flat}}


def sharded_cases():
  return {**{(name, False): overrides for name, overrides in MESHES.items()},
          ("data4_tensor2", True): MESHES["data4_tensor2"]}


def worker(out_path: str):
  assert jax.device_count() == 8, jax.devices()
  arrays = {}
  for (name, labelled), overrides in sharded_cases().items():
    for key, value in sharded_run(overrides, labelled).items():
      arrays[f"{name}|{labelled}|{key}"] = value
  np.savez(out_path, **arrays)


@pytest.mark.slow
def test_sharded_training_equals_one_device(tmp_path):
  from conftest import beside_eight_devices
  out = tmp_path / "sharded.npz"
  here = lambda: {labelled: sharded_run(["mesh.data=1"], labelled) for labelled in (False, True)}
  single = beside_eight_devices([os.path.abspath(__file__), out], tmp_path / "worker.log", here)
  sharded = np.load(out)
  for (name, labelled) in sharded_cases():
    for key, value in single[labelled].items():
      if not key.startswith("layout|"):
        np.testing.assert_allclose(sharded[f"{name}|{labelled}|{key}"], value, rtol=2e-4,
                                   atol=2e-5, err_msg=f"{name} labelled={labelled}: {key}")
  for name, labelled in (("data4_tensor2", False), ("data2_fsdp2_tensor2", False)):
    for key in WATCHED:
      spec = str(sharded[f"{name}|{labelled}|layout|{key}"])
      assert "tensor" in spec and ("fsdp" in spec or "fsdp" not in name), (name, key, spec)


if __name__ == "__main__":
  worker(sys.argv[1])

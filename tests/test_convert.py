"""Hugging Face checkpoints in and out (llm_research.convert), against `transformers` itself.

Tiny random models are built with transformers (initializer_range 0.2, so the logits are of
order one) and saved with save_pretrained; nothing is downloaded. Logits are compared in
float32 on the same tokens within LOGITS_BOUND (measured: at most 1.1e-5, Mixtral, with logits
up to 7).
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import convert_worker  # noqa: E402
from conftest import TESTS_DIR, beside_eight_devices  # noqa: E402
from llm_research import convert, decode, sample  # noqa: E402
from llm_research.hf import safetensors_io, weights  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGITS_BOUND = 1e-4
VOCAB = 300
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128, initializer_range=0.2)
MODELS = {  # name: (config class, model class, settings)
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_untied": ("LlamaConfig", "LlamaForCausalLM",
                      dict(tie_word_embeddings=False, rope_theta=5e5, num_key_value_heads=1)),
    "llama31_scaled": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
}
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))


def build_hf(name: str, folder: str, **changes):
  config_class, model_class, settings = MODELS[name]
  torch.manual_seed(0)
  config = getattr(transformers, config_class)(**{**SIZES, **settings, **changes})
  model = getattr(transformers, model_class)(config).eval()
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """{name: (transformers model, its save_pretrained folder)}."""
  root = tmp_path_factory.mktemp("hf")
  return {name: (build_hf(name, str(root / name)), str(root / name)) for name in MODELS}


def hf_logits(model, tokens=TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def our_logits(config, params, tokens=TOKENS) -> np.ndarray:
  return np.asarray(config.make_model().apply({"params": params}, jnp.asarray(tokens)))


def test_transformers_imports_from_the_repository_root():
  """The top-level kernels/ folder must not shadow PyPI's `kernels` (transformers imports it)."""
  code = ("import transformers, kernels, llm_research.kernels.flash_attention as ours; "
          "from transformers import LlamaForCausalLM; "
          "assert 'site-packages' in kernels.__file__, kernels.__file__; print(ours.__name__)")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_transformers(hf_models, name, scan_layers):
  model, folder = hf_models[name]
  config, params = convert.from_hf(folder, scan_layers=scan_layers)
  assert config.scan_layers == scan_layers
  expected = hf_logits(model)
  assert np.abs(expected).max() > 0.5  # logits of order one: the bound means something
  np.testing.assert_allclose(our_logits(config, params), expected, rtol=0, atol=LOGITS_BOUND)


@pytest.mark.parametrize("name", ["llama3_untied", "mixtral"])
def test_greedy_generation_equals_transformers(hf_models, name):
  model, folder = hf_models[name]
  config, params = convert.from_hf(folder)
  prompts = [list(TOKENS[0, :5]), list(TOKENS[1, :5])]
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 5),
                              max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0).numpy()[:, 5:]
  ours = decode.generate(config, params, prompts, max_new_tokens=8, temperature=0.0)
  assert ours == expected.tolist()


@pytest.mark.parametrize("name", MODELS)
def test_to_hf_loads_in_transformers_and_round_trips_exactly(hf_models, name, tmp_path):
  _, folder = hf_models[name]
  for scan_layers in (True, False):
    config, params = convert.from_hf(folder, scan_layers=scan_layers)
    out = str(tmp_path / f"out_{scan_layers}")
    convert.to_hf(config, params, out, max_shard_bytes=100_000)  # several shards
    assert len(json.load(open(os.path.join(out, safetensors_io.INDEX_FILE)))["weight_map"])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded), our_logits(config, params), rtol=0,
                               atol=LOGITS_BOUND)
    again_config, again = convert.from_hf(out, scan_layers=scan_layers)
    assert again_config == config
    flat = lambda tree: dict(zip(*map(list, zip(*_leaves(tree)))))
    first, second = flat(params), flat(again)
    assert first.keys() == second.keys()
    for path in first:  # exactly: embed_dim 64 makes the tied rescale exact (weights.py)
      np.testing.assert_array_equal(np.asarray(first[path]), np.asarray(second[path]), path)


def _leaves(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


# Each param's PartitionSpec under the mesh fsdp=2, tensor=2, expert=2 (layer params as one
# layer's: a scanned one adds None for its layer axis): the layout training gives the params
# under config.py's logical-axis rules (vocab, heads, kv_heads, mlp -> tensor; embed -> fsdp).
SPECS_3D = {
    "embedding": ["tensor", "fsdp"], "head/kernel": ["fsdp", "tensor"],
    "final_norm/scale": ["fsdp"], "attn_norm/scale": ["fsdp"], "mlp_norm/scale": ["fsdp"],
    "attn/query/kernel": ["fsdp", "tensor", None], "attn/key/kernel": ["fsdp", "tensor", None],
    "attn/value/kernel": ["fsdp", "tensor", None], "attn/out/kernel": ["tensor", None, "fsdp"],
    "mlp/router/kernel": ["fsdp", None], "mlp/gate/kernel": ["expert", "fsdp", "tensor"],
    "mlp/up/kernel": ["expert", "fsdp", "tensor"], "mlp/down/kernel": ["expert", "tensor", "fsdp"],
}


def test_from_hf_places_params_sharded_on_8_devices(hf_models, tmp_path):
  """Under a mesh, each param comes out with training's sharding (each device holding only its
  slice) and the values of the one-device conversion, scanned and looped (Mixtral: the
  expert axis too)."""
  _, folder = hf_models["mixtral"]
  out = tmp_path / "eight.npz"
  one_device = beside_eight_devices(
      [os.path.join(TESTS_DIR, "convert_worker.py"), folder, out], tmp_path / "worker.log",
      lambda: {layout: convert_worker.leaves(convert.from_hf(folder, scan_layers=scan)[1])
               for layout, scan in convert_worker.LAYOUTS.items()})
  eight = dict(np.load(out))
  summary = json.loads(str(eight.pop("summary")))
  for mesh_name, sizes in convert_worker.MESHES.items():
    for layout, params in one_device.items():
      for path, expected in params.items():
        name = f"{mesh_name}|{layout}|{path}"
        np.testing.assert_array_equal(eight[name], np.asarray(expected), name)
        placed = summary[name]
        assert placed["devices"] == list(range(8)), name
        if mesh_name == "fsdp2_tensor2_expert2":
          in_layer = path.split("/", 1)[1] if path.startswith("layers") else path
          assert placed["spec"] == [None] * path.startswith("layers/") + SPECS_3D[in_layer], name
        ways = [math.prod(sizes[a] for a in ([axes] if isinstance(axes, str) else axes or []))
                for axes in placed["spec"]]
        ways += [1] * (expected.ndim - len(ways))
        assert placed["slice"] == [[n // w for n, w in zip(expected.shape, ways)]] * 8, name
  # fsdp=8 splits embed (64) eight ways: [layers, experts, embed, mlp]
  assert summary["fsdp8|scanned|layers/mlp/gate/kernel"]["slice"][0] == [2, 4, 8, 96]


def test_host_holds_one_tensor_at_a_time(tmp_path):
  """tracemalloc counts the host's numpy and Python allocations (not XLA's device buffers):
  converting a 4-layer model peaks at a few of its largest tensors, never a stacked param
  (4 layers of it) nor the model."""
  folder = str(tmp_path / "llama")
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
      **SIZES, "num_hidden_layers": 4, "intermediate_size": 8192})).save_pretrained(folder)
  largest = 4 * SIZES["hidden_size"] * 8192  # an MLP kernel, float32 (2 MiB: the Python
  # objects of tracing and compiling, about 0.5 MiB, stay small beside it)
  for scan_layers in (True, False):
    convert.from_hf(folder, scan_layers=scan_layers)  # compiled and traced once beforehand
    tracemalloc.start()
    try:
      convert.from_hf(folder, scan_layers=scan_layers)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < 3 * largest, f"scan_layers={scan_layers}: host peak {peak} bytes"


def test_bfloat16_checkpoints_read(hf_models, tmp_path):
  model, folder = hf_models["llama_tied"]
  config, params = convert.from_hf(folder)
  convert.to_hf(config, params, str(tmp_path / "bf16"), dtype="bfloat16")
  bf16_config, bf16 = convert.from_hf(str(tmp_path / "bf16"))
  assert bf16["embedding"].dtype == jnp.float32
  np.testing.assert_allclose(our_logits(bf16_config, bf16), hf_logits(model), atol=0.1)


def test_mixtral_fused_expert_layout_reads(hf_models, tmp_path):
  """transformers 5's in-memory layout (experts.gate_up_proj, experts.down_proj, mlp.gate)."""
  model, folder = hf_models["mixtral"]
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "model.layers.0.mlp.experts.gate_up_proj" in state
  hub = safetensors_io.Reader(folder).names
  assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in hub  # what was saved
  fused = tmp_path / "fused"
  fused.mkdir()
  safetensors_io.write_sharded(str(fused), state.items(), max_shard_bytes=10**9)
  with open(os.path.join(folder, "config.json")) as f, open(fused / "config.json", "w") as g:
    g.write(f.read())
  config, params = convert.from_hf(str(fused))
  np.testing.assert_allclose(our_logits(config, params), hf_logits(model), rtol=0,
                             atol=LOGITS_BOUND)


def _planted(monkeypatch, bug: str):
  """Makes the converter's tensor map wrong in one way a real converter could get wrong."""
  layer_entries, outer_entries = weights.layer_entries, weights.outer_entries

  def interleave(kernel):  # Meta's interleaved rotary pairs instead of the half-split
    *lead, d = kernel.shape
    return kernel.reshape(*lead, 2, d // 2).swapaxes(-1, -2).reshape(*lead, d)

  def wrong_layer(config, i, **kwargs):
    entries = layer_entries(config, i, **kwargs)
    by_path = {entry.path[:2]: entry for entry in entries}
    if bug == "gate_up_swapped":
      gate, up = by_path["mlp", "gate"], by_path["mlp", "up"]
      by_path["mlp", "gate"] = dataclasses.replace(gate, names=up.names)
      by_path["mlp", "up"] = dataclasses.replace(up, names=gate.names)
    if bug == "interleaved_rotary":
      for key in (("attn", "query"), ("attn", "key")):
        entry = by_path[key]
        by_path[key] = dataclasses.replace(
            entry, to_core=lambda w, f=entry.to_core: interleave(f(w)))
    if bug == "wrong_head_grouping":  # query head h reads kv head h % kv_heads
      entry, h, kv = by_path["attn", "query"], config.num_heads, config.num_kv_heads
      order = np.arange(h).reshape(kv, h // kv).T.reshape(-1)
      by_path["attn", "query"] = dataclasses.replace(
          entry, to_core=lambda w, f=entry.to_core: f(w)[:, order])
    return list(by_path.values())

  def no_tied_scale(config):
    return [dataclasses.replace(e, to_core=lambda w: w) if e.path[0] == "final_norm" else e
            for e in outer_entries(config)]

  monkeypatch.setattr(weights, "layer_entries", wrong_layer)
  if bug == "tied_scale_missing":
    monkeypatch.setattr(weights, "outer_entries", no_tied_scale)


@pytest.mark.parametrize("bug", ["gate_up_swapped", "interleaved_rotary", "wrong_head_grouping",
                                 "tied_scale_missing"])
def test_planted_mapping_bugs_break_the_logits(hf_models, monkeypatch, bug):
  model, folder = hf_models["llama_tied"]
  _planted(monkeypatch, bug)
  config, params = convert.from_hf(folder)
  error = np.abs(our_logits(config, params) - hf_logits(model)).max()
  assert error > 100 * LOGITS_BOUND, f"{bug}: max |logits difference| {error}"


def _refusal(capsys, argv) -> str:
  with pytest.raises(SystemExit) as exit_info:
    convert.main(argv)
  message = str(exit_info.value.code)
  assert message.startswith("error: ") and "\n" not in message, message
  return message


def _copy_folder(source, target):
  os.makedirs(target)
  for name in os.listdir(source):
    with open(os.path.join(source, name), "rb") as f, open(os.path.join(target, name), "wb") as g:
      g.write(f.read())


def test_bad_input_is_one_error_line_and_writes_nothing(hf_models, tmp_path, capsys):
  folder = str(tmp_path / "with_tokenizer")
  _copy_folder(hf_models["llama_tied"][1], folder)
  _save_tokenizer(folder)
  workdir = str(tmp_path / "run")

  def refused(hf_dir, *expected):
    message = _refusal(capsys, ["from-hf", hf_dir, workdir])
    for text in expected:
      assert text in message, message
    assert not os.path.exists(workdir)

  def edited(name, change=None, **config_changes):
    target = str(tmp_path / name)
    _copy_folder(folder, target)
    path = os.path.join(target, "config.json")
    hf = {**json.load(open(path)), **config_changes}
    json.dump(hf, open(path, "w"))
    if change:
      change(target)
    return target

  refused(str(tmp_path / "nowhere"), "config.json does not exist")
  message = _refusal(capsys, ["from-hf", folder, workdir, "--config.mesh.fsdp=2"])
  assert "mesh (data=-1, fsdp=2" in message and "1 device" in message, message
  assert not os.path.exists(workdir)
  refused(edited("gpt2", architectures=["GPT2LMHeadModel"], model_type="gpt2"),
          "GPT2LMHeadModel", "not supported")
  refused(edited("yarn_scaling", rope_parameters={
      "rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0,
      "original_max_position_embeddings": 64}),
      "rope_parameters.rope_type='yarn'")
  refused(edited("window", sliding_window=16), "sliding_window=16")
  refused(edited("shape", intermediate_size=80), "model.layers.0.mlp.gate_proj.weight",
          "does not fit")

  def truncate(target):
    path = os.path.join(target, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.truncate(size - 100)
  refused(edited("truncated", truncate), "model.safetensors", "not a complete safetensors")

  shards = []

  def shard(target):  # shards and an index, then one shard removed
    os.remove(os.path.join(target, "model.safetensors"))
    reader = safetensors_io.Reader(folder)
    shards.extend(safetensors_io.write_sharded(
        target, ((n, reader.get(n)) for n in sorted(reader.names)), max_shard_bytes=100_000))
    os.remove(os.path.join(target, shards[1]))
  refused(edited("missing_shard", shard), shards[1] if shards else "?", "missing")

  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write("{}")
  message = _refusal(capsys, ["from-hf", folder, workdir])
  assert "not a new or empty directory" in message
  assert os.listdir(workdir) == ["config.json"]


@pytest.mark.parametrize("header, data, expected", [
    ([1, 2], b"", "the header is not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"", "tensor 'w' has no dtype, shape and data_"),
    ({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"12", "'F8_E4M3'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234", "not a complete"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"12345678", "float32 (3,)"),
], ids=["not_an_object", "no_offsets", "unknown_dtype", "data_cut_short", "wrong_size"])
def test_malformed_safetensors_are_refused_naming_the_file(tmp_path, header, data, expected):
  encoded = json.dumps(header).encode()
  with open(tmp_path / safetensors_io.SINGLE_FILE, "wb") as f:
    f.write(len(encoded).to_bytes(8, "little") + encoded + data)
  with pytest.raises(convert.ConfigError) as error:
    safetensors_io.Reader(str(tmp_path))
  message = str(error.value)
  assert message.startswith(str(tmp_path / safetensors_io.SINGLE_FILE)), message
  assert expected in message and "\n" not in message, message


def test_qwen2_biases_are_refused_by_name(tmp_path, capsys):
  torch.manual_seed(0)
  config = transformers.Qwen2Config(**SIZES)
  transformers.Qwen2ForCausalLM(config).save_pretrained(str(tmp_path / "qwen2"))
  message = _refusal(capsys, ["from-hf", str(tmp_path / "qwen2"), str(tmp_path / "run")])
  assert "self_attn." in message and ".bias" in message and "biases" in message, message
  assert not os.path.exists(tmp_path / "run")


def test_top1_mixtral_is_refused_both_ways():
  """Mixtral weighs a lone expert 1, the core's top-1 router by its probability: refused."""
  from llm_research.hf import architectures
  hf = transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=1).to_dict()
  hf["architectures"] = ["MixtralForCausalLM"]
  with pytest.raises(convert.ConfigError, match="num_experts_per_tok=1 .*probability"):
    architectures.from_hf_config(hf, "config.json")
  hf["num_experts_per_tok"] = 2
  config = architectures.from_hf_config(hf, "config.json")
  with pytest.raises(convert.ConfigError, match="moe.experts_per_token=1 must be at least 2"):
    architectures.check_exportable(dataclasses.replace(
        config, moe=dataclasses.replace(config.moe, experts_per_token=1)))


def _save_tokenizer(folder: str):
  """A small byte-level BPE tokenizer.json (trained here) and its tokenizer_config.json."""
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB - 10, special_tokens=["<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
  tokenizer.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def test_cli_from_hf_sample_to_hf(hf_models, tmp_path, capsys):
  """from-hf writes a run that `sample` generates from (greedy: transformers' tokens) and
  that to-hf exports back to the same logits, tokenizer included."""
  model, folder = hf_models["llama3_untied"]
  hf_dir = str(tmp_path / "hf")
  _copy_folder(folder, hf_dir)
  _save_tokenizer(hf_dir)
  workdir, exported = str(tmp_path / "run"), str(tmp_path / "exported")
  convert.main(["from-hf", hf_dir, workdir, "--looped"])
  texts = sample.main(["--workdir", workdir, "--prompt", "def f", "--temperature", "0",
                       "--max_new_tokens", "6"])
  config, tokenizer, model_config, params, step = sample.load_run(workdir)
  assert step == 0 and not model_config.scan_layers
  prompt = [tokenizer.bos_id, *tokenizer.encode("def f")]
  with torch.no_grad():
    expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                              max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id)[0, len(prompt):]
  full, shown = tokenizer.decode(prompt + expected.tolist()), tokenizer.decode(prompt)
  assert texts == [full[len(shown):]]  # decoded after the prompt, as sample does
  convert.main(["to-hf", workdir, exported])
  assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(exported))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  np.testing.assert_allclose(hf_logits(reloaded), hf_logits(model), rtol=0, atol=LOGITS_BOUND)
  assert transformers.AutoTokenizer.from_pretrained(exported).encode(
      "def f", add_special_tokens=False) == tokenizer.encode("def f")


def test_main_init_from_a_converted_run_upcycles_it(hf_models, tmp_path, tiny_overrides):
  """`main` with train.init_from=<from-hf's workdir> into an MoE: at learning rate 0 the
  upcycled run still computes the Hugging Face model's logits (upcycling keeps the function)."""
  from llm_research import main as main_cli
  model, folder = hf_models["llama3_untied"]
  hf_dir, workdir, moe_run = (str(tmp_path / n) for n in ("hf", "run", "moe"))
  _copy_folder(folder, hf_dir)
  _save_tokenizer(hf_dir)
  convert.main(["from-hf", hf_dir, workdir])
  config = json.load(open(os.path.join(workdir, "config.json")))
  same = [f"--config.model.{k}={config['model'][k]}" for k in (
      "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
      "rope_theta", "norm_eps", "tie_embeddings")]
  main_cli.main(["--config", os.path.join(os.path.dirname(__file__), "tiny_config.py"),
                 "--workdir", moe_run, *[f"--config.{o}" for o in tiny_overrides], *same,
                 "--config.data.tokenizer=sentencepiece", f"--config.data.vocab_size={VOCAB}",
                 f"--config.data.tokenizer_file={config['data']['tokenizer_file']}",
                 f"--config.train.init_from={workdir}", "--config.model.mlp_impl=moe",
                 "--config.model.moe.num_experts=2", "--config.train.steps=2",
                 "--config.train.learning_rate=0.0", "--config.sample.max_new_tokens=0"])
  _, _, moe_config, params, step = sample.load_run(moe_run)
  assert step == 2 and moe_config.mlp_impl == "moe"
  np.testing.assert_allclose(our_logits(moe_config, params), hf_logits(model), rtol=0,
                             atol=LOGITS_BOUND)

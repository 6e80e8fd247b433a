"""The transformer core: causality, packed segments, KV cache, GQA shapes, scan vs loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_research.decode import generate, sample_logits
from llm_research.models import Transformer, TransformerConfig
from llm_research.models.attention import resolve_attention_impl, segment_lengths_and_offsets

VOCAB = 61


def tiny(**overrides) -> TransformerConfig:
  base = dict(vocab_size=VOCAB, num_layers=2, embed_dim=48, num_heads=6, num_kv_heads=2,
              head_dim=8, mlp_dim=80)
  return TransformerConfig(**{**base, **overrides})


class Jitted:
  """A model whose `apply` is compiled (eager Flax dispatch is slow on CPU)."""

  def __init__(self, module):
    self.module = module
    self.apply = jax.jit(module.apply, static_argnames="mutable")


def init(cfg, seed=0):
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 5), jnp.int32))["params"]
  return Jitted(model), nn.meta.unbox(params)


def random_tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


@pytest.mark.parametrize("cfg", [
    tiny(), tiny(num_kv_heads=1), tiny(num_kv_heads=6, tie_embeddings=False),
    tiny(scan_layers=False, remat_policy="full")], ids=["gqa", "mqa", "mha-untied", "loop-remat"])
def test_changing_a_future_token_changes_no_earlier_logit(cfg):
  model, params = init(cfg)
  tokens = random_tokens(1, (2, 13))
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % VOCAB)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_no_attention_across_packed_segments():
  """A packed row computes exactly what its documents compute alone."""
  model, params = init(tiny())
  doc_a, doc_b = random_tokens(2, (1, 6)), random_tokens(3, (1, 9))
  packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 2), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1] * 6 + [2] * 9 + [0] * 2])
  positions = jnp.array([list(range(6)) + list(range(9)) + [0, 0]])
  logits = model.apply({"params": params}, packed, positions, segment_ids)
  alone_a = model.apply({"params": params}, doc_a)
  alone_b = model.apply({"params": params}, doc_b)
  np.testing.assert_allclose(logits[:, :6], alone_a, atol=1e-5)
  np.testing.assert_allclose(logits[:, 6:15], alone_b, atol=1e-5)
  assert np.all(np.isfinite(logits))


def test_scan_and_loop_compute_the_same_function():
  model_scan, params = init(tiny(scan_layers=True))
  model_loop = Jitted(Transformer(tiny(scan_layers=False)))
  loop_params = {k: v for k, v in params.items() if k != "layers"}
  for i in range(2):
    loop_params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  tokens = random_tokens(4, (2, 11))
  np.testing.assert_allclose(model_scan.apply({"params": params}, tokens),
                             model_loop.apply({"params": loop_params}, tokens), atol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decoding_equals_the_full_forward_pass(scan):
  """Prefill + one-token steps give the logits of the full forward pass at every position."""
  cfg = tiny(scan_layers=scan)
  model, params = init(cfg)
  tokens = random_tokens(5, (3, 12))
  full = model.apply({"params": params}, tokens)
  cached = Jitted(Transformer(cfg, decode=True, cache_len=16))
  cache = jax.tree.map(jnp.zeros_like,
                       cached.module.init(jax.random.key(0), tokens[:, :1])["cache"])
  positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
  logits, state = cached.apply({"params": params, "cache": cache}, tokens[:, :5],
                               positions[:, :5], mutable=("cache",))
  steps = [logits]
  for t in range(5, 12):
    logits, state = cached.apply({"params": params, "cache": state["cache"]}, tokens[:, t:t + 1],
                                 positions[:, t:t + 1], mutable=("cache",))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_batched_greedy_generation_of_different_length_prompts_matches_one_by_one():
  cfg = tiny()
  model, params = init(cfg, seed=3)
  prompts = [[5, 9, 2, 44], [7], [1, 2, 3, 4, 5, 6, 7]]
  batched = generate(cfg, params, prompts, max_new_tokens=5)
  for prompt, new in zip(prompts, batched):
    # Greedy and causal: each new token is the argmax of the full forward pass at the position
    # before it, so one forward over prompt + new tokens checks them all.
    logits = model.apply({"params": params}, jnp.array([prompt + new]))
    predicted = jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)
    assert predicted.tolist() == new


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params = init(tiny(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, random_tokens(6, (2, 7)))
  assert logits.dtype == jnp.float32
  _, params32 = init(tiny())
  ref = Jitted(Transformer(tiny())).apply({"params": params32}, random_tokens(6, (2, 7)))
  np.testing.assert_allclose(logits, ref, atol=0.15, rtol=0.05)


def test_every_parameter_has_logical_axes():
  model = Transformer(tiny())
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)


def test_sampling_truncations():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  greedy = sample_logits(logits, keys, temperature=0.0)
  assert set(np.asarray(greedy).tolist()) == {0}
  top_k = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2))
  assert set(top_k.tolist()) == {0, 1}
  top_p = np.asarray(sample_logits(logits, keys, temperature=1.0, top_p=0.85))
  assert set(top_p.tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third token is needed
  full = np.asarray(sample_logits(logits, keys, temperature=1.0))
  assert abs((full == 0).mean() - 0.5) < 0.05


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=6, num_kv_heads=4), "num_kv_heads=4 must divide num_heads=6"),
    (dict(dtype="fp8"), "dtype='fp8'"),
    (dict(attention_impl="flash"), "attention_impl='flash'"),
    (dict(remat_policy="some"), "remat_policy='some'"),
    (dict(num_layers=0), "model.num_layers=0 must be at least 1"),
    (dict(head_dim=0), "head_dim=0 must be at least 1"),
    (dict(vocab_size=0), "vocab_size=0 must be at least 1"),
    (dict(mlp_impl="glu"), "mlp_impl='glu' is not one of"),
    (dict(linear_impl="int4"), "linear_impl='int4' is not one of"),
    (dict(lora_rank=-1), "model.lora_rank=-1 must not be negative"),
    (dict(attention_impl="pallas", head_dim=96), "attention_impl='pallas' takes head_dim in"),
    (dict(attention_impl="pallas", head_dim=64, dtype="float16"),
     "attention_impl='pallas' takes dtype float32 or bfloat16, not 'float16'"),
    (dict(attention_impl="cudnn", dtype="bfloat16"), "attention_impl='cudnn' needs a GPU"),
])
def test_bad_model_config_names_the_field(bad, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    tiny(**bad)


@pytest.mark.parametrize("backend, dtype, head_dim, impl", [
    ("cpu", jnp.bfloat16, 128, "xla"), ("tpu", jnp.float32, 64, "pallas"),
    ("gpu", jnp.bfloat16, 128, "cudnn"), ("gpu", jnp.float16, 64, "cudnn"),
    ("gpu", jnp.float32, 128, "pallas"), ("gpu", jnp.bfloat16, 256, "pallas"),
])
def test_auto_attention_is_cudnn_on_gpu_where_it_applies_pallas_on_tpu_xla_on_cpu(
    backend, dtype, head_dim, impl):
  assert resolve_attention_impl("auto", dtype, head_dim, backend) == impl
  assert resolve_attention_impl("xla", dtype, head_dim, backend) == "xla"


def test_packed_rows_become_cudnn_ragged_segments():
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0],
                           [1, 1, 1, 1, 1, 1, 1, 1],
                           [1, 2, 3, 4, 5, 6, 7, 8]])
  lengths, offsets = segment_lengths_and_offsets(segment_ids)
  pad = lambda row, n: row + [-1] * (n - len(row))
  np.testing.assert_array_equal(lengths, [pad([3, 2, 1], 8), pad([8], 8), [1] * 8])
  np.testing.assert_array_equal(offsets, [pad([0, 3, 5], 9), pad([0], 9),
                                          pad(list(range(8)), 9)])

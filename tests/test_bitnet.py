"""BitNet b1.58: the ternary matmul kernel, packing, BitLinear's STE, training, packed serving.

The kernel tests run the "gpu"-layout kernel compiled (Triton) on a GPU and in interpret mode
elsewhere; the "tpu" layout always in interpret mode; the unpacked prefill dots on the backend's
own XLA GEMMs. What `auto` dispatches to on GPU and TPU is read from exported modules.
"""
import dataclasses
import functools
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import TINY_CONFIG
from test_train import snapshot
from llm_research import main as train_cli
from llm_research import pack, sample
from llm_research.config import base_config
from llm_research.decode import generate
from llm_research.kernels.ternary_matmul import (BF16_EXACT_MAX_K, MatmulBlockSizes,
                                                 default_block_sizes, int8_matmul,
                                                 ternary_matmul, ternary_matmul_pallas,
                                                 ternary_matmul_reference,
                                                 ternary_matmul_unpacked, unpack_weights)
from llm_research.methods.ternary_packing import (pack_params, pack_ternary, param_bytes,
                                                  unpack_ternary)
from llm_research.models import Transformer, TransformerConfig, bitlinear
from llm_research.models.linear import Linear
from llm_research.training import (TrainState, learning_rate_schedule, make_optimizer,
                                   model_objective, train_step)
from llm_research.training.optimizer import weight_decay_schedule

VOCAB = 61
# The kernel as the dispatch runs it on this machine: compiled on a GPU, else interpreted.
KERNEL_IMPL = "pallas" if jax.default_backend() == "gpu" else "interpret"


def interpret_for(target):
  """Interpret mode for the "gpu" layout except on a GPU (which runs the real Triton kernel);
  always for the "tpu" layout, whose Mosaic kernel needs a TPU."""
  return target == "tpu" or jax.default_backend() != "gpu"


def tiny(**overrides) -> TransformerConfig:
  base = dict(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=64, linear_impl="bitnet")
  return TransformerConfig(**{**base, **overrides})


def random_ternary(rng, shape):
  return rng.integers(-1, 2, shape).astype(np.int8)


# ---- kernel -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [9, 36, 50])
def test_int8_matmul_is_exact(k):
  """The minimal reproduction of an XLA:GPU bug (kernels/ternary_matmul.py, `int8_matmul`):
  its int8 x int8 -> int32 dot returned exactly twice the product at K = 9 and 50. Through the
  guard the product is exact on every backend."""
  rng = np.random.default_rng(k)
  a = rng.integers(-128, 128, (3, k)).astype(np.int8)
  b = rng.integers(-128, 128, (k, 17)).astype(np.int8)
  exact = a.astype(np.int64) @ b.astype(np.int64)
  for matmul in (int8_matmul, jax.jit(int8_matmul)):
    out = matmul(jnp.asarray(a), jnp.asarray(b))
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), exact)


def test_reference_is_exact_where_xla_doubled_it():
  """K = 36: the reference contracts over K / 4 = 9, where the unguarded dot doubled on GPU."""
  rng = np.random.default_rng(36)
  x = rng.integers(-128, 128, (3, 36)).astype(np.int8)
  w = random_ternary(rng, (36, 17))
  out = ternary_matmul_reference(jnp.asarray(x), jnp.ones((3,)), pack_ternary(jnp.asarray(w)),
                                 1.0)
  np.testing.assert_array_equal(np.asarray(out), x.astype(np.int64) @ w.astype(np.int64))


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (3, 36, 17), (16, 200, 130), (300, 104, 72)],
                         ids=["tiny", "decode-odd", "decode-16", "prefill-ragged"])
def test_pallas_kernel_equals_integer_reference_exactly(m, k, n, target):
  """Blocks (32, 64, 16) divide none of M, N, K/4 in the ragged cases: the zero padding must
  keep the result exact, for the K loop (gpu) and the K grid axis (tpu) layouts."""
  rng = np.random.default_rng(m + k + n)
  x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = random_ternary(rng, (k, n))
  x_scale = jnp.ones((m,), jnp.float32)
  packed = pack_ternary(jnp.asarray(w))
  exact = x.astype(np.int64) @ w.astype(np.int64)
  ref = ternary_matmul_reference(jnp.asarray(x), x_scale, packed, 1.0)
  out = ternary_matmul_pallas(jnp.asarray(x), x_scale, packed, 1.0,
                              block_sizes=MatmulBlockSizes(32, 64, 16), target=target,
                              interpret=interpret_for(target))
  np.testing.assert_array_equal(np.asarray(ref), exact)
  np.testing.assert_array_equal(np.asarray(out), exact)


def test_kernel_applies_both_scales():
  rng = np.random.default_rng(0)
  x = rng.integers(-128, 128, (5, 24)).astype(np.int8)
  w = random_ternary(rng, (24, 7))
  x_scale = jnp.asarray(rng.uniform(0.01, 1, 5), jnp.float32)
  out = ternary_matmul(jnp.asarray(x), x_scale, pack_ternary(jnp.asarray(w)), 0.25,
                       impl=KERNEL_IMPL)
  expected = (x.astype(np.float64) @ w) * np.asarray(x_scale)[:, None] * 0.25
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


def test_kernel_rejects_bad_inputs_by_name():
  packed = jnp.zeros((2, 3), jnp.uint8)
  x_scale = jnp.ones((4,))
  with pytest.raises(TypeError, match="x must be int8"):
    ternary_matmul(jnp.zeros((4, 8), jnp.float32), x_scale, packed, 1.0)
  with pytest.raises(TypeError, match="packed must be uint8"):
    ternary_matmul(jnp.zeros((4, 8), jnp.int8), x_scale, packed.astype(jnp.int8), 1.0)
  with pytest.raises(ValueError, match="x has K=12"):
    ternary_matmul(jnp.zeros((4, 12), jnp.int8), x_scale, packed, 1.0)
  with pytest.raises(ValueError, match="x_scale must be"):
    ternary_matmul(jnp.zeros((4, 8), jnp.int8), jnp.ones((3,)), packed, 1.0)
  with pytest.raises(ValueError, match="impl="):
    ternary_matmul(jnp.zeros((4, 8), jnp.int8), x_scale, packed, 1.0, impl="cuda")
  with pytest.raises(ValueError, match="impl='pallas' needs a GPU or TPU"):
    ternary_matmul(jnp.zeros((4, 8), jnp.int8), x_scale, packed, 1.0, impl="pallas")


@pytest.mark.parametrize("platform,custom_call", [("cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu_custom_call")])
@pytest.mark.parametrize("m,k,n", [(1, 8192, 28672), (2048, 28672, 8192)],
                         ids=["decode", "prefill"])
def test_kernel_lowers_for_gpu_and_tpu(monkeypatch, platform, custom_call, m, k, n):
  """impl='pallas' lowers to one Triton (CUDA) or Mosaic (TPU) kernel at LLM sizes: block
  shapes, dtypes and ops the backend's Pallas lowering accepts. Abstract inputs, nothing is
  allocated; compiling the kernel IR needs the device and is not checked here."""
  from jax import export
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if platform == "cuda" else "tpu")
  args = (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32),
          jax.ShapeDtypeStruct((k // 4, n), jnp.uint8), jax.ShapeDtypeStruct((), jnp.float32))
  exported = export.export(
      jax.jit(lambda *a: ternary_matmul(*a, impl="pallas")), platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(custom_call)])(*args)
  assert exported.out_avals[0].shape == (m, n)
  assert exported.mlir_module().count(custom_call) == 1


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("m", [3, 300], ids=["decode", "prefill"])
def test_device_block_table_is_exact(m, target):
  """The table's blocks for `target`, fitted and padded as on the device."""
  rng = np.random.default_rng(m)
  x = rng.integers(-128, 128, (m, 1200)).astype(np.int8)  # K / 4 = 300: padded on both
  w = random_ternary(rng, (1200, 200))
  out = ternary_matmul_pallas(jnp.asarray(x), jnp.ones((m,)), pack_ternary(jnp.asarray(w)), 1.0,
                              block_sizes=default_block_sizes(target, m), target=target,
                              interpret=interpret_for(target))
  np.testing.assert_array_equal(np.asarray(out), x.astype(np.int64) @ w.astype(np.int64))


@pytest.mark.parametrize("backend,blocks,rule", [
    ("gpu", MatmulBlockSizes(16, 96, 64), "powers of two >= 16"),
    ("tpu", MatmulBlockSizes(16, 128, 128), "multiples of")])
def test_block_sizes_are_checked_against_the_backend_rules(monkeypatch, backend, blocks, rule):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  args = (jax.ShapeDtypeStruct((4, 8192), jnp.int8), jax.ShapeDtypeStruct((4,), jnp.float32),
          jax.ShapeDtypeStruct((2048, 1024), jnp.uint8), 1.0)
  with pytest.raises(ValueError, match=f"{backend} blocks must be {rule}"):
    jax.eval_shape(functools.partial(ternary_matmul, impl="pallas", block_sizes=blocks), *args)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.bfloat16])
def test_unpack_weights_inverts_packing_in_one_pass(dtype):
  """The quarter-plane layout read back whole: row i * K/4 + r of W is plane i of byte row r."""
  w = random_ternary(np.random.default_rng(2), (2, 24, 5))  # a leading (layers) axis too
  out = unpack_weights(pack_ternary(jnp.asarray(w)), dtype)
  assert out.dtype == dtype and out.shape == w.shape
  np.testing.assert_array_equal(np.asarray(out, np.int8), w)


@pytest.mark.parametrize("impl", ["unpacked_int8", "unpacked_bf16"])
@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (3, 36, 17), (300, 104, 72), (2, 8192, 8)],
                         ids=["tiny", "odd", "prefill-ragged", "k-8192"])
def test_unpacked_prefill_equals_the_reference_bit_for_bit(m, k, n, impl):
  """Both dense-dot paths, scales included. At K = 8192 column 0 sums activations of -128 and
  -127, about -2**20 with more significant bits than bf16 or TF32 hold: a bf16 dot whose sums
  were kept in either would show on a GPU (XLA:CPU sums in float32 whatever it is asked)."""
  rng = np.random.default_rng(m + k + n)
  x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = random_ternary(rng, (k, n))
  if k == 8192:
    x[:], w[:, 0] = rng.integers(-128, -126, (m, k)), 1
  x_scale = jnp.asarray(rng.uniform(0.01, 1, m), jnp.float32)
  packed = pack_ternary(jnp.asarray(w))
  out = ternary_matmul(jnp.asarray(x), x_scale, packed, 0.3, impl=impl)
  ref = ternary_matmul_reference(jnp.asarray(x), x_scale, packed, 0.3)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  exact = x.astype(np.int64) @ w.astype(np.int64)
  np.testing.assert_array_equal(np.asarray(ternary_matmul(jnp.asarray(x), jnp.ones((m,)), packed,
                                                          1.0, impl=impl)), exact)


def test_unpacked_dot_refuses_inexact_settings_by_name():
  """bf16 beyond the K where float32 sums of int8 products stay exact; an unknown dtype."""
  k = BF16_EXACT_MAX_K + 4
  args = (jax.ShapeDtypeStruct((2, k), jnp.int8), jax.ShapeDtypeStruct((2,), jnp.float32),
          jax.ShapeDtypeStruct((k // 4, 8), jnp.uint8), 1.0)
  with pytest.raises(ValueError, match=f"exact only for K <= {BF16_EXACT_MAX_K}, got K={k}"):
    jax.eval_shape(functools.partial(ternary_matmul, impl="unpacked_bf16"), *args)
  out = jax.eval_shape(functools.partial(ternary_matmul, impl="unpacked_int8"), *args)
  assert out.shape == (2, 8)
  with pytest.raises(ValueError, match="dot_dtype='float16' is not one of"):
    jax.eval_shape(functools.partial(ternary_matmul_unpacked, dot_dtype="float16"), *args)


@pytest.mark.parametrize("backend,m,k,expected", [
    ("gpu", 1, 1024, "triton"), ("gpu", 64, 1024, "triton"), ("gpu", 65, 1024, "bf16 dot"),
    ("gpu", 65, BF16_EXACT_MAX_K + 4, "int8 dot"), ("tpu", 512, 1024, "mosaic"),
    ("tpu", 513, 1024, "int8 dot"), ("cpu", 4096, 1024, "int8 dot")])
def test_auto_dispatch_by_backend_and_rows(monkeypatch, backend, m, k, expected):
  """What impl='auto' lowers to, read from the exported module: the Pallas kernel for decode
  rows, one dense dot above the backend's row threshold (bf16 on GPU while exact), and on CPU
  the reference's int8 dots."""
  from jax import export
  platform = {"gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}[backend]
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  args = (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32),
          jax.ShapeDtypeStruct((k // 4, 256), jnp.uint8), jax.ShapeDtypeStruct((), jnp.float32))
  calls = ("__gpu$xla.gpu.triton", "tpu_custom_call")
  module = export.export(
      jax.jit(ternary_matmul), platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(c) for c in calls])(
          *args).mlir_module()
  kernels = {"triton": module.count(calls[0]), "mosaic": module.count(calls[1])}
  dots = [line for line in module.splitlines() if "= stablehlo.dot_general" in line]
  if expected in kernels:
    assert kernels[expected] == 1 and not dots
  else:
    assert not any(kernels.values()) and dots
    assert all(("xbf16>" in d) == (expected == "bf16 dot") for d in dots), dots


def test_triton_launch_comes_from_the_block_table_entry(monkeypatch):
  """Warps, stages and split_k (the grid's third axis) reach the Triton call."""
  from jax import export
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  blocks = MatmulBlockSizes(16, 64, 128, num_warps=4, num_stages=2, split_k=2)
  args = (jax.ShapeDtypeStruct((1, 2048), jnp.int8), jax.ShapeDtypeStruct((1,), jnp.float32),
          jax.ShapeDtypeStruct((512, 1024), jnp.uint8), jax.ShapeDtypeStruct((), jnp.float32))
  module = export.export(
      jax.jit(functools.partial(ternary_matmul, impl="pallas", block_sizes=blocks)),
      platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          *args).mlir_module()
  for launch in ("num_stages = 2", "num_warps = 4", "grid_y = 16", "grid_z = 2"):
    assert f"{launch} : i32" in module, launch


@pytest.mark.parametrize("m,k,n", [(3, 360, 17), (16, 520, 130)], ids=["decode-odd", "decode-16"])
def test_gpu_split_k_is_exact(m, k, n):
  """K / 4 = 90 and 130 rows over 3 programs of 16-row blocks, each split holding some: the
  zero padding of the splits and the sum of their partial sums keep the product exact. TPU
  refuses a split."""
  rng = np.random.default_rng(m * k)
  x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = random_ternary(rng, (k, n))
  packed = pack_ternary(jnp.asarray(w))
  blocks = MatmulBlockSizes(16, 64, 16, split_k=3)
  out = ternary_matmul_pallas(jnp.asarray(x), jnp.ones((m,)), packed, 1.0, block_sizes=blocks,
                              target="gpu", interpret=interpret_for("gpu"))
  np.testing.assert_array_equal(np.asarray(out), x.astype(np.int64) @ w.astype(np.int64))
  with pytest.raises(ValueError, match="split_k must be >= 1, and 1 on TPU"):
    ternary_matmul_pallas(jnp.asarray(x), jnp.ones((m,)), packed, 1.0, block_sizes=blocks,
                          target="tpu", interpret=True)


# ---- packing ----------------------------------------------------------------------------------

def test_pack_unpack_round_trip_and_zero_byte():
  w = random_ternary(np.random.default_rng(1), (3, 20, 9))  # a leading (layers) axis too
  packed = pack_ternary(jnp.asarray(w))
  assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 9)
  np.testing.assert_array_equal(np.asarray(unpack_ternary(packed)), w)
  assert not np.any(pack_ternary(jnp.zeros((8, 2), jnp.int8)))  # byte 0 = four zeros


def test_packing_rejects_non_ternary_values_and_bad_shapes():
  with pytest.raises(ValueError, match="values must all be -1, 0 or \\+1"):
    pack_ternary(jnp.array([[0.5], [1], [0], [-1]]))
  with pytest.raises(ValueError, match="K a multiple of 4"):
    pack_ternary(jnp.zeros((6, 2), jnp.int8))
  with pytest.raises(ValueError, match="linear_impl must be 'bitnet'"):
    pack_params(tiny(linear_impl="dense"), {})
  with pytest.raises(ValueError, match="'query'.*input size 30.*multiple of 4"):
    pack_params(tiny(embed_dim=30), {})


def init_params(cfg, seed=0):
  return nn.meta.unbox(jax.jit(Transformer(cfg).init)(
      jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])


@pytest.mark.parametrize("overrides", [{}, dict(scan_layers=False, tie_embeddings=False)],
                         ids=["scanned", "loop-untied"])
def test_packed_model_computes_the_fake_quantized_model(overrides):
  cfg = tiny(**overrides)
  params = init_params(cfg)
  packed_cfg, packed = pack_params(cfg, params)
  assert packed_cfg.linear_impl == "ternary_packed"
  # Embedding, norms and head are kept as they were; projections shrink 16x (float32 -> 2 bit).
  np.testing.assert_array_equal(packed["embedding"], params["embedding"])
  if not cfg.tie_embeddings:
    np.testing.assert_array_equal(packed["head"]["kernel"], params["head"]["kernel"])
  kernels = lambda p: [x for path, x in jax.tree_util.tree_leaves_with_path(p)
                       if "kernel" in jax.tree_util.keystr(path) and "head" not in
                       jax.tree_util.keystr(path)]
  assert param_bytes(kernels(packed)) < param_bytes(kernels(params)) / 15
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, VOCAB)
  with jax.default_matmul_precision("highest"):  # the fake-quantized dots in float32, not TF32
    fake = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
    served = jax.jit(Transformer(packed_cfg).apply)({"params": packed}, tokens)
  np.testing.assert_allclose(served, fake, atol=1e-4, rtol=1e-4)


def test_packed_model_through_the_kernel_computes_the_fake_quantized_model(monkeypatch):
  """As above, with every projection of the packed model through the Pallas kernel (compiled on
  a GPU, interpreted elsewhere) instead of the CPU dispatch's jnp reference."""
  cfg = tiny()
  params = init_params(cfg)
  packed_cfg, packed = pack_params(cfg, params)
  calls = []

  def kernel(*args, **kwargs):
    calls.append(args[0].shape)  # x [M, K], counted as the model is traced
    return ternary_matmul(*args, impl=KERNEL_IMPL, **kwargs)

  monkeypatch.setattr(bitlinear, "ternary_matmul", kernel)
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, VOCAB)
  with jax.default_matmul_precision("highest"):  # the fake-quantized dots in float32, not TF32
    served = jax.jit(Transformer(packed_cfg).apply)({"params": packed}, tokens)
    fake = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
  assert calls, "the packed model did not call the kernel"
  np.testing.assert_allclose(served, fake, atol=1e-4, rtol=1e-4)


# ---- BitLinear --------------------------------------------------------------------------------

def rms_norm(x):
  """The parameter-free RMSNorm over the last axis (eps 1e-6, as BitLinear's)."""
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)


def rms_norm_vjp(x, g):
  """d/dx <g, rms_norm(x)>: with r = sqrt(mean(x^2) + eps) over the n features,
  g / r - x * sum(g * x) / (n * r^3)."""
  r = np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
  return g / r - x * np.sum(g * x, axis=-1, keepdims=True) / (x.shape[-1] * r**3)


def absmax_int8(x):
  """The paper's activation quantizer, per token (row): round(x * 127 / max|x|), dequantized."""
  absmax = np.max(np.abs(x), axis=-1, keepdims=True)
  return np.clip(np.round(x * 127 / absmax), -128, 127) * absmax / 127


def absmean_ternary(w):
  """The paper's weight quantizer, per tensor: round(W / mean|W|) clipped to [-1, 1],
  dequantized."""
  gamma = np.mean(np.abs(w))
  return np.clip(np.round(w / gamma), -1, 1) * gamma


@pytest.mark.parametrize("in_axes,features,out_axes", [
    (("embed",), (12,), ("mlp",)), (("heads", "head_dim"), (8,), ("embed",))])
def test_bitlinear_forward_and_straight_through_gradients_follow_the_paper(in_axes, features,
                                                                           out_axes):
  """BitNet b1.58 written out here in numpy, independently of bitlinear.py, on x and W
  flattened to [tokens, K] and [K, N]: y = Q_a(norm(x)) Q_w(W), with Q_a per-token absmax to
  int8 and Q_w per-tensor absmean to {-1, 0, +1}. With a cotangent c on y and straight-through
  estimators (each quantizer the identity backwards):
    dL/dW = Q_a(norm(x))^T c            (the dense gradient at the quantized activations)
    dL/dx = norm'(x)^T (c Q_w(W)^T)     (through the norm, not through Q_a)."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 8) if len(in_axes) == 2 else (2, 3, 16))
  layer = Linear(features, in_axes, out_axes, impl="bitnet")
  params = jax.jit(layer.init)(jax.random.key(1), x)["params"]
  with jax.default_matmul_precision("highest"):  # float32 dots, not a GPU's TF32
    y = jax.jit(layer.apply)({"params": params}, x)
    c = jax.random.normal(jax.random.key(2), y.shape)
    grad_w, grad_x = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x) * c),
                                      argnums=(0, 1)))(params, x)

  kernel = np.asarray(nn.meta.unbox(params)["kernel"], np.float64)
  n_in = len(in_axes)
  x2 = np.asarray(x, np.float64).reshape(-1, int(np.prod(x.shape[-n_in:])))  # [tokens, K]
  w2 = kernel.reshape(x2.shape[1], -1)  # [K, N]
  c2 = np.asarray(c, np.float64).reshape(x2.shape[0], -1)  # [tokens, N]
  a = absmax_int8(rms_norm(x2))
  np.testing.assert_allclose(np.asarray(y).reshape(c2.shape), a @ absmean_ternary(w2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nn.meta.unbox(grad_w)["kernel"], (a.T @ c2).reshape(kernel.shape),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_x, rms_norm_vjp(x2, c2 @ absmean_ternary(w2).T).reshape(
      x.shape), rtol=1e-5, atol=1e-5)


def test_bitnet_keeps_dense_param_names_shapes_and_axes():
  dense = jax.eval_shape(Transformer(tiny(linear_impl="dense")).init, jax.random.key(0),
                         jnp.zeros((1, 4), jnp.int32))
  bitnet = jax.eval_shape(Transformer(tiny()).init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))
  describe = lambda tree: jax.tree.map(
      lambda x: (x.value.shape, x.names) if isinstance(x, nn.Partitioned) else x.shape, tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert describe(dense) == describe(bitnet)


def test_linear_impl_is_validated_and_in_base_config():
  assert base_config().model.linear_impl == "dense"
  with pytest.raises(ValueError, match="linear_impl='ternary'"):
    tiny(linear_impl="ternary")


# ---- schedule, training, serving --------------------------------------------------------------

def train_config(**overrides):
  tc = dict(steps=40, warmup_steps=4, learning_rate=1e-2, final_lr_fraction=0.1,
            schedule="two_stage", weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0,
            trainable="")
  return ml_collections.ConfigDict({**tc, **overrides})


def test_two_stage_schedule_drops_lr_and_weight_decay_at_half_way():
  tc = train_config()
  lr, wd = learning_rate_schedule(tc), weight_decay_schedule(tc)
  assert float(lr(2)) == pytest.approx(0.5e-2)
  assert float(lr(4)) == float(lr(19)) == pytest.approx(1e-2)
  assert float(lr(20)) == pytest.approx(1e-3)
  assert float(lr(39)) < float(lr(30)) < 1e-3
  assert float(wd(19)) == pytest.approx(0.1) and float(wd(20)) == 0.0
  assert weight_decay_schedule(train_config(schedule="cosine")) == 0.1


@pytest.fixture(scope="module")
def trained():
  """A tiny bitnet model trained by `train_step` on one repeated batch of a periodic stream."""
  cfg = tiny()
  tc = train_config()
  model, optimizer = Transformer(cfg), make_optimizer(tc)
  params = init_params(cfg)
  tokens = (np.arange(8)[:, None] * 3 + np.arange(17)[None] * 5) % VOCAB  # [batch, length + 1]
  ones = np.ones((8, 16), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
           "positions": np.broadcast_to(np.arange(16), (8, 16))}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer.init(params), rng=jnp.zeros((2,), jnp.uint32))
  step = jax.jit(lambda s, b: train_step(s, b, objective=model_objective(model),
                                         optimizer=optimizer,
                                         schedule=learning_rate_schedule(tc), grad_accum=1))
  losses = []
  for _ in range(tc.steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return cfg, state.params, losses


def test_tiny_bitnet_model_trains(trained):
  _, _, losses = trained
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * losses[0], losses


def test_generation_from_packed_model_equals_fake_quant_greedy(trained):
  cfg, params, _ = trained
  packed_cfg, packed = pack_params(cfg, params)
  prompts = [[0, 5, 10, 15], [3, 8]]
  fake = generate(cfg, params, prompts, max_new_tokens=8)
  served = generate(packed_cfg, packed, prompts, max_new_tokens=8)
  assert served == fake
  assert fake[0][:3] == [20, 25, 30]  # the model learned the +5 stream


# ---- packing a run on disk, serving it from the command line ----------------------------------

def test_pack_cli_writes_an_inference_run_that_the_sample_cli_serves(tiny_overrides, tmp_path,
                                                                     capsys):
  run, out = str(tmp_path / "bitnet_run"), str(tmp_path / "packed_run")
  train_cli.main(["--config", TINY_CONFIG, "--workdir", run,
                  *(f"--config.{o}" for o in tiny_overrides),
                  "--config.model.linear_impl=bitnet", "--config.train.steps=3"])
  assert pack.main(["--workdir", run, "--out", out]) == 3
  _, tokenizer, cfg, params, step = sample.load_run(run)
  _, _, packed_cfg, packed, packed_step = sample.load_run(out)
  assert (packed_cfg.linear_impl, packed_step, step) == ("ternary_packed", 3, 3)
  assert packed_cfg == dataclasses.replace(cfg, linear_impl="ternary_packed")
  assert param_bytes(packed) < param_bytes(params) / 2  # float32 latents -> 2 bits
  tokens = jnp.array([[tokenizer.bos_id] + tokenizer.encode("def main():\n    return 0")])
  with jax.default_matmul_precision("highest"):  # the fake-quantized dots in float32, not TF32
    np.testing.assert_allclose(Transformer(packed_cfg).apply({"params": packed}, tokens),
                               Transformer(cfg).apply({"params": params}, tokens), atol=1e-4)
  capsys.readouterr()
  texts = sample.main(["--workdir", out, "--prompt", "def ", "--temperature", "0"])
  assert f"--- step 3, prompt 'def ' ---\ndef {texts[0]}" in capsys.readouterr().out

  # Bad input: one clear line each.
  with pytest.raises(SystemExit, match=f"error: --out '{out}' is not empty"):
    pack.main(["--workdir", run, "--out", out])
  with pytest.raises(SystemExit, match="linear_impl='ternary_packed'; only a 'bitnet' run"):
    pack.main(["--workdir", out, "--out", str(tmp_path / "twice")])
  with pytest.raises(SystemExit, match="'ternary_packed' is for inference: train with 'bitnet'"):
    train_cli.main(["--config", TINY_CONFIG, "--workdir", str(tmp_path / "train_packed"),
                    *(f"--config.{o}" for o in tiny_overrides),
                    "--config.model.linear_impl=ternary_packed"])
  shutil.rmtree(os.path.join(out, "checkpoints", "3", "params"))
  with pytest.raises(SystemExit, match="the params checkpoint at step 3 cannot be restored"):
    sample.main(["--workdir", out])


def test_pack_cli_refuses_an_out_file_and_a_run_without_checkpoints_creating_nothing(
    tiny_config, tmp_path):
  run, a_file, out = tmp_path / "bitnet_run", tmp_path / "a_file", tmp_path / "packed_run"
  run.mkdir()
  (run / "config.json").write_text(tiny_config("model.linear_impl=bitnet").to_json_best_effort())
  a_file.write_text("a file")
  before = snapshot(tmp_path)
  for args, message in [
      (["--out", str(a_file)], f"--out {str(a_file)!r} is a file: give a new directory"),
      (["--out", str(out)], f"{str(run)!r} has no checkpoint to pack")]:
    with pytest.raises(SystemExit) as raised:
      pack.main(["--workdir", str(run), *args])
    assert raised.value.code == f"error: {message}"
  assert snapshot(tmp_path) == before  # no checkpoints/ in the source run, no --out

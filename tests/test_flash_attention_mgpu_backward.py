"""The Hopper (Mosaic GPU) flash-attention backward against the reference's gradients.

dq, dk and dv must equal jax.vjp of flash_attention_reference, in float32 at "highest" matmul
precision on the same 16-bit inputs. On a Hopper GPU the kernels run compiled; elsewhere in
Mosaic GPU's interpret mode, which simulates the SMEM rings, their barriers and the TMA copies,
checks that every thread follows every phase of the barriers it waits on, and here also runs
its race detector (an SMEM slot refilled while a warpgroup still reads it is reported). The
residuals come from the reference (out rounded to the input dtype, as a kernel writes it), so
these tests check the backward alone; one test feeds it flash_attention_mgpu.forward's out and
lse. Small shapes reach every part of the kernels: rings that wrap, padded keys, the diagonal
blocks, warpgroups that skip the blocks only their neighbour sees, kv blocks no query sees,
grouped-query heads. Lowering for CUDA, which runs Mosaic GPU's layout and shape checks, covers
the real tiles on any machine.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from llm_research.kernels import flash_attention_mgpu, flash_attention_mgpu_backward
from llm_research.kernels.flash_attention import flash_attention_reference

ON_GPU = jax.default_backend() == "gpu"
# The kernels compile for Hopper only; on another GPU their equality tests cannot run at all.
needs_hopper_on_gpu = pytest.mark.skipif(
    ON_GPU and not flash_attention_mgpu.hopper_available(),
    reason="wgmma needs a Hopper GPU (compute capability 9.0); interpret mode runs on CPU only")
# Gradient error bound, max|grad - ref| / max(max|ref|, 1) per gradient. P, dS and the output
# are rounded to 16 bits before their products (2^-9 relative each for bfloat16, 2^-12 for
# float16); measured in interpret mode 3e-3 to 4.5e-3 for bfloat16, 3e-4 to 4e-4 for float16 (the
# bounds of the forward's tests). Bugs put back for a try gave 0.13 (padded keys let in) to 50
# (a diagonal block unmasked), and a slot released before its last read a race.
GRAD_BOUND = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 4e-3}


def _inputs(seed, batch, q_len, kv_pad, heads, kv_heads, head_dim, dtype):
  """query, key, value and dout, normal."""
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  query = jax.random.normal(kq, (batch, q_len, heads, head_dim), dtype)
  key = jax.random.normal(kk, (batch, kv_pad, kv_heads, head_dim), dtype)
  value = jax.random.normal(kv, (batch, kv_pad, kv_heads, head_dim), dtype)
  dout = jax.random.normal(kd, query.shape, dtype)
  return query, key, value, dout


def _reference(query, key, value, dout, causal, kv_len):
  """(out, lse, (dq, dk, dv)) in float32 over the real keys; dk and dv zero-padded to kv_pad."""
  heads, head_dim = query.shape[2:]
  kv_pad = key.shape[1]
  query, key, value, dout = (x.astype(jnp.float32) for x in (query, key[:, :kv_len],
                                                             value[:, :kv_len], dout))
  with jax.default_matmul_precision("highest"):  # not TF32 on a GPU: a float32 reference
    out, vjp = jax.vjp(functools.partial(flash_attention_reference, causal=causal),
                       query, key, value)
    dq, dk, dv = vjp(dout)
    # lse: log-sum-exp of the scaled logits over the keys each row sees, [batch, heads, q_len].
    repeated = jnp.repeat(key, heads // key.shape[2], axis=2)  # head h reads kv head h // groups
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, repeated) * head_dim**-0.5
  if causal:
    visible = jnp.arange(query.shape[1])[:, None] >= jnp.arange(kv_len)[None, :]
    logits = jnp.where(visible, logits, -jnp.inf)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, kv_pad - kv_len), (0, 0), (0, 0)))
  return out, jax.nn.logsumexp(logits, axis=-1), (dq, pad(dk), pad(dv))


def _assert_matches(grads, expected, dtype):
  for name, x, ref in zip(("dq", "dk", "dv"), grads, expected):
    assert x.shape == ref.shape and x.dtype == dtype, name
    ref = np.asarray(ref)
    error = np.abs(np.asarray(x, np.float32) - ref).max() / max(np.abs(ref).max(), 1)
    assert error <= GRAD_BOUND[jnp.dtype(dtype)], (name, error)


@pytest.fixture
def race_detectors(monkeypatch):
  """The race detectors of the interpreted kernel calls, in call order. The interpreter keeps
  only the last call's (`get_races()`), and `backward` makes two, dk/dv then dq; recording
  each as it is made lets a test check both."""
  detectors = []
  # jax 0.11 renamed the class (0.10: RaceDetectionState).
  name = next(n for n in ("GPURaceDetectionState", "RaceDetectionState")
              if hasattr(gpu_callbacks, n))

  class Recorded(getattr(gpu_callbacks, name)):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      detectors.append(self)

  monkeypatch.setattr(gpu_callbacks, name, Recorded)
  return detectors


def _backward(race_detectors, *args, **kwargs):
  """The kernels compiled on a GPU, else interpreted with the race detector, which must find no
  race in either kernel."""
  calls_before = len(race_detectors)
  grads = flash_attention_mgpu_backward.backward(
      *args, **kwargs, interpret=False if ON_GPU else InterpretGPUParams(detect_races=True))
  if not ON_GPU:
    detectors = race_detectors[calls_before:]
    assert len(detectors) == 2 and not any(detector.races_found for detector in detectors)
  return grads


# (causal, batch, q_len, kv_pad, kv_len, heads, kv_heads, head_dim, dtype, block_q, block_kv,
#  max_concurrent_steps, num_compute_warpgroups)
CASES = [
    # dk/dv: 2 heads x 4 query blocks through 2 slots; warpgroup 1 of each thread block skips
    # the query block only warpgroup 0's keys see; the last kv block holds 8 real keys. dq:
    # warpgroup 0 skips the kv block only warpgroup 1's rows see.
    pytest.param(True, 1, 256, 256, 200, 2, 1, 128, jnp.bfloat16, 64, 64, 2, 2,
                 id="causal-gqa-d128-padded-keys"),
    # Rectangular, one compute warpgroup, two batch rows, float16, a 3-slot ring; the last kv
    # block is wholly padding: its dk/dv thread block loads nothing and writes zeros.
    pytest.param(False, 2, 128, 256, 150, 1, 1, 64, jnp.float16, 64, 64, 3, 1,
                 id="full-d64-f16-padded-keys"),
    # 128-key steps (non-square tiles, each straddling the diagonal of two query blocks), fewer
    # queries than keys: the second dk/dv thread block's keys are seen by no query.
    pytest.param(True, 1, 128, 256, 256, 2, 2, 64, jnp.bfloat16, 64, 128, 2, 1,
                 id="causal-d64-wide-kv-blocks-keys-past-queries"),
]
PARAMETERS = ("causal, batch, q_len, kv_pad, kv_len, heads, kv_heads, head_dim, dtype, block_q, "
              "block_kv, max_concurrent_steps, num_compute_warpgroups")


@needs_hopper_on_gpu
@pytest.mark.parametrize(PARAMETERS, CASES)
def test_backward_matches_reference(causal, batch, q_len, kv_pad, kv_len, heads, kv_heads,
                                    head_dim, dtype, block_q, block_kv, max_concurrent_steps,
                                    num_compute_warpgroups, race_detectors):
  query, key, value, dout = _inputs(0, batch, q_len, kv_pad, heads, kv_heads, head_dim, dtype)
  out, lse, expected = _reference(query, key, value, dout, causal, kv_len)
  grads = _backward(race_detectors, query, key, value, out.astype(dtype), dout, lse,
                    causal=causal, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                    max_concurrent_steps=max_concurrent_steps,
                    num_compute_warpgroups=num_compute_warpgroups)
  _assert_matches(grads, expected, dtype)


@needs_hopper_on_gpu
def test_backward_of_the_hopper_forward(race_detectors):
  """flash_attention_mgpu.forward's out and lse are this backward's residuals as they are."""
  query, key, value, dout = _inputs(1, 1, 128, 128, 2, 1, 64, jnp.bfloat16)
  out, lse = flash_attention_mgpu.forward(
      query, key, value, causal=True, kv_len=100, num_compute_warpgroups=1,
      interpret=not ON_GPU)
  grads = _backward(race_detectors, query, key, value, out, dout, lse, causal=True, kv_len=100,
                    num_compute_warpgroups=1)
  _assert_matches(grads, _reference(query, key, value, dout, True, 100)[2], jnp.bfloat16)


@pytest.mark.skipif(not flash_attention_mgpu.hopper_available(),
                    reason="needs a Hopper GPU: at this length interpret mode would take hours")
@pytest.mark.parametrize("causal, head_dim", [(True, 128), (False, 64)])
def test_backward_matches_reference_at_benchmark_lengths(causal, head_dim):
  """The default tiles at a benchmarked length: 64 query blocks per dk/dv thread block and 64
  kv blocks per dq one, so ring phases far past any interpreted case; grouped-query heads,
  padded keys."""
  query, key, value, dout = _inputs(2, 1, 4096, 4096, 4, 2, head_dim, jnp.bfloat16)
  out, lse, expected = _reference(query, key, value, dout, causal, 4000)
  grads = flash_attention_mgpu_backward.backward(query, key, value, out.astype(jnp.bfloat16),
                                                 dout, lse, causal=causal, kv_len=4000)
  _assert_matches(grads, expected, jnp.bfloat16)


@pytest.mark.parametrize("causal, head_dim, kv_len, num_compute_warpgroups", [
    (True, 128, 1024, 2), (False, 128, 1000, 2), (True, 64, 1024, 2), (False, 64, 1024, 1)])
def test_lowers_for_cuda_at_real_tile_sizes(causal, head_dim, kv_len, num_compute_warpgroups):
  """The default tiles through Mosaic GPU's lowering, which checks register layouts, wgmma
  shapes and SMEM transforms (the interpreter skips all three); no GPU needed."""
  query = jax.ShapeDtypeStruct((2, 1024, 4, head_dim), jnp.bfloat16)
  key = jax.ShapeDtypeStruct((2, 1024, 2, head_dim), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((2, 4, 1024), jnp.float32)
  kernels = jax.jit(functools.partial(flash_attention_mgpu_backward.backward, causal=causal,
                                      kv_len=kv_len,
                                      num_compute_warpgroups=num_compute_warpgroups))
  module = kernels.trace(query, key, key, query, query, lse).lower(
      lowering_platforms=("cuda",)).as_text()
  assert module.count("stablehlo.custom_call @mosaic_gpu") == 2  # dk/dv, then dq


@pytest.mark.parametrize("dtype, head_dim, q_len, kv_pad", [
    (jnp.bfloat16, 128, 256, 384), (jnp.float16, 64, 128, 128), (jnp.bfloat16, 128, 192, 256),
    (jnp.bfloat16, 64, 128, 192), (jnp.float32, 64, 128, 128), (jnp.bfloat16, 256, 128, 128)])
def test_takes_what_the_forward_takes_with_default_tiles(dtype, head_dim, q_len, kv_pad):
  """The dispatch pairs this backward with the forward wherever
  `flash_attention_mgpu.takes_with_default_tiles` holds: there the default tiles must lower
  for CUDA; where it does not, they must be refused."""
  query = jax.ShapeDtypeStruct((1, q_len, 2, head_dim), dtype)
  key = jax.ShapeDtypeStruct((1, kv_pad, 1, head_dim), dtype)
  lse = jax.ShapeDtypeStruct((1, 2, q_len), jnp.float32)
  lower = lambda: jax.jit(flash_attention_mgpu_backward.backward).trace(
      query, key, key, query, query, lse).lower(lowering_platforms=("cuda",))
  if flash_attention_mgpu.takes_with_default_tiles(dtype, head_dim, q_len, kv_pad):
    lower()
  else:
    with pytest.raises(ValueError):
      lower()


@pytest.mark.parametrize("overrides, message", [
    (dict(block_kv=96), "multiples of 64"),
    (dict(block_kv=128), "num_compute_warpgroups \\* block_kv"),  # 256 keys per block > 128
    (dict(kv_len=0), "kv_len"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps"),
    # Either kernel alone over the budget: dk/dv rings 3 x 2 x 32 KiB, dq 3 x 2 x 32 KiB.
    (dict(max_concurrent_steps=3, block_q=128, num_compute_warpgroups=1, head_dim=128),
     "shared memory per thread block in the dk/dv kernel"),
    (dict(max_concurrent_steps=3, block_kv=128, num_compute_warpgroups=1, head_dim=128),
     "shared memory per thread block in the dq kernel"),
    (dict(lse_dtype=jnp.bfloat16), "lse"),
    (dict(dout_dtype=jnp.float16), "dout"),
])
def test_rejects_what_it_cannot_run(overrides, message):
  overrides = dict(overrides)  # the parameter is shared between runs
  head_dim = overrides.pop("head_dim", 64)
  query, key, value, dout = _inputs(0, 1, 256, 128, 2, 1, head_dim, jnp.bfloat16)
  lse = jnp.zeros((1, 2, 256), overrides.pop("lse_dtype", jnp.float32))
  dout = dout.astype(overrides.pop("dout_dtype", dout.dtype))
  with pytest.raises(ValueError, match=message):
    flash_attention_mgpu_backward.backward(query, key, value, query, dout, lse, **overrides)

"""The Hopper (Mosaic GPU) flash-attention forward against the pure-jnp reference.

On a Hopper GPU the kernel runs compiled. Elsewhere it runs in Mosaic GPU's interpret mode, which
simulates the SMEM ring, its barriers and the TMA copies, checks that every thread follows every
phase of the barriers it waits on, and here also runs its race detector: an SMEM slot refilled
while a warpgroup still reads it is reported (tried by releasing K before the QK^T product).
Small shapes reach every part of the kernel: a ring that wraps, padded keys, the diagonal
blocks, a warpgroup that skips the blocks only its neighbour sees, grouped-query heads. Lowering
for CUDA, which runs Mosaic GPU's layout and shape checks, covers the real tiles on any machine.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

from llm_research.kernels import flash_attention_mgpu
from llm_research.kernels.flash_attention import flash_attention, flash_attention_reference

ON_GPU = jax.default_backend() == "gpu"
# The kernel compiles for Hopper only; on another GPU its equality tests cannot run at all.
needs_hopper_on_gpu = pytest.mark.skipif(
    ON_GPU and not flash_attention_mgpu.hopper_available(),
    reason="wgmma needs a Hopper GPU (compute capability 9.0); interpret mode runs on CPU only")
# Output error bound, max|out - ref| / max(max|ref|, 1), ref in float32 on the same inputs: the
# output and P are rounded to 16 bits before and after the PV product (2^-9 relative each for
# bfloat16, measured 4e-3 to 6e-3 in interpret mode); float16 has 3 more mantissa bits.
OUT_BOUND = {jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 4e-3}
# lse: the logits are exact products of 16-bit inputs summed in float32 (both sides), so only
# summation order (and the GPU's approximate exp2 and log) separate them; measured 5e-7 on CPU.
# A key wrongly masked or let in moves a row's lse by about its softmax weight (~1/kv_len).
LSE_TOLERANCE = 1e-4


def _inputs(seed, batch, q_len, kv_pad, heads, kv_heads, head_dim, dtype):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  query = jax.random.normal(kq, (batch, q_len, heads, head_dim), dtype)
  key = jax.random.normal(kk, (batch, kv_pad, kv_heads, head_dim), dtype)
  value = jax.random.normal(kv, (batch, kv_pad, kv_heads, head_dim), dtype)
  return query, key, value


def _reference_lse(query, key, causal):
  """float32 [batch, heads, q_len]: log-sum-exp of the scaled logits over the visible keys."""
  heads, head_dim = query.shape[2:]
  key = jnp.repeat(key, heads // key.shape[2], axis=2)  # query head h reads kv head h // groups
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * head_dim**-0.5
  if causal:
    visible = jnp.arange(query.shape[1])[:, None] >= jnp.arange(key.shape[1])[None, :]
    logits = jnp.where(visible, logits, -jnp.inf)
  return jax.nn.logsumexp(logits, axis=-1)


# (causal, batch, q_len, kv_pad, kv_len, heads, kv_heads, head_dim, dtype, block_q, block_kv,
#  max_concurrent_steps, num_compute_warpgroups)
CASES = [
    # 4 kv blocks through 3 slots, the last one 8 real keys of 64; under causal masking
    # warpgroup 0 of each thread block stops one block before warpgroup 1 and skips its last.
    pytest.param(True, 1, 256, 256, 200, 2, 1, 128, jnp.bfloat16, 64, 64, 3, 2,
                 id="causal-gqa-d128-padded-keys"),
    # Rectangular, one compute warpgroup, two batch rows, one head, float16.
    pytest.param(False, 2, 128, 192, 150, 1, 1, 64, jnp.float16, 64, 64, 2, 1,
                 id="full-d64-f16-padded-keys"),
    # The default tiles: 128-key blocks, each straddling the diagonal of two warpgroups. Marked
    # slow to keep this file under a minute on 2 CPU cores (10-20 s a case in interpret mode).
    pytest.param(True, 1, 256, 256, 256, 2, 1, 64, jnp.bfloat16, 64, 128, 2, 2,
                 id="causal-gqa-d64-default-blocks", marks=pytest.mark.slow),
]


@needs_hopper_on_gpu
@pytest.mark.parametrize("causal, batch, q_len, kv_pad, kv_len, heads, kv_heads, head_dim, "
                         "dtype, block_q, block_kv, max_concurrent_steps, "
                         "num_compute_warpgroups", CASES)
def test_forward_matches_reference(causal, batch, q_len, kv_pad, kv_len, heads, kv_heads,
                                   head_dim, dtype, block_q, block_kv, max_concurrent_steps,
                                   num_compute_warpgroups):
  query, key, value = _inputs(0, batch, q_len, kv_pad, heads, kv_heads, head_dim, dtype)
  out, lse = flash_attention_mgpu.forward(
      query, key, value, causal=causal, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
      max_concurrent_steps=max_concurrent_steps, num_compute_warpgroups=num_compute_warpgroups,
      interpret=False if ON_GPU else InterpretGPUParams(detect_races=True))
  if not ON_GPU:
    assert not interpret_pallas_call.get_races().races_found
  _assert_matches_reference(query, key, value, out, lse, causal, kv_len)


@pytest.mark.skipif(not flash_attention_mgpu.hopper_available(),
                    reason="needs a Hopper GPU: at this length interpret mode would take hours")
@pytest.mark.parametrize("causal, head_dim, ping_pong", [
    (True, 128, True), (False, 64, True), (True, 128, False)])
def test_forward_matches_reference_at_benchmark_lengths(causal, head_dim, ping_pong):
  """The default tiles at a benchmarked length: 64 kv steps per thread block, so ring phases
  and ping-pong turns far past any interpreted case; grouped-query heads, padded keys."""
  query, key, value = _inputs(1, 1, 8192, 8192, 4, 2, head_dim, jnp.bfloat16)
  out, lse = flash_attention_mgpu.forward(query, key, value, causal=causal, kv_len=8000,
                                          ping_pong=ping_pong)
  _assert_matches_reference(query, key, value, out, lse, causal, kv_len=8000)


def _assert_matches_reference(query, key, value, out, lse, causal, kv_len):
  batch, q_len, heads, _ = query.shape
  dtype = query.dtype
  assert out.shape == query.shape and out.dtype == query.dtype
  assert lse.shape == (batch, heads, q_len) and lse.dtype == jnp.float32
  # The reference sees only the real keys: the kernel must mask the padding itself.
  query, key, value = (x.astype(jnp.float32) for x in (query, key[:, :kv_len],
                                                       value[:, :kv_len]))
  with jax.default_matmul_precision("highest"):  # not TF32 on a GPU: a float32 reference
    expected = np.asarray(flash_attention_reference(query, key, value, causal=causal))
    expected_lse = _reference_lse(query, key, causal)
  error = np.abs(np.asarray(out, np.float32) - expected).max() / max(np.abs(expected).max(), 1)
  assert error <= OUT_BOUND[jnp.dtype(dtype)]
  np.testing.assert_allclose(lse, expected_lse, rtol=LSE_TOLERANCE, atol=LSE_TOLERANCE)


@pytest.mark.parametrize("causal, head_dim, kv_len, num_compute_warpgroups, ping_pong", [
    (True, 128, 1024, 2, True), (False, 128, 1000, 2, True), (True, 64, 1024, 2, True),
    (True, 128, 1024, 2, False), (False, 64, 1024, 1, False)])
def test_lowers_for_cuda_at_real_tile_sizes(causal, head_dim, kv_len, num_compute_warpgroups,
                                            ping_pong):
  """The default tiles through Mosaic GPU's lowering, which checks register layouts, wgmma
  shapes and SMEM transforms (the interpreter skips all three); no GPU needed."""
  query = jax.ShapeDtypeStruct((2, 1024, 4, head_dim), jnp.bfloat16)
  key = jax.ShapeDtypeStruct((2, 1024, 2, head_dim), jnp.bfloat16)
  kernel = jax.jit(lambda q, k, v: flash_attention_mgpu.forward(
      q, k, v, causal=causal, kv_len=kv_len, num_compute_warpgroups=num_compute_warpgroups,
      ping_pong=ping_pong))
  module = kernel.trace(query, key, key).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.custom_call @mosaic_gpu" in module


@pytest.mark.parametrize("overrides, message", [
    (dict(block_q=96), "multiples of 64"),
    (dict(block_q=128), "multiple of num_compute_warpgroups"),  # 256 rows per block > q_len
    (dict(kv_len=0), "kv_len"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps"),
    (dict(max_concurrent_steps=4, head_dim=128), "shared memory"),  # 4 * 2 * 32 KiB of K, V
])
def test_rejects_what_it_cannot_run(overrides, message):
  overrides = dict(overrides)  # the parameter is shared between runs
  head_dim = overrides.pop("head_dim", 64)
  query, key, value = _inputs(0, 1, 128, 128, 2, 1, head_dim, jnp.bfloat16)
  with pytest.raises(ValueError, match=message):
    flash_attention_mgpu.forward(query, key, value, **overrides)


@pytest.mark.parametrize("dtype, head_dim, q_len, kv_pad", [
    (jnp.bfloat16, 128, 256, 384), (jnp.float16, 64, 128, 128),
    (jnp.bfloat16, 128, 192, 256), (jnp.bfloat16, 64, 128, 192), (jnp.float32, 64, 128, 128),
    (jnp.bfloat16, 256, 128, 128)])
def test_takes_with_default_tiles_is_what_forward_takes(dtype, head_dim, q_len, kv_pad):
  """The dispatch asks `takes_with_default_tiles` before calling `forward` with its defaults:
  a shape it takes must lower for CUDA, one it refuses must be refused by `forward`."""
  query = jax.ShapeDtypeStruct((1, q_len, 2, head_dim), dtype)
  key = jax.ShapeDtypeStruct((1, kv_pad, 1, head_dim), dtype)
  lower = lambda: jax.jit(flash_attention_mgpu.forward).trace(query, key, key).lower(
      lowering_platforms=("cuda",))
  if flash_attention_mgpu.takes_with_default_tiles(dtype, head_dim, q_len, kv_pad):
    lower()
  else:
    with pytest.raises(ValueError):
      lower()


# ---- through flash_attention's dispatch: either forward with either backward -----------------


@needs_hopper_on_gpu
@pytest.mark.parametrize("hopper_forward, hopper_backward", [
    (True, False), (False, True), (True, True)])
def test_dispatch_pairs_either_forward_with_either_backward(hopper_forward, hopper_backward):
  """The Hopper forward's out and lse feed the Triton-layout dq and dk/dv kernels, the Triton
  forward's feed the Hopper backward (flash_attention_mgpu_backward), and the Hopper kernels
  each other (interpreted on CPU, compiled on a Hopper): output and gradients equal the
  reference at lengths the dispatch pads (200 -> 256, the padded keys masked by kv_len, the
  padded query rows' dout zero)."""
  query, key, value = _inputs(2, 1, 200, 200, 2, 1, 64, jnp.bfloat16)
  dout = jax.random.normal(jax.random.key(3), query.shape, jnp.bfloat16)

  def output_and_grads(attention, *inputs):
    out, vjp = jax.vjp(functools.partial(attention, causal=True), *inputs)
    return (out, *vjp(dout.astype(out.dtype)))

  got = output_and_grads(functools.partial(flash_attention, hopper_forward=hopper_forward,
                                           hopper_backward=hopper_backward), query, key, value)
  with jax.default_matmul_precision("highest"):
    expected = output_and_grads(flash_attention_reference,
                                *(x.astype(jnp.float32) for x in (query, key, value)))
  for name, x, ref in zip(("out", "dq", "dk", "dv"), got, expected):
    ref = np.asarray(ref)
    error = np.abs(np.asarray(x, np.float32) - ref).max() / max(np.abs(ref).max(), 1)
    assert error <= OUT_BOUND[jnp.dtype(jnp.bfloat16)], name


def test_dispatch_lowers_it_on_a_hopper_where_it_applies(monkeypatch):
  """On a Hopper (posed: backend and device check patched) flash_attention lowers to this
  forward and flash_attention_mgpu_backward's two kernels; hopper_forward=False or
  hopper_backward=False keeps that pass on Triton, and with segment ids all three stay Triton."""
  from jax import export
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(flash_attention_mgpu, "hopper_available", lambda: True)
  q = jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

  def lowered(**kwargs):
    def forward_and_backward(q, k, v, dout, *ids):
      f = functools.partial(flash_attention, causal=True, segment_ids=ids[0] if ids else None,
                            **kwargs)
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(dout)
    args = (q, kv, kv, q) + ((segment_ids,) if "segmented" in kwargs.pop("case", "") else ())
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
              export.DisabledSafetyCheck.custom_call("mosaic_gpu")]
    module = export.export(jax.jit(forward_and_backward), platforms=["cuda"],
                           disabled_checks=checks)(*args).mlir_module()
    return module.count("@mosaic_gpu"), module.count("__gpu$xla.gpu.triton")

  assert lowered() == (3, 0)  # (Mosaic GPU kernels, Triton kernels)
  assert lowered(hopper_backward=False) == (1, 2)
  assert lowered(hopper_forward=False) == (2, 1)
  assert lowered(case="segmented") == (0, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(segment_ids=jnp.ones((1, 256), jnp.int32)), "no segment_ids"),
    (dict(local_window_size=64), "no local_window_size"),
    (dict(interpret=False), "Hopper GPU"),
    (dict(dtype=jnp.float32), "float32"),
    (dict(hopper_forward=None, hopper_backward=True, local_window_size=64),
     "hopper_backward=True, but it takes no segment_ids and no local_window_size"),
])
def test_dispatch_says_why_it_cannot_take_it(kwargs, message):
  kwargs = dict(kwargs)  # the parameter is shared between runs
  query, key, value = _inputs(0, 1, 256, 256, 2, 1, 64, kwargs.pop("dtype", jnp.bfloat16))
  if ON_GPU and "interpret" in kwargs:
    pytest.skip("a GPU, Hopper or not, is a device this kernel may run on compiled")
  with pytest.raises(ValueError, match=message):
    flash_attention(query, key, value, causal=True, **{"hopper_forward": True, **kwargs})

"""The Pallas flash-attention kernels against their pure-jnp reference; `masked_attention`.

Both layouts: the Triton-layout kernels (compiled on a GPU, interpret mode on CPU) and, through
`tpu_flash_attention`, the Mosaic-layout kernels the dispatch picks on TPU (interpret mode).
Forward and all three gradients on fresh random inputs of awkward shapes, against the reference
at full float32 precision (`reference_output_and_grads`). Error is
max|kernel - reference| / max(max|reference|, 1) per output, within F32_BOUND for float32
inputs and BF16_BOUND for bfloat16 ones (the reference then runs on the same values in float32).
Which blocks each kernel masks is checked against the mask itself.
"""
import functools
import itertools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jax_core

from llm_research.config import base_config
from llm_research.kernels import flash_attention as flash_module
from llm_research.kernels.flash_attention import (FLASH_RESIDUAL_NAMES, AttentionBlockSizes,
                                                  KernelBlocks, flash_attention,
                                                  flash_attention_reference, masked_attention)
from llm_research.models import Transformer, TransformerConfig
from llm_research.training import (TrainState, learning_rate_schedule, make_optimizer,
                                   model_objective, train_step)

# The kernels' float32 dots run at the backend's default precision (kernel module docstring).
# CPU: float32, measured ~1e-6. GPU: TF32, each operand rounded to a 10-bit mantissa, i.e. a
# relative error up to 2^-11 (4.9e-4) per operand; a backward value chains up to three dots, so
# the bound is 8 such units, ~3.9e-3 (the H200 measured 2e-4 to 4e-4, against a TF32
# reference). TPU (not measured): its default float32 dot is one bfloat16 pass, so BF16_BOUND.
# bfloat16 inputs: measured ~5e-3 on CPU.
BF16_BOUND = 3e-2
F32_BOUND = {"cpu": 1e-5, "gpu": 8 * 2**-11}.get(jax.default_backend(), BF16_BOUND)


def tpu_flash_attention(*args, interpret=True, **kwargs):
  """flash_attention as dispatched on TPU (kernels/flash_attention_tpu.py), in interpret mode.
  The dispatch reads jax.default_backend() when traced; a function of its own keeps jit's cache
  apart from flash_attention's."""
  with mock.patch.object(jax, "default_backend", lambda: "tpu"):
    return flash_attention(*args, interpret=interpret, **kwargs)


def random_inputs(seed, batch, heads, kv_heads, length, head_dim, kv_length=None,
                  dtype=jnp.float32):
  """query, key, value and an output cotangent, standard normal."""
  kv_length = length if kv_length is None else kv_length
  kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (batch, length, heads, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_length, kv_heads, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_length, kv_heads, head_dim), dtype)
  return q, k, v, jax.random.normal(kd, q.shape, jnp.float32)


def packed_segment_ids(seed, batch, length, segments=3):
  """Sorted ids in [0, segments): contiguous documents of random lengths, like packed rows."""
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, segments)
  return jnp.sort(ids, axis=1)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("causal", "window", "blocks"))
def output_and_grads(attention, q, k, v, dout, segment_ids, *, causal, window, blocks=None):
  """(out, dq, dk, dv) of sum(attention(q, k, v) * dout), in float32."""
  extra = {} if attention is flash_attention_reference else {"block_sizes": blocks}
  def f(q, k, v):
    return attention(q, k, v, causal=causal, segment_ids=segment_ids, local_window_size=window,
                     **extra)
  out, vjp = jax.vjp(f, q, k, v)
  return tuple(x.astype(jnp.float32) for x in (out, *vjp(dout.astype(out.dtype))))


def reference_output_and_grads(*args, **kwargs):
  """output_and_grads of flash_attention_reference with full float32 dots (never TF32): the
  bounds are errors against the exact attention, whatever the backend's default precision."""
  with jax.default_matmul_precision("highest"):
    return output_and_grads(flash_attention_reference, *args, **kwargs)


def relative_errors(got, want):
  """max|got - want| / max|want| per pair (denominator at least 1: an exactly-zero reference
  gradient, e.g. dq at length 1, bounds the absolute error instead)."""
  return [float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1.0))
          for g, w in zip(got, want)]


def check_against_reference(seed, batch, heads, kv_heads, length, head_dim, *, causal,
                            segmented, window=None, blocks=None, dtype=jnp.float32, bound,
                            attention=flash_attention):
  q, k, v, dout = random_inputs(seed, batch, heads, kv_heads, length, head_dim, dtype=dtype)
  segment_ids = packed_segment_ids(seed, batch, length) if segmented else None
  got = output_and_grads(attention, q, k, v, dout, segment_ids, causal=causal, window=window,
                         blocks=blocks)
  f32 = lambda x: x.astype(jnp.float32)
  want = reference_output_and_grads(f32(q), f32(k), f32(v), dout, segment_ids, causal=causal,
                                    window=window)
  for name, error in zip(("out", "dq", "dk", "dv"), relative_errors(got, want)):
    assert error < bound, f"{name}: relative error {error:.2e} >= {bound:.0e}"
  for x in got:
    assert np.all(np.isfinite(x))


# (batch, heads, kv_heads, length, head_dim, causal, segmented): lengths 1, 17, 130 (not
# multiples of any block), GQA ratios 1, 2, 8, head_dim 64 and 128.
CASES = [
    (1, 2, 2, 1, 64, True, False),
    (1, 4, 2, 17, 64, False, True),
    (2, 8, 1, 130, 64, True, True),
    (1, 2, 1, 130, 128, True, False),
    (1, 2, 2, 130, 128, False, True),
]


@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim,causal,segmented", CASES)
def test_float32_matches_reference(batch, heads, kv_heads, length, head_dim, causal, segmented):
  check_against_reference(length + head_dim, batch, heads, kv_heads, length, head_dim,
                          causal=causal, segmented=segmented, bound=F32_BOUND)


@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim,causal,segmented", CASES[:3])
def test_tpu_layout_float32_matches_reference(batch, heads, kv_heads, length, head_dim, causal,
                                              segmented):
  """Lengths 1, 17, 130, GQA ratios 1, 2, 8 (head_dim changes only the block shapes)."""
  check_against_reference(length + head_dim, batch, heads, kv_heads, length, head_dim,
                          causal=causal, segmented=segmented, bound=F32_BOUND,
                          attention=tpu_flash_attention)


# Small tiles, each kernel's its own, neither square nor alike: the tile edges fall at different
# places in each kernel, relative to the causal diagonal, the window and the padding.
SMALL_BLOCKS = AttentionBlockSizes(forward=KernelBlocks(32, 16), dq=KernelBlocks(64, 16),
                                   dkv=KernelBlocks(16, 32))


@pytest.mark.parametrize("window,causal,segmented", [
    ((33, 0), True, True), (20, False, True), ((40, 3), True, False), ((7, 50), False, False)])
def test_small_blocks_match_reference(window, causal, segmented):
  """130 keys in 16 to 64 blocks: the kernels skip the blocks outside the causal band and the
  window, and unsegmented ones mask only the blocks that the band's or the window's edges or
  the padded keys cross (`test_blocks_are_masked_exactly_where_some_key_is_hidden`)."""
  check_against_reference(5, 1, 4, 2, 130, 64, causal=causal, segmented=segmented,
                          window=window, blocks=SMALL_BLOCKS, bound=F32_BOUND)


def kernel_spec(q_len, kv_len, block_q, block_k, causal, window):
  """The static spec of one unsegmented kernel over the padded lengths: q padded to its blocks,
  keys to 64 (a multiple of every block, so some kv blocks may be padding only)."""
  return flash_module._Spec(
      q_pad=-(-q_len // block_q) * block_q, kv_pad=-(-kv_len // 64) * 64, kv_len=kv_len,
      block_q=block_q, block_k=block_k, scale=1.0, causal=causal, window=window,
      segmented=False, groups=1, tpu=False, interpret=True, compiler_params=None)


def visible(spec):
  """[q_pad, kv_pad] bool, which query sees which key, from the semantics (numpy)."""
  q_idx, k_idx = np.arange(spec.q_pad)[:, None], np.arange(spec.kv_pad)[None, :]
  mask = (k_idx < spec.kv_len) & ((q_idx >= k_idx) | (not spec.causal))
  if spec.window is not None:
    left, right = spec.window
    mask &= (k_idx >= q_idx - left) & (k_idx <= q_idx + right)
  return mask


# Windows whose edges fall on, one before and one after the 16 and 64 block boundaries.
@pytest.mark.parametrize("causal,window", [
    (True, None), (False, None), (True, (14, 0)), (True, (15, 0)), (True, (33, 0)),
    (True, (40, 3)), (False, (15, 14)), (False, (14, 15)), (False, (63, 31)), (False, (0, 0))])
def test_blocks_are_masked_exactly_where_some_key_is_hidden(causal, window):
  """The runs each kernel loops over (`_kv_block_runs` for the forward and dq, `_q_block_runs`
  for dk/dv) against the mask: consecutive, covering every tile with a visible key; a tile in
  an unmasked run has every key visible (else the kernel would attend to hidden keys), a tile
  in a masked run has some key hidden (else it would do mask work it does not need)."""
  # 79 keys end one short of a 16, 32 and 64 boundary, 128 on one.
  for q_len, kv_len, block_q, block_k in itertools.product((1, 100, 130), (79, 128),
                                                            (16, 64), (16, 32)):
    spec = kernel_spec(q_len, kv_len, block_q, block_k, causal, window)
    tiles = visible(spec).reshape(spec.q_pad // block_q, block_q, spec.kv_pad // block_k,
                                  block_k).swapaxes(1, 2)  # [q blocks, kv blocks, bq, bk]
    for held, runs_of, walked_tiles in (
        ("q block", flash_module._kv_block_runs, tiles),
        ("kv block", flash_module._q_block_runs, tiles.swapaxes(0, 1))):
      for block, walked in enumerate(walked_tiles):  # walked: [walked blocks, bq, bk]
        where = f"{spec}, {held} {block}"
        runs = [(int(start), int(stop), masked) for start, stop, masked in runs_of(spec, block)]
        assert all(start <= stop for start, stop, _ in runs), f"{where}: {runs}"
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:])), f"{where}: {runs}"
        covered = np.zeros(len(walked), bool)
        covered[runs[0][0]:runs[-1][1]] = True
        assert not np.any(walked.any(axis=(1, 2)) & ~covered), f"{where}: {runs}"
        for start, stop, masked in runs:
          all_visible = walked[start:stop].all(axis=(1, 2))
          assert np.all(all_visible != masked), f"{where}: {runs}, {all_visible}"


def test_tpu_layout_sliding_window_matches_reference():
  """Three 128 blocks (TPU blocks are >= 128): the TPU kernels skip the blocks outside
  the causal band and the window, their index maps clamped to the visible ones. In Pallas' TPU
  interpreter, where uninitialised scratch reads NaN and out-of-bounds reads raise."""
  check_against_reference(6, 1, 4, 1, 300, 64, causal=True, segmented=True, window=(40, 3),
                          bound=F32_BOUND, attention=functools.partial(
                              tpu_flash_attention, interpret=pltpu.InterpretParams()))


def test_bfloat16_matches_float32_reference():
  check_against_reference(7, 1, 4, 2, 130, 128, causal=True, segmented=True,
                          dtype=jnp.bfloat16, bound=BF16_BOUND)


@pytest.mark.parametrize("attention", [flash_attention, tpu_flash_attention],
                         ids=["triton_layout", "tpu_layout"])
def test_rows_with_nothing_to_attend_give_zeros_not_nan(attention):
  """Query segment 9 has no key: its outputs and its query gradients are exactly zero."""
  q, k, v, dout = random_inputs(3, 1, 2, 1, 17, 64, kv_length=40)
  q_ids = jnp.array([[1] * 8 + [9] * 9])
  kv_ids = jnp.array([[1] * 20 + [2] * 20])
  got = output_and_grads(attention, q, k, v, dout, (q_ids, kv_ids), causal=False, window=None)
  out, dq = got[0], got[1]
  assert all(np.all(np.isfinite(x)) for x in got)
  np.testing.assert_array_equal(out[:, 8:], 0.0)
  np.testing.assert_array_equal(dq[:, 8:], 0.0)
  want = reference_output_and_grads(q, k, v, dout, (q_ids, kv_ids), causal=False, window=None)
  np.testing.assert_array_equal(want[0][:, 8:], 0.0)
  assert max(relative_errors(got, want)) < F32_BOUND


def test_reference_agrees_with_jax_nn_dot_product_attention():
  """Same layout, GQA convention, causal alignment and window semantics as jax.nn."""
  q, k, v, _ = random_inputs(4, 2, 6, 2, 23, 64)
  with jax.default_matmul_precision("highest"):
    ours = flash_attention_reference(q, k, v, causal=True, local_window_size=(5, 0))
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=(5, 0))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def plain_float32_attention(query, key, value, mask):
  """Softmax attention written out in float32 with jax.nn.softmax, K/V repeated per query head;
  rows with nothing to attend give zeros. Its autodiff gradients are the ground truth for
  masked_attention's custom VJP."""
  groups = query.shape[2] // key.shape[2]
  key, value = (jnp.repeat(x.astype(jnp.float32), groups, axis=2) for x in (key, value))
  logits = jnp.einsum("bthd,bshd->bhts", query.astype(jnp.float32), key) * query.shape[-1]**-0.5
  mask = jnp.broadcast_to(mask, (query.shape[0], query.shape[1], key.shape[1]))[:, None]
  probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhts,bshd->bthd", probs, value)


@pytest.mark.parametrize("dtype,bound", [(jnp.float32, 1e-5), (jnp.bfloat16, BF16_BOUND)])
def test_masked_attention_matches_plain_float32_attention(dtype, bound):
  """Output and gradients (the custom VJP of its softmax) against autodiff of the plain float32
  formula on the same values, with GQA, a random mask and a row with nothing to attend."""
  q, k, v, dout = random_inputs(8, 2, 6, 2, 19, 64, kv_length=26, dtype=dtype)
  mask = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 19, 26)).at[1, 4].set(False)

  def output_and_grads(attention, *args):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask), *args)
    return tuple(x.astype(jnp.float32) for x in (out, *vjp(dout.astype(out.dtype))))

  with jax.default_matmul_precision("highest"):
    got = jax.jit(functools.partial(output_and_grads, masked_attention))(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    want = jax.jit(functools.partial(output_and_grads, plain_float32_attention))(
        f32(q), f32(k), f32(v))
  assert got[0].dtype == jnp.float32 and masked_attention(q, k, v, mask).dtype == dtype
  for name, error in zip(("out", "dq", "dk", "dv"), relative_errors(got, want)):
    assert error < bound, f"{name}: relative error {error:.2e} >= {bound:.0e}"
  np.testing.assert_array_equal(got[0][1, 4], 0.0)
  np.testing.assert_array_equal(got[1][1, 4], 0.0)


def test_masked_attention_keeps_no_float32_scores_for_the_backward_pass():
  """In bfloat16 the only [q_len, kv_len] residual of the vjp is the bfloat16 probabilities:
  no float32 logits or probabilities (what ran the 125m model at 8 x 2048 out of memory)."""
  q, k, v, _ = random_inputs(0, 2, 4, 2, 33, 64, kv_length=40, dtype=jnp.bfloat16)
  mask = jnp.tril(jnp.ones((33, 40), bool))
  vjp = jax.eval_shape(
      lambda *args: jax.vjp(lambda q, k, v: masked_attention(q, k, v, mask), *args)[1], q, k, v)
  scores = [x for x in jax.tree.leaves(vjp) if x.shape[-2:] == (33, 40)]
  assert scores, "the probabilities must be kept for the backward pass"
  assert all(x.dtype == jnp.bfloat16 for x in scores), [(x.shape, x.dtype) for x in scores]


def pallas_call_eqns(jaxpr):
  """The pallas_call equations of a jaxpr and all its sub-jaxprs, in order."""
  eqns = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]
  return eqns + [eqn for sub in jax_core.subjaxprs(jaxpr) for eqn in pallas_call_eqns(sub)]


@pytest.mark.parametrize("policy,forward_calls", [
    (jax.checkpoint_policies.save_only_these_names(*FLASH_RESIDUAL_NAMES), 1),
    (jax.checkpoint_policies.nothing_saveable, 2)], ids=["save_flash_residuals", "save_nothing"])
def test_remat_that_saves_the_named_residuals_runs_the_forward_kernel_once(policy,
                                                                          forward_calls):
  """Projections and flash attention under jax.checkpoint: saving FLASH_RESIDUAL_NAMES (the
  output and log-sum-exp) spares the backward pass a second forward kernel, saving nothing
  re-runs it; the gradients are the same either way."""
  x = jax.random.normal(jax.random.key(0), (1, 20, 32))
  w = 0.1 * jax.random.normal(jax.random.key(1), (3, 32, 2, 64))

  def loss(x, w):
    q, k, v = (jnp.einsum("btd,dhe->bthe", x, w[i]) for i in range(3))
    return jnp.sum(flash_attention(q, k, v, causal=True) ** 2)

  grad = jax.grad(jax.checkpoint(loss, policy=policy), argnums=1)
  calls = [str(eqn.params["name"]) for eqn in pallas_call_eqns(jax.make_jaxpr(grad)(x, w).jaxpr)]
  assert calls.count("flash_attention_forward") == forward_calls, calls
  assert calls.count("flash_attention_dq") == calls.count("flash_attention_dkv") == 1, calls
  np.testing.assert_allclose(jax.jit(grad)(x, w), jax.jit(jax.grad(loss, argnums=1))(x, w),
                             rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shapes,kwargs,message", [
    (((1, 8, 4, 64), (1, 8, 3, 64), (1, 8, 3, 64)), {}, "key heads"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 9, 2, 64)), {}, "key .* and value"),
    (((1, 8, 4, 64), (2, 8, 2, 64), (2, 8, 2, 64)), {}, "batch"),
    (((1, 8, 4, 96), (1, 8, 2, 96), (1, 8, 2, 96)), {}, "head_dim=96"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {"dtype": jnp.float16}, "query.dtype"),
    (((8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {}, "query must be"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {"segment_ids": jnp.ones((1, 7))},
     "segment_ids"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {"local_window_size": -1},
     "local_window_size"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)),
     {"block_sizes": AttentionBlockSizes(*[KernelBlocks(64, 48)] * 3)}, "block_sizes.forward"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)),
     {"block_sizes": AttentionBlockSizes(KernelBlocks(64, 64), KernelBlocks(64, 64),
                                         KernelBlocks(64, 64, num_warps=3))}, "block_sizes.dkv"),
    (((1, 8, 4, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {"block_sizes": (64, 64, 32, 32)},
     "AttentionBlockSizes"),
])
def test_bad_inputs_raise_naming_the_argument(shapes, kwargs, message):
  dtype = kwargs.pop("dtype", jnp.float32)
  q, k, v = (jax.ShapeDtypeStruct(s, dtype) for s in shapes)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(functools.partial(flash_attention, **kwargs), q, k, v)


def test_tpu_blocks_must_be_at_least_128():
  q = jax.ShapeDtypeStruct((1, 8, 4, 64), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 8, 2, 64), jnp.float32)
  blocks = AttentionBlockSizes(KernelBlocks(128, 128), KernelBlocks(128, 64),
                               KernelBlocks(128, 128))
  with pytest.raises(ValueError, match="block_sizes.dq.* >= 128 on TPU"):
    jax.eval_shape(functools.partial(tpu_flash_attention, block_sizes=blocks), q, kv, kv)


def test_training_with_pallas_attention_matches_xla():
  """Two train steps of a tiny packed-sequence model from the same params: the same losses,
  gradient norms and updated params with either attention impl. No warmup, so that the first
  step already moves the params (a learning rate of 0 would compare unchanged params)."""
  tc = base_config().train
  tc.unlock().update(steps=2, warmup_steps=0, learning_rate=1e-2)
  assert float(learning_rate_schedule(tc)(0)) > 0
  batch = jax.random.randint(jax.random.key(0), (2, 41), 3, 50)
  segment_ids = jnp.array([[1] * 25 + [2] * 12 + [0] * 3, [1] * 40])
  positions = jnp.array([list(range(25)) + list(range(12)) + [0] * 3, list(range(40))])
  batch = {"inputs": batch[:, :-1], "targets": batch[:, 1:], "segment_ids": segment_ids,
           "positions": positions}

  def config(impl):
    return TransformerConfig(vocab_size=50, num_layers=1, embed_dim=64, num_heads=4,
                             num_kv_heads=2, head_dim=64, mlp_dim=128, attention_impl=impl)

  init = jax.jit(Transformer(config("xla")).init)
  params = nn.meta.unbox(init(jax.random.key(1), batch["inputs"])["params"])

  def train(impl):
    """(params after two steps, {metric: [step 1, step 2]})."""
    optimizer = make_optimizer(tc)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params), rng=jnp.zeros((2,), jnp.uint32))
    step = jax.jit(functools.partial(
        train_step, objective=model_objective(Transformer(config(impl))), optimizer=optimizer,
        schedule=learning_rate_schedule(tc), grad_accum=1))
    metrics = []
    for _ in range(2):
      state, step_metrics = step(state, batch)
      metrics.append(step_metrics)
    return state.params, {k: [float(m[k]) for m in metrics] for k in ("loss", "grad_norm")}

  pallas_params, pallas_metrics = train("pallas")
  xla_params, xla_metrics = train("xla")
  for name in ("loss", "grad_norm"):
    np.testing.assert_allclose(pallas_metrics[name], xla_metrics[name], rtol=F32_BOUND,
                               err_msg=name)
  leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
  for before, after in zip(leaves(params), leaves(xla_params)):
    assert np.any(after != before), "a parameter did not move"
  # The two runs' updates, in L1 relative to the XLA run's: AdamW's first update is
  # lr * sign(grad) but for gradients near zero, whose sign the kernel's rounding may flip.
  pallas_updates = [p - p0 for p, p0 in zip(leaves(pallas_params), leaves(params))]
  xla_updates = [p - p0 for p, p0 in zip(leaves(xla_params), leaves(params))]
  difference = sum(np.abs(p - x).sum() for p, x in zip(pallas_updates, xla_updates))
  assert difference / sum(np.abs(x).sum() for x in xla_updates) < F32_BOUND


# Every (length, head_dim, kv_heads), each with one of the four mask combinations in turn.
SWEEP = [(length, head_dim, kv_heads, bool(i & 1), bool(i & 2))
         for i, (length, head_dim, kv_heads) in enumerate(
             itertools.product((1, 17, 130, 300), (64, 128, 256), (1, 2, 8)))]


@pytest.mark.slow
@pytest.mark.parametrize("length,head_dim,kv_heads,causal,segmented", SWEEP)
def test_sweep_matches_reference(length, head_dim, kv_heads, causal, segmented):
  check_against_reference(length * head_dim + kv_heads, 1, 8, kv_heads, length, head_dim,
                          causal=causal, segmented=segmented, bound=F32_BOUND)


@pytest.mark.parametrize("platform,backend,custom_call", [
    ("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "@tpu_custom_call")])
def test_kernels_lower_for_gpu_and_tpu(monkeypatch, platform, backend, custom_call):
  """Without interpret mode the dispatch lowers forward, dq and dk/dv through Pallas' Triton
  lowering (CUDA) or, with the kernels of flash_attention_tpu.py, its Mosaic lowering (TPU):
  block shapes and ops the backend accepts, each kernel with its table entry's blocks and
  launch parameters. Segmented, every block masked; unsegmented, the loops split into masked
  and unmasked runs of blocks (with a window, and causal only: different bounds). Compiling that IR (Triton to PTX, Mosaic in libtpu) needs the
  device and is not checked here."""
  from jax import export
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  q = jax.ShapeDtypeStruct((1, 1000, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
  segment_ids = jax.ShapeDtypeStruct((1, 1000), jnp.int32)

  def forward_and_backward(q, k, v, dout, segment_ids):
    results = []
    for ids, window in ((segment_ids, (256, 0)), (None, (256, 0)), (None, None)):
      f = functools.partial(flash_attention, causal=True, segment_ids=ids,
                            local_window_size=window, hopper_forward=False)
      out, vjp = jax.vjp(f, q, k, v)
      results.append((out, vjp(dout)))
    return results

  checks = [export.DisabledSafetyCheck.custom_call(custom_call)] if platform == "cuda" else []
  exported = export.export(jax.jit(forward_and_backward), platforms=[platform],
                           disabled_checks=checks)(q, kv, kv, q, segment_ids)
  module = exported.mlir_module()
  assert module.count(custom_call) == 9  # forward, dq, dk/dv; segmented, windowed, causal only
  if platform == "tpu":
    for kernel in ("forward", "dq", "dkv"):
      assert f"flash_attention_{kernel}_tpu" in module


def test_each_kernel_runs_with_its_own_blocks_and_launch_parameters(monkeypatch):
  """On GPU, block_sizes' forward, dq and dkv entries reach their own kernel: the grid over
  the blocks that kernel holds, and Triton's num_warps and num_stages."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  blocks = AttentionBlockSizes(forward=KernelBlocks(32, 16, num_warps=2, num_stages=3),
                               dq=KernelBlocks(64, 16, num_warps=8, num_stages=4),
                               dkv=KernelBlocks(16, 32, num_warps=1, num_stages=5))
  q = jax.ShapeDtypeStruct((1, 100, 4, 64), jnp.bfloat16)  # padded to 128
  kv = jax.ShapeDtypeStruct((1, 100, 2, 64), jnp.bfloat16)

  def forward_and_backward(q, k, v):
    f = functools.partial(flash_attention, causal=True, block_sizes=blocks, interpret=False)
    out, vjp = jax.vjp(f, q, k, v)
    return vjp(out)

  jaxpr = jax.make_jaxpr(forward_and_backward)(q, kv, kv).jaxpr
  calls = {str(eqn.params["name"]): eqn for eqn in pallas_call_eqns(jaxpr)}
  # (kernel, its blocks, the blocks along the first grid axis: q for forward and dq, kv for dkv)
  for name, kernel_blocks, grid_blocks in (("forward", blocks.forward, 128 // 32),
                                           ("dq", blocks.dq, 128 // 64),
                                           ("dkv", blocks.dkv, 128 // 32)):
    eqn = calls[f"flash_attention_{name}"]
    params = eqn.params["compiler_params"]
    assert eqn.params["grid_mapping"].grid[0] == grid_blocks, name
    assert (params.num_warps, params.num_stages) == (kernel_blocks.num_warps,
                                                     kernel_blocks.num_stages), name

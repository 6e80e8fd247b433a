"""BitNet b1.58 linear layers (Ma et al., 2024, "The Era of 1-bit LLMs").

`Linear(impl=...)` in linear.py switches between these bases (LoRA adapters compose on any):
  "dense"           y = x W
  "bitnet"          training: y = Q_a(norm(x)) Q_w(W) with straight-through estimators; the
                    latent W is the float32 "kernel", same name, shape and axes as dense.
  "ternary_packed"  inference: W stored as 2-bit codes ("packed_kernel", uint8 [K/4, N], see
                    kernels/ternary_matmul.py for the layout) and "kernel_scale" (mean|W|),
                    x quantized to int8, product by the ternary matmul kernel.

norm: RMSNorm over the contracted dims without a learned scale (the paper's SubLN before
  quantization; the block's pre-norm already has a scale, and a parameter-free norm keeps
  BitLinear's params identical to dense).
Q_a: per token (over the contracted dims) absmax to int8: round(x * 127 / max|x|).
Q_w: per tensor absmean to {-1, 0, +1}: round(W / mean|W|) clipped to [-1, 1]. Under
  `scan_layers` a tensor is one layer's kernel.
STE: both quantizers are the identity in the backward pass, so d/dW is the dense gradient
  taken at the quantized operands, and d/dx flows through the norm as if unquantized.
"""
import jax
import jax.numpy as jnp

from llm_research.kernels.ternary_matmul import ternary_matmul
from llm_research.models.norms import rms_normalize

_EPS = 1e-5


def quantize_activations(x: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
  """Per-token absmax: (integers in [-127, 127] as float32, dequant scale max|x| / 127).

  The scale keeps the contracted dims as size 1: x ~= q * scale.
  """
  axes = tuple(range(x.ndim - n_in, x.ndim))
  absmax = jnp.maximum(jnp.max(jnp.abs(x), axis=axes, keepdims=True), _EPS)
  return jnp.clip(jnp.round(x * (127.0 / absmax)), -128, 127), absmax / 127.0


def quantize_weights(w: jax.Array, axes=None) -> tuple[jax.Array, jax.Array]:
  """Per-tensor absmean over `axes` (default all): (values in {-1, 0, +1} as float32,
  dequant scale mean|w|, keeping `axes` as size 1). w ~= t * scale."""
  w = w.astype(jnp.float32)
  scale = jnp.maximum(jnp.mean(jnp.abs(w), axis=axes, keepdims=True), _EPS)
  return jnp.clip(jnp.round(w / scale), -1, 1), scale


def _straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
  """`quantized` forward, identity gradient to `x`."""
  return x + jax.lax.stop_gradient(quantized - x)


def bitnet_operands(x: jax.Array, kernel: jax.Array, n_in: int):
  """Fake-quantized (float32) operands of the BitLinear matmul, with STE gradients."""
  x = rms_normalize(x, n_in)
  q, x_scale = quantize_activations(x, n_in)
  t, w_scale = quantize_weights(kernel)
  return _straight_through(x, q * x_scale), _straight_through(kernel, t * w_scale)


def ternary_packed_matmul(x: jax.Array, packed: jax.Array, w_scale: jax.Array, n_in: int,
                          features: tuple[int, ...]) -> jax.Array:
  """x [..., *in] -> float32 [..., *features] through the ternary matmul kernel.

  packed: uint8 [prod(in) / 4, prod(features)]; w_scale: the kernel's mean|W|.
  """
  lead = x.shape[:x.ndim - n_in]
  q, x_scale = quantize_activations(rms_normalize(x, n_in), n_in)
  q = q.astype(jnp.int8).reshape(-1, packed.shape[0] * 4)  # [M, K]
  y = ternary_matmul(q, x_scale.reshape(-1), packed, w_scale)  # [M, N]
  return y.reshape(*lead, *features)

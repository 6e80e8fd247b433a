"""BitNet b1.58 packing: trained (`linear_impl="bitnet"`) params -> 2-bit inference params.

Every attention and MLP "kernel" (latent float32, [*in, *out], with a leading layers axis
under `scan_layers`) becomes
  "packed_kernel": uint8 [prod(in) / 4, prod(out)], 4 ternary weights a byte, and
  "kernel_scale":  float32 [], mean|kernel| (the absmean dequant scale),
each with the layers axis in front when scanned. The byte layout ("quarter planes", 2-bit
two's complement codes, byte 0 = four zeros) is documented in kernels/ternary_matmul.py.
The embedding, norms and output head are copied unchanged. The packed model is the same
Transformer with `linear_impl="ternary_packed"` and computes the bitnet model's function
(its fake-quantized forward) up to float rounding of the scales.

Packing checks values and so runs eagerly (not under jit): it is an offline conversion.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_research.kernels.ternary_matmul import unpack_weights
from llm_research.models import TransformerConfig
from llm_research.models.bitlinear import quantize_weights


def pack_ternary(values: jax.Array) -> jax.Array:
  """values [..., K, N] in {-1, 0, +1} (any int or float dtype) -> uint8 [..., K / 4, N]."""
  if values.ndim < 2 or values.shape[-2] % 4:
    raise ValueError(f"pack_ternary: values must be [..., K, N] with K a multiple of 4, got "
                     f"shape {values.shape}")
  if not bool(jnp.all((values == -1) | (values == 0) | (values == 1))):
    raise ValueError("pack_ternary: values must all be -1, 0 or +1 (quantize first: "
                     "bitlinear.quantize_weights)")
  kq = values.shape[-2] // 4
  codes = values.astype(jnp.int32) & 3  # 2-bit two's complement: -1 -> 0b11
  planes = [codes[..., i * kq:(i + 1) * kq, :] << (2 * i) for i in range(4)]
  return (planes[0] | planes[1] | planes[2] | planes[3]).astype(jnp.uint8)


def unpack_ternary(packed: jax.Array) -> jax.Array:
  """uint8 [..., K / 4, N] -> int8 [..., K, N] in {-1, 0, +1}; inverse of `pack_ternary`."""
  if packed.dtype != jnp.uint8:
    raise TypeError(f"unpack_ternary: packed must be uint8, got {packed.dtype}")
  return unpack_weights(packed)


def pack_params(config: TransformerConfig, params) -> tuple[TransformerConfig, dict]:
  """(config, params) of a bitnet model -> (config, params) of its ternary-packed twin."""
  if config.linear_impl != "bitnet":
    raise ValueError(f"pack_params: config.linear_impl must be 'bitnet' (the params must "
                     f"have been trained quantization-aware), got {config.linear_impl!r}")
  packed_config = dataclasses.replace(config, linear_impl="ternary_packed")
  return packed_config, _convert(abstract_params(packed_config), nn.meta.unbox(params), "params")


def abstract_params(config) -> dict:
  """The params of `config`'s model as jax.ShapeDtypeStructs (nothing is allocated)."""
  return nn.meta.unbox(jax.eval_shape(
      config.make_model().init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def _convert(target, source, path: str):
  if not isinstance(target, dict):
    return source
  if "packed_kernel" in target:
    return _pack_kernel(target["packed_kernel"], source["kernel"], path)
  missing = set(target) - set(source)
  if missing:
    raise KeyError(f"pack_params: {path} has no {sorted(missing)}")
  return {k: _convert(target[k], source[k], f"{path}/{k}") for k in target}


def _pack_kernel(target: jax.ShapeDtypeStruct, kernel: jax.Array, path: str) -> dict:
  lead = target.shape[:-2]
  matrix = kernel.reshape(*lead, -1, target.shape[-1])  # [*lead, K, N]
  ternary, scale = quantize_weights(matrix, axes=(-2, -1))
  packed = pack_ternary(ternary)
  if packed.shape != target.shape:
    raise ValueError(f"pack_params: {path}/kernel {kernel.shape} packs to {packed.shape}, "
                     f"the packed model expects {target.shape}")
  return {"packed_kernel": packed, "kernel_scale": scale.reshape(lead)}


def param_bytes(params) -> int:
  """Bytes the arrays of a param pytree occupy."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))

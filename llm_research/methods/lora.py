"""LoRA merge: fold a model's adapters into its base kernels, a pure `(config, params) ->
(config, params)`.

A `Linear` with adapters computes `base(x) + scale * sum_n B_n A_n x` (models/linear.py,
`scale = alpha / rank / heads`). The merge adds `scale * sum_n A_n B_n` to the layer's "kernel"
([*in, *out]), drops "lora_a" and "lora_b", and returns the model config with `lora_rank = 0`.

- `dense` base: the merged model computes the adapted model's function (up to float32 rounding).
- `bitnet` base: the adapters are folded into the float32 *latent* kernel that the quantizer
  reads, W' = W + dW: exactly what a full-rank update of the same size does to a BitNet model
  (the straight-through estimator trains the latent). The merged model computes Q(W + dW) x,
  the adapted one Q(W) x + dW x: they agree only up to the quantization of the sum (the ternary
  values move where W + dW crosses a rounding threshold, and the absmean scale moves). What
  holds exactly: the merged latent is the dense merge of the same params, so read with the
  quantizer off (`linear_impl="dense"`) the merged model computes the adapted one's function.
- `ternary_packed` has no latent kernel: merge before packing.

`adapter_delta` is the one place the low-rank product is formed; LTE's merge uses it too.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from llm_research.errors import ConfigError


def adapter_delta(kernel_shape: tuple[int, ...], lora_a: jax.Array, lora_b: jax.Array,
                  scale: float) -> jax.Array:
  """`scale * sum_n A_n B_n` in the kernel's shape [*lead, *in, *out] (float32).

  lora_a: [*lead, heads, *in, rank]; lora_b: [*lead, heads, rank, *out]; `lead` are the axes the
  layer is stacked over (the scanned layers), found from the three ranks.
  """
  # ndim(a) = lead + in + 2, ndim(b) = lead + out + 2, ndim(kernel) = lead + in + out
  n_lead = lora_a.ndim + lora_b.ndim - 4 - len(kernel_shape)
  lead = kernel_shape[:n_lead]
  heads, rank = lora_a.shape[n_lead], lora_a.shape[-1]
  a = lora_a.astype(jnp.float32).reshape(*lead, heads, -1, rank)  # [*lead, heads, fan_in, rank]
  b = lora_b.astype(jnp.float32).reshape(*lead, heads, rank, -1)  # [*lead, heads, rank, fan_out]
  delta = jnp.einsum("...hir,...hro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
  return (scale * delta).reshape(kernel_shape)


def is_adapted(node: Any) -> bool:
  """A Linear's params with adapters: a dict holding "kernel", "lora_a" and "lora_b"."""
  return isinstance(node, dict) and {"kernel", "lora_a", "lora_b"} <= set(node)


def merge_params(params: Any, scale: float) -> Any:
  """`params` with every adapted Linear's adapters folded into its kernel (kept in its dtype)."""
  if is_adapted(params):
    kernel = params["kernel"]
    merged = kernel.astype(jnp.float32) + adapter_delta(kernel.shape, params["lora_a"],
                                                        params["lora_b"], scale)
    rest = {k: v for k, v in params.items() if k not in ("kernel", "lora_a", "lora_b")}
    return {**rest, "kernel": merged.astype(kernel.dtype)}
  if isinstance(params, dict):
    return {k: merge_params(v, scale) for k, v in params.items()}
  return params


def merge(config, params):
  """(config without adapters, params with the adapters folded into the kernels).

  `config` is a registered model config with LoRA fields (`lora_rank`, `lora_alpha`,
  `lora_heads`, and `lora` giving the scale); `params` its params (a plain nested dict).
  """
  if not getattr(config, "lora_rank", 0):
    raise ConfigError(f"{type(config).__name__} has no LoRA adapters to merge (lora_rank is 0)")
  if getattr(config, "linear_impl", "dense") == "ternary_packed":
    raise ConfigError("a ternary_packed model has no latent kernel to merge into: merge the "
                      "BitNet run's params before packing")
  return dataclasses.replace(config, lora_rank=0), merge_params(params, config.lora.scale)

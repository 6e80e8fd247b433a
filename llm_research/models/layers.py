"""Small parts every model uses: logical sharding of activations and kernels, rotary embeddings.

Model code names logical axes only (batch, length, embed, heads, ...); the config's rules, active
through `llm_research.sharding.activate`, map them onto mesh axes.
"""
import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Dtype = Any


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout to logical axes (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


def partition_spec(axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
  """The active mesh's PartitionSpec for an array of `shape` with logical `axes`; a dim its
  mesh axes do not divide evenly is left whole (replicated)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return PartitionSpec(*(None for _ in shape))
  spec = nn.logical_to_mesh_axes(tuple(axes))
  def ways(mesh_axes):
    mesh_axes = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
    return math.prod(mesh.shape[a] for a in mesh_axes)
  return PartitionSpec(*(None if a is None or size % ways(a) else a
                         for a, size in zip(spec, shape)))


def map_shards(fn: Callable, in_specs: tuple, out_specs) -> Callable:
  """`fn` run on each device's shard of its arguments (`jax.shard_map`) under the active mesh;
  `fn` itself outside one. For Pallas kernels: XLA cannot partition a custom call, so outside
  shard_map it would gather every input and compute the whole global batch on each device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1's rotary frequency scaling (Hugging Face's rope type 'llama3'; the model
  section's `rope_scaling` group). Against a context of `original_max_position` tokens, a
  frequency whose wavelength is longer than original_max_position / low_freq_factor is slowed
  `factor` times, one shorter than original_max_position / high_freq_factor is kept, and those
  between are interpolated linearly in original_max_position / wavelength. factor 1: off."""

  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192

  def problems(self) -> list[str]:
    """What this group gets wrong: "<field>=<value> <why>" each."""
    found = []
    if self.factor < 1:
      found.append(f"factor={self.factor!r} must be at least 1 (1: no scaling)")
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      found.append(f"low_freq_factor={self.low_freq_factor!r} must be positive and below "
                   f"high_freq_factor={self.high_freq_factor!r}")
    if self.original_max_position < 1:
      found.append(f"original_max_position={self.original_max_position!r} must be at least 1")
    return found


def rotary_frequencies(head_dim: int, theta: float,
                       scaling: RopeScaling = RopeScaling()) -> jax.Array:
  """[head_dim / 2] float32 angular frequencies theta^(-2i / head_dim), scaled by `scaling`."""
  half = head_dim // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling.factor == 1:
    return freqs
  context = scaling.original_max_position
  # 0 for wavelengths longer than context / low_freq_factor (slowed by factor), 1 for those
  # shorter than context / high_freq_factor (kept), linear in context / wavelength between.
  keep = jnp.clip((context * freqs / (2 * jnp.pi) - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor), 0.0, 1.0)
  return (1 - keep) * freqs / scaling.factor + keep * freqs


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float,
                 scaling: RopeScaling = RopeScaling()) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions.
  """
  freqs = rotary_frequencies(x.shape[-1], theta, scaling)  # [half]
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [batch, length, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)

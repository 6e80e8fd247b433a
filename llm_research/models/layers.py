"""Small parts every model uses: logical sharding of activations and kernels, rotary embeddings.

Model code names logical axes only (batch, length, embed, heads, ...); the config's rules, active
through `llm_research.sharding.activate`, map them onto mesh axes.
"""
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


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form).

  x: [batch, length, heads, head_dim]; positions: [batch, length] integer positions.
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [batch, length, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)

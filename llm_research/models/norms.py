"""RMS normalisation: the parameter-free function and the layer with a learned scale."""
import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_normalize(x: jax.Array, n_axes: int = 1, eps: float = 1e-6) -> jax.Array:
  """x / rms(x) over the last `n_axes` dims, in float32."""
  axes = tuple(range(x.ndim - n_axes, x.ndim))
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


class RMSNorm(nn.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32."""

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],),
        jnp.float32)
    return (rms_normalize(x, 1, self.eps) * scale).astype(self.dtype)

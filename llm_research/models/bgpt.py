"""bGPT (Wu et al., "Beyond Language Models: Byte Models are Digital World Simulators"): a
hierarchical byte model, registered as `model.name="bgpt"`.

A row of bytes (values 0..255; 256 pads a file to whole patches, ends it with a patch of 256s
and separates a conversion's input from its output) is cut into patches of `patch_size` (S)
bytes:

  patch decoder  patch i's input is patch i - 1 (patch -1, and the first patch of a document,
                 whose position is 0: the beginning-of-sequence patch of S 256s), one-hot over
                 257 values, flattened [S * 257] and projected to embed_dim, plus a learned
                 position; `num_patch_layers` causal blocks over the patches. Its output at
                 patch i (the "feature") has seen the patches before i only.
  byte decoder   for every patch at once (patches folded into the batch axis), S positions:
                 the patch's feature, then the embeddings of its bytes 0..S-2; output j
                 predicts byte j; `num_byte_layers` causal blocks and a head over 257 values.

So logits[t] predict byte t from the bytes before t alone, across patch boundaries too: unlike
the transformer, the model shifts its input itself (a row's inputs and targets are the same
bytes). Both decoders are the core's decoder stack of transformer Blocks (rotary attention over
patch / in-patch positions, SwiGLU, RMSNorm), built from `TransformerConfig` views of this
config, so `attention_impl`, remat, scan, logical axes and sharding work as for the
transformer.

With `num_classes > 0` the model is a classifier: the byte decoder is gone, the patch features
of a row's real patches (segment_ids > 0) are mean-pooled, and a linear head gives class logits
[batch, num_classes]; its objective is cross-entropy on `batch["label"]` (`loss_sums`) and eval
reports accuracy. `train.init_from=<a generative run>` copies every param the two share and
initialises the head (HEAD_KEYS: the keys that may differ).

Generation (`generate`, `convert`) keeps a KV cache at both levels: over patches in the patch
decoder, within the current patch in the byte decoder.
"""
import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_research.decode import sample_logits
from llm_research.errors import ConfigError
from llm_research.models import registry
from llm_research.models.layers import constrain
from llm_research.models.linear import Linear
from llm_research.models.norms import RMSNorm
from llm_research.models.stack import decoder_stack
from llm_research.models.transformer import DTYPES, Block, TransformerConfig

PAD = 256  # pads a file to whole patches; a patch of PAD ends a file or separates two
VALUES = 257  # byte values and PAD
shape_field = registry.shape_field

# Model-section sizes, `config.model.update(**PRESETS[...])` on a bGPT section
# (`base_config("bgpt")`, or `--config.model.name=bgpt`, whose defaults are "paper"): "paper" is
# the paper's 110M model, "small" trains on CPU in minutes, "tiny" is for tests.
PRESETS = {
    "paper": dict(patch_size=16, num_patch_layers=12, num_byte_layers=3, embed_dim=768,
                  num_heads=12, num_kv_heads=12, head_dim=64, mlp_dim=2048, max_patches=512),
    "small": dict(patch_size=16, num_patch_layers=4, num_byte_layers=2, embed_dim=256,
                  num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=704, max_patches=256),
    "tiny": dict(patch_size=4, num_patch_layers=2, num_byte_layers=1, embed_dim=32,
                 num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, max_patches=64),
}


@registry.register("bgpt")
@dataclasses.dataclass(frozen=True)
class BgptConfig:
  """bGPT's hyperparameters; the defaults are the paper's 110M model (PRESETS["paper"])."""

  vocab_size: int  # 257: bytes and PAD (data.source="bytes")
  patch_size: int = shape_field(16)
  num_patch_layers: int = shape_field(12)
  num_byte_layers: int = shape_field(3)
  max_patches: int = shape_field(512)  # learned patch positions: patches a row may hold
  num_classes: int = shape_field(0)  # 0: generative; else a classifier of this many classes
  # Shared with the transformer (same meaning; both decoders use them).
  embed_dim: int = shape_field(768)
  num_heads: int = shape_field(12)
  num_kv_heads: int = shape_field(12)
  head_dim: int = shape_field(64)
  mlp_dim: int = shape_field(2048)
  tie_embeddings: bool = shape_field(True)  # byte head = the byte embedding (generative)
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  scan_layers: bool = shape_field(True)
  remat_policy: str = "none"
  attention_impl: str = "auto"

  # Shape keys `train.init_from` may change (init_from.py): the head is initialised afresh.
  HEAD_KEYS = ("num_classes",)
  # The model starts a sequence itself (its beginning-of-sequence patch): prompts carry no bos.
  supplies_start = True

  def __post_init__(self):
    def check(ok, msg):
      if not ok:
        raise ConfigError(f"model.{msg}")
    check(self.vocab_size == VALUES, f"vocab_size={self.vocab_size}: bgpt reads bytes, "
          f"{VALUES} values (0..255 and {PAD}, the padding): train it on data.source='bytes'")
    for name in ("patch_size", "num_patch_layers", "num_byte_layers", "max_patches"):
      check(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
    check(self.num_classes >= 0,
          f"num_classes={self.num_classes} must not be negative (0: generative)")
    self._decoder(num_layers=1)  # the core checks the shared fields (ConfigError naming them)

  def _decoder(self, num_layers: int) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=self.vocab_size, num_layers=num_layers, embed_dim=self.embed_dim,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        mlp_dim=self.mlp_dim, rope_theta=self.rope_theta, norm_eps=self.norm_eps,
        tie_embeddings=self.tie_embeddings, dtype=self.dtype, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, attention_impl=self.attention_impl)

  @property
  def patch_decoder(self) -> TransformerConfig:
    """The patch decoder's layers, as the core's config (Block, decoder_stack read it)."""
    return self._decoder(self.num_patch_layers)

  @property
  def byte_decoder(self) -> TransformerConfig:
    return self._decoder(self.num_byte_layers)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def generative(self) -> bool:
    return self.num_classes == 0

  @property
  def loss_unit(self) -> str | None:
    """What a loss is counted per: eval also reports bits per byte (train.py)."""
    return "byte" if self.generative else None

  @property
  def loss_sums(self):
    """train.py's seam: the classifier's objective (None: the next-byte token loss)."""
    return None if self.generative else classification_loss_sums

  def data_options(self) -> dict:
    """Keyword arguments of the data iterators: rows are laid out in patches of this size,
    and a classifier's rows carry labels of its classes."""
    return {"patch_size": self.patch_size, "num_classes": self.num_classes}

  def check_data(self, data_config) -> None:
    """Refuses a row length this model cannot take (train.check_config_values)."""
    seq_len, size = data_config.seq_len, self.patch_size
    if seq_len % size:
      raise ConfigError(f"data.seq_len={seq_len} is not a multiple of model.patch_size={size}")
    if seq_len // size > self.max_patches:
      raise ConfigError(f"data.seq_len={seq_len} is {seq_len // size} patches of "
                        f"model.patch_size={size}: more than model.max_patches="
                        f"{self.max_patches}")

  def make_model(self, *, decode: bool = False, cache_len: int = 0) -> nn.Module:
    """`cache_len` (decoding) is in bytes: the patch cache holds ceil(cache_len / S) patches,
    the byte cache one patch."""
    return Bgpt(self, decode=decode, cache_len=cache_len)

  def generate(self, params, prompts, **settings) -> list[list[int]]:
    """decode.generate's seam: bGPT's own two-level cached generation."""
    return generate(self, params, prompts, **settings)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameters; without embeddings: no patch projection, patch positions, byte embedding
    or untied byte head (what a byte does not multiply through a matmul of the layers)."""
    e = self.embed_dim
    layers = self.patch_decoder.num_params(include_embeddings=False)  # + its final norm
    embeddings = self.patch_size * VALUES * e + self.max_patches * e
    if self.generative:
      layers += self.byte_decoder.num_params(include_embeddings=False)
      embeddings += VALUES * e * (1 if self.tie_embeddings else 2)
    else:
      layers += e * self.num_classes
    return layers + (embeddings if include_embeddings else 0)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per byte of a row of `seq_len` bytes: the patch decoder's per patch (the
    transformer's count over seq_len / S patches, without a head) over S bytes, plus the byte
    decoder's per byte (its count over S positions, head included); a classifier's head
    instead of the byte decoder. The projection of a one-hot patch is a lookup forward (XLA
    makes it one), but its weight gradient is a matmul: 2 S 257 embed per patch."""
    size, e = self.patch_size, self.embed_dim
    patches = max(seq_len // size, 1)
    patch = self.patch_decoder
    per_patch = patch.flops_per_token(patches) - 6 * patch.vocab_size * e + 2 * size * VALUES * e
    if not self.generative:
      return per_patch / size + 6 * e * self.num_classes / seq_len
    return per_patch / size + self.byte_decoder.flops_per_token(size)


class PatchDecoder(nn.Module):
  """Previous patches [batch, patches, S] -> features [batch, patches, embed]."""

  config: BgptConfig
  decode: bool = False
  cache_len: int = 0  # patches

  @nn.compact
  def __call__(self, previous, positions, segment_ids):
    # previous: [batch, patches, S] values 0..256; positions, segment_ids: [batch, patches]
    cfg = self.config
    dtype = cfg.compute_dtype
    projection = self.param(  # the paper's Linear(S * 257, embed), stored [S, 257, embed]
        "embedding", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.patch_size**-0.5), (None, "vocab", "embed")),
        (cfg.patch_size, VALUES, cfg.embed_dim), jnp.float32)
    table = self.param("positions", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), ("length", "embed")),
        (cfg.max_patches, cfg.embed_dim), jnp.float32)
    one_hot = jax.nn.one_hot(previous, VALUES, dtype=dtype)  # [batch, patches, S, 257]
    x = jnp.einsum("bpsv,sve->bpe", one_hot, projection.astype(dtype))
    x = x + jnp.take(table, positions, axis=0, mode="clip").astype(dtype)
    x = constrain(x, ("batch", "length", "embed"))
    x = decoder_stack(Block, cfg.patch_decoder, x, positions, segment_ids, decode=self.decode,
                      cache_len=self.cache_len)
    return RMSNorm(cfg.norm_eps, dtype, name="norm")(x)


class ByteDecoder(nn.Module):
  """Per patch: its feature and its bytes -> logits [rows, slots, 257] of its bytes."""

  config: BgptConfig
  decode: bool = False
  cache_len: int = 0  # slots: one patch

  @nn.compact
  def __call__(self, features, previous, slots, segment_ids):
    # features: [rows, embed], one patch's each; previous: [rows, slots] the byte before each
    # slot (slot 0 reads the feature instead); slots, segment_ids: [rows, slots]
    cfg = self.config
    dtype = cfg.compute_dtype
    embedding = self.param("embedding", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0), ("vocab", "embed")), (VALUES, cfg.embed_dim),
        jnp.float32)
    x = jnp.where((slots == 0)[..., None], features[:, None, :].astype(dtype),
                  jnp.take(embedding, previous, axis=0).astype(dtype))
    x = constrain(x, ("batch", "length", "embed"))
    x = decoder_stack(Block, cfg.byte_decoder, x, slots, segment_ids, decode=self.decode,
                      cache_len=self.cache_len)
    x = RMSNorm(cfg.norm_eps, dtype, name="norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("ble,ve->blv", x, embedding.astype(dtype)) * cfg.embed_dim**-0.5
    else:
      logits = Linear((VALUES,), ("embed",), ("vocab",), dtype, name="head")(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class Bgpt(nn.Module):
  """bytes [batch, length] -> logits [batch, length, 257] (float32), logits[t] predicting byte
  t from the bytes before it; a classifier (num_classes > 0): class logits [batch, classes].

  `positions` are byte positions (0 where a document starts, which must be a patch start);
  `segment_ids` 0 marks padding rows' tail. A length that is no multiple of S is padded with
  PAD inside (logits are cut back). Decoding (`decode=True`) goes through `encode_patches` and
  `decode_bytes` (see `generate`).
  """

  config: BgptConfig
  decode: bool = False
  cache_len: int = 0  # bytes

  def setup(self):
    cfg = self.config
    self.patch_decoder = PatchDecoder(cfg, self.decode, -(-self.cache_len // cfg.patch_size))
    if cfg.generative:
      self.byte_decoder = ByteDecoder(cfg, self.decode, cfg.patch_size)
    else:
      self.classifier = Linear((cfg.num_classes,), ("embed",), (None,), jnp.float32)

  def __call__(self, tokens, positions=None, segment_ids=None):
    if self.decode:
      raise ValueError("a decoding bgpt runs encode_patches and decode_bytes (see generate)")
    cfg = self.config
    size = cfg.patch_size
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    num_patches = -(-length // size)
    extra = num_patches * size - length
    tokens = jnp.pad(tokens, ((0, 0), (0, extra)), constant_values=PAD)
    patches = tokens.reshape(batch, num_patches, size)
    patch_positions = positions[:, ::size] // size  # [batch, patches]
    patch_segments = segment_ids[:, ::size]
    features = self.encode_patches(previous_patches(patches, patch_positions), patch_positions,
                                   patch_segments)  # [batch, patches, embed]
    if not cfg.generative:
      return self.classify(features, patch_segments)
    rows = batch * num_patches
    previous = jnp.pad(patches[..., :-1], ((0, 0), (0, 0), (1, 0))).reshape(rows, size)
    slots = jnp.broadcast_to(jnp.arange(size), (rows, size))
    segments = jnp.broadcast_to(patch_segments.reshape(rows, 1), (rows, size))
    logits = self.decode_bytes(features.reshape(rows, -1), previous, slots, segments)
    return logits.reshape(batch, num_patches * size, VALUES)[:, :length]

  def encode_patches(self, previous, positions, segment_ids=None):
    """The patch decoder: previous patches [batch, patches, S] at patch `positions` ->
    features [batch, patches, embed] (decoding: through the patch cache)."""
    if segment_ids is None:
      segment_ids = jnp.ones_like(positions)
    return self.patch_decoder(previous, positions, segment_ids)

  def decode_bytes(self, features, previous, slots, segment_ids=None):
    """The byte decoder: features [rows, embed], the byte before each slot [rows, slots] and
    the slots -> logits [rows, slots, 257] (decoding: through the byte cache)."""
    if segment_ids is None:
      segment_ids = jnp.ones_like(slots)
    return self.byte_decoder(features, previous, slots, segment_ids)

  def classify(self, features, patch_segments):
    """Mean of the real patches' features [batch, patches, embed] -> class logits."""
    real = (patch_segments > 0).astype(jnp.float32)[..., None]  # [batch, patches, 1]
    pooled = (jnp.sum(features.astype(jnp.float32) * real, axis=1)
              / jnp.maximum(jnp.sum(real, axis=1), 1.0))  # [batch, embed]
    return self.classifier(pooled)

  def init_cache(self, batch_size: int):
    """Touches both caches (for their shapes: `model.init(..., method=Bgpt.init_cache)`)."""
    size = self.config.patch_size
    positions = jnp.zeros((batch_size, 1), jnp.int32)
    features = self.encode_patches(jnp.full((batch_size, 1, size), PAD), positions)
    return self.decode_bytes(features[:, 0], positions, positions)


def previous_patches(patches, patch_positions):
  """Patch i's input: patch i - 1, or the beginning-of-sequence patch (all PAD) where a
  document starts (patch position 0). [batch, patches, S] -> the same shape."""
  shifted = jnp.pad(patches[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=PAD)
  return jnp.where((patch_positions == 0)[..., None], PAD, shifted)


def classification_loss_sums(logits, batch, z_loss):
  """The classifier's sums over a batch (train.py's seam): cross-entropy of the class logits
  [batch, classes] against batch["label"] over the rows holding an example (segment_ids > 0
  anywhere), their count, and the correct ones (logged as accuracy). z_loss does not apply."""
  del z_loss
  rows = jnp.any(batch["segment_ids"] > 0, axis=-1).astype(jnp.float32)  # [batch]
  labels = batch["label"]
  nll = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * rows)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) * rows)
  return nll, {"nll": nll, "count": jnp.sum(rows), "mean/accuracy": correct}


# ---- generation: KV caches over patches and within the current patch --------------------------

def generate(config: BgptConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, rng=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int | None = None) -> list[list[int]]:
  """Continues each prompt (values 0..256, as a row lays them out; empty: a file from its
  start) by up to `max_new_tokens` bytes, all prompts as one batch (decode.sample_logits'
  settings). Stops early once every row has completed an end patch (a whole patch of PAD).
  Returns the new bytes per prompt, cut after `eos_id` if it appears."""
  new, _, steps = generate_arrays(config, params, prompts, max_new_tokens=max_new_tokens,
                                  rng=rng, temperature=temperature, top_k=top_k, top_p=top_p)
  out = []
  for row in np.asarray(new)[:, :steps].tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    out.append(row)
  return out


def generate_arrays(config: BgptConfig, params, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, rng=None, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, with_logits: bool = False):
  """`generate`'s arrays: (new bytes [batch, max_new_tokens] (PAD after the last step),
  the logits each was drawn from [batch, max_new_tokens, 257] if `with_logits` else None,
  the number of steps taken)."""
  if not config.generative:
    raise ConfigError(f"model.num_classes={config.num_classes}: a classifier does not generate")
  values = [v for prompt in prompts for v in prompt]
  if not prompts or (values and not 0 <= min(values) <= max(values) <= PAD):
    raise ConfigError(f"generate needs at least one prompt of values 0..{PAD}"
                      + (f", not {min(values)}..{max(values)}" if values else ""))
  lengths = np.array([len(p) for p in prompts], np.int32)
  needed = -(-(lengths.max() + max_new_tokens) // config.patch_size)
  if needed > config.max_patches:
    raise ConfigError(f"a prompt of {lengths.max()} bytes and {max_new_tokens} new bytes take "
                      f"{needed} patches: more than model.max_patches={config.max_patches}")
  tokens = np.full((len(prompts), lengths.max()), PAD, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  if max_new_tokens == 0:
    return np.zeros((len(prompts), 0), np.int32), None, 0
  rng = jax.random.key(0) if rng is None else rng
  new, logits, steps = _generate(config, params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                                 max_new_tokens=max_new_tokens, temperature=float(temperature),
                                 top_k=int(top_k), top_p=float(top_p), with_logits=with_logits)
  return new, logits, int(steps)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "with_logits"))
def _generate(config, params, tokens, lengths, rng, *, max_new_tokens, temperature, top_k,
              top_p, with_logits):
  """Prefill: the patch decoder over the bos patch and the prompts' whole patches, the byte
  decoder over each row's current patch; then one byte a step. A row writes cache slots past
  its own prompt in the prefill (the longest prompt sets the shapes); its own steps overwrite
  each such slot before any query of theirs can see it (a query sees the slots up to its own)."""
  size = config.patch_size
  batch, prompt_len = tokens.shape
  model = config.make_model(decode=True, cache_len=prompt_len + max_new_tokens)
  patch_slots = -(-(prompt_len + max_new_tokens) // size)  # the patch cache's length
  cache = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      lambda: model.init(jax.random.key(0), batch, method=Bgpt.init_cache))["cache"])
  rows = jnp.arange(batch)

  def apply(cache, method, *args):  # -> (output, the updated cache)
    out, variables = model.apply({"params": params, "cache": cache}, *args, method=method,
                                 mutable=["cache"])
    return out, variables["cache"]

  whole = prompt_len // size
  patches = jnp.pad(tokens, ((0, 0), (0, (whole + 1) * size - prompt_len)),
                    constant_values=PAD).reshape(batch, whole + 1, size)
  previous = jnp.concatenate([jnp.full((batch, 1, size), PAD, tokens.dtype),
                              patches[:, :whole]], axis=1)  # [batch, whole + 1, S]
  features, cache = apply(cache, Bgpt.encode_patches, previous,
                          jnp.broadcast_to(jnp.arange(whole + 1), (batch, whole + 1)))
  feature = features[rows, lengths // size]  # [batch, embed]: the current patch's
  buffer = patches[rows, lengths // size]  # [batch, S]: its bytes (those of the prompt so far)
  slots = jnp.broadcast_to(jnp.arange(size), (batch, size))
  logits, cache = apply(cache, Bgpt.decode_bytes, feature,
                        jnp.pad(buffer[:, :-1], ((0, 0), (1, 0))), slots)
  logits = logits[rows, lengths % size]  # [batch, 257]: byte `lengths`'s

  def step(state):
    k, position, feature, buffer, logits, cache, new, new_logits, done = state
    byte = sample_logits(logits, jax.random.fold_in(rng, k), temperature=temperature,
                         top_k=top_k, top_p=top_p).astype(jnp.int32)  # byte `position`
    new = new.at[:, k].set(byte)
    if with_logits:
      new_logits = new_logits.at[:, k].set(logits)
    buffer = buffer.at[rows, position % size].set(byte)
    position = position + 1
    completes = position % size == 0  # [batch]: the row's patch is whole

    def next_feature(cache):  # rows that did not complete a patch write out of the cache
      slot = jnp.where(completes, position // size, patch_slots)
      features, cache = apply(cache, Bgpt.encode_patches, buffer[:, None], slot[:, None])
      return jnp.where(completes[:, None], features[:, 0], feature), cache

    feature, cache = jax.lax.cond(jnp.any(completes), next_feature,
                                  lambda cache: (feature, cache), cache)
    done = done | (completes & jnp.all(buffer == PAD, axis=-1))
    logits, cache = apply(cache, Bgpt.decode_bytes, feature, byte[:, None],
                          (position % size)[:, None])
    return k + 1, position, feature, buffer, logits[:, 0], cache, new, new_logits, done

  new_logits = jnp.zeros((batch, max_new_tokens, VALUES) if with_logits else (), jnp.float32)
  state = (jnp.zeros((), jnp.int32), lengths, feature, buffer, logits, cache,
           jnp.full((batch, max_new_tokens), PAD, jnp.int32), new_logits,
           jnp.zeros((batch,), bool))
  state = jax.lax.while_loop(lambda s: (s[0] < max_new_tokens) & ~jnp.all(s[-1]), step, state)
  return state[6], state[7] if with_logits else None, state[0]


def convert(config: BgptConfig, params, input_bytes: bytes | Sequence[bytes], max_bytes: int,
            **settings) -> bytes | list[bytes]:
  """Conversion mode: the output file the model writes for `input_bytes` (one file, or a list
  of files decoded as a batch), laid out as in training: the input padded with PAD to whole
  patches, a separator patch of PAD, then the output generated until its end patch, at most
  `max_bytes` bytes. Greedy unless `settings` (generate's: rng, temperature, ...) say else."""
  single = isinstance(input_bytes, (bytes, bytearray))
  inputs = [input_bytes] if single else list(input_bytes)
  size = config.patch_size
  prompts = [list(data) + [PAD] * (-len(data) % size + size) for data in inputs]
  new = generate(config, params, prompts, max_new_tokens=(-(-max_bytes // size) + 1) * size,
                 eos_id=PAD, **settings)
  outputs = [bytes(v for v in row if v != PAD)[:max_bytes] for row in new]
  return outputs[0] if single else outputs

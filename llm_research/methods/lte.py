"""LTE, LoRA-the-Explorer (Huh et al., "Training Neural Networks from Scratch with Parallel
Low-Rank Adapters"): a model trained from scratch through N parallel LoRA heads that are merged
into the main weights every T steps. `--config.train.method=lte`; the `lte` config section.

The state (`LTEState`, a TrainState's `params`):
  main     the ordinary model's params (what `main_params` returns, merged): the adapted
           kernels W, held in `lte.main_dtype`, and the other params as of the last merge.
  heads    per head, stacked on a leading [N] axis: "lora_a" A_n [*lead, *in, r] and "lora_b"
           B_n [*lead, r, *out] of every adapted Linear, and a replica of every other param
           (norms, embeddings, an untied output head).
  merged   per head, [N, ...]: its A'_n and B'_n, the adapters' values at the last merge.
  master   float32 copies of the adapted kernels when `main_dtype` is not float32, else None.
Each head has its own optimizer state (TrainState.opt_state: the moments stacked on [N]; the
step count, the same for all, is shared).

A step trains head n alone on the n-th of N equal, disjoint shares of the global batch (rows
[n B / N, (n + 1) B / N)), through its own forward: every adapted Linear computes
    W x + s (B_n A_n x - B'_n A'_n x),   s = alpha / r,
with the head's replicas for everything else. W is frozen between merges (no gradient, no
optimizer state); the loss gradient reaches only the head's adapters and replicas.

Every T steps (`merge`, an after-step hook inside the compiled step):
    W += mean_n s (B_n A_n - B'_n A'_n);   B'_n A'_n := B_n A_n;   replicas := their mean.
A and the optimizer states are not reset (the paper's reset-less variant). Since head n's
forward subtracts its own contribution at the last merge, a merge never counts an update twice:
it moves every head's weights to the heads' mean (the mean of the heads' effective weights is
unchanged; heads that agree see no change at all), and after it every head computes the main
model's function. Telescoping, W = W_0 + s mean_n B_n A_n: the update W - W_0 has rank at most
N r, hence the recipe heads x rank >= the model's width.

Norms and embeddings follow the paper's code (`lte/replica.py`): each head trains a replica of
them, and a merge averages the replicas. They train at `train.learning_rate` (the paper's notes:
replicas need their own learning rate); the adapters at `lte.learning_rate`, by default
`train.learning_rate / s`, which moves a head's effective weights about as far per step as
full-rank AdamW would (B's update times A, whose entries are about 1 / sqrt(r), times s).
A is LTE's orthogonal init (models/linear.py), B zero. The paper also lowers alpha on the query
and key projections; here every projection has the same s.

Precision: with `main_dtype="bfloat16"` the heads read W in bfloat16; the merge adds the update
to the float32 master and rounds it into W. The rounding of each merge's update is then a jump
of the heads' function (bounded by bfloat16's half-ulp of W); a BitNet base likewise jumps by
the quantization of W + dW (see methods/lora.py).

Heads over devices: the logical axis "lora_heads" of every per-head array maps to the mesh
axis `lte.mesh_axis` (data by default), so each device holds N / D heads, their optimizer
state and their share of the batch, and W whole (or as the other rules shard it: fsdp,
tensor). The step runs the heads under `jax.vmap(spmd_axis_name=...)`; inside, no rule maps
to the head axis. Between merges no array crosses the head axis but the scalars of the
metrics; a merge all-reduces the kernels' update (|W| floats) and the replicas' mean, once
every T steps, where data parallelism all-reduces every param's gradient every step
(experiments/benchmarks/lte_communication.py measures it). Gathering the factors instead would
move N r (in + out) floats per kernel: more than |W| once N r >= the width.
"""
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from llm_research import sharding, train
from llm_research.errors import ConfigError
from llm_research.methods import lora
from llm_research.models.linear import orthogonal_adapter_init

MAIN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEADS_AXIS = "lora_heads"  # the logical axis of every per-head array


@struct.dataclass
class LTEState:
  """main, heads, merged, master: see the module docstring; heads and merged are stacked on a
  leading [N] axis (logical axis "lora_heads")."""

  main: Any
  heads: Any
  merged: Any
  master: Any
  scale: float = struct.field(pytree_node=False)  # s = alpha / r


@dataclasses.dataclass(frozen=True)
class LTEConfig:
  """A run's LTE settings (`settings` builds it from the config) and its model's config."""

  model: Any  # the registered model config, without LoRA of its own
  heads: int
  rank: int
  alpha: float
  merge_every: int
  main_dtype: str = "float32"

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def lora_model(self):
    """The model with N adapter heads: the shapes, logical axes and init of the adapters."""
    return dataclasses.replace(self.model, lora_rank=self.rank, lora_alpha=self.alpha,
                               lora_heads=self.heads)

  def head_model(self):
    """One head's forward: its adapter (A_n, B_n) and its merged one (A'_n, -B'_n) as the two
    heads of a LoRA of scale alpha * 2 / r / 2 = s."""
    return dataclasses.replace(self.model, lora_rank=self.rank, lora_alpha=2 * self.alpha,
                               lora_heads=2)


# ---- config ---------------------------------------------------------------------------------

def settings(config: ml_collections.ConfigDict, model_config) -> LTEConfig:
  """The LTEConfig of a run; a ConfigError naming the key for a value LTE cannot take."""
  lc = config.lte

  def need(ok: bool, key: str, what: str) -> None:
    if not ok:
      section, name = key.split(".")
      raise ConfigError(f"{key}={config[section][name]!r} {what}")

  for name in ("heads", "merge_every"):
    need(lc[name] >= 1, f"lte.{name}", "must be at least 1")
  need(lc.rank >= 0, "lte.rank", "must not be negative (0: the smallest with heads x rank >= "
       "the model's width)")
  need(lc.alpha > 0, "lte.alpha", "must be positive")
  need(lc.learning_rate >= 0, "lte.learning_rate", "must not be negative (0: "
       "train.learning_rate / s)")
  need(lc.main_dtype in MAIN_DTYPES, "lte.main_dtype", f"is not one of {sorted(MAIN_DTYPES)}")
  need(lc.mesh_axis in ("", *sharding.MESH_AXES), "lte.mesh_axis",
       f"is not a mesh axis {sharding.MESH_AXES} or '' (every head on every device)")
  need(not config.train.get("init_from"), "train.init_from",
       "is not supported with train.method='lte' yet (lte.init takes any params: wire it "
       "through Trainer.init_state)")
  if not hasattr(model_config, "lora_rank"):
    raise ConfigError(f"model.name={config.model.name!r} has no LoRA adapters (lora_rank), "
                      "which train.method='lte' trains")
  need(model_config.lora_rank == 0, "model.lora_rank", "must be 0 with train.method='lte' "
       "(LTE brings its own adapters: lte.heads, lte.rank)")
  dims = adapted_dims(model_config)
  if not dims:
    raise ConfigError(f"train.method='lte': model.name={config.model.name!r} has no linear "
                      "layer with LoRA adapters to train")
  width = getattr(model_config, "embed_dim", max(max(d) for d in dims.values()))
  rank = lc.rank or -(-width // lc.heads)
  smallest = min(min(d) for d in dims.values())
  if rank > smallest:
    layer = min(dims, key=lambda k: min(dims[k]))
    raise ConfigError(f"lte.rank={rank}{' (from lte.heads and the width)' if not lc.rank else ''}"
                      f" is larger than a dim of the layer it adapts: {layer} is "
                      f"{dims[layer][0]} -> {dims[layer][1]}")
  return LTEConfig(model_config, lc.heads, rank, lc.alpha, lc.merge_every, lc.main_dtype)


def adapted_dims(model_config) -> dict[str, tuple[int, int]]:
  """{path: (fan_in, fan_out)} of the Linear layers LoRA adapts in `model_config`'s model."""
  probe = dataclasses.replace(model_config, lora_rank=1, lora_heads=1)
  params = jax.eval_shape(probe.make_model().init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  dims = {}

  def visit(node, path):
    if lora.is_adapted(node):
      a, b = node["lora_a"], node["lora_b"]
      h = _heads_index(a)
      dims["/".join(path)] = (math.prod(a.value.shape[h + 1:-1]),
                              math.prod(b.value.shape[h + 2:]))
    elif isinstance(node, dict):
      for k, v in node.items():
        visit(v, path + [k])
  visit(params, [])
  return dims


def check_mesh(config, mesh) -> None:
  """Refuses heads the mesh axis cannot spread evenly, and a batch they cannot split."""
  lc, tc = config.lte, config.train
  if lc.mesh_axis and lc.heads % mesh.shape[lc.mesh_axis]:
    raise ConfigError(f"lte.heads={lc.heads} do not fit the mesh axis lte.mesh_axis="
                      f"{lc.mesh_axis!r} of {mesh.shape[lc.mesh_axis]} devices: use a multiple "
                      "of it")
  if tc.batch_size % lc.heads:
    raise ConfigError(f"train.batch_size={tc.batch_size} cannot be split into lte.heads="
                      f"{lc.heads} equal shares")
  rows = tc.batch_size // lc.heads
  inner = _inner_rules(sharding.rules_from_config(config), lc.mesh_axis)
  ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(inner))
  if rows % tc.grad_accum or (rows // tc.grad_accum) % ways:
    raise ConfigError(f"a head's share of train.batch_size={tc.batch_size} / lte.heads="
                      f"{lc.heads} = {rows} rows cannot be split into train.grad_accum="
                      f"{tc.grad_accum} micro-batches over the other batch axes ({ways} ways)")


def _rules(rules, mesh_axis: str) -> tuple:
  """`rules` with the heads on `mesh_axis` (or on no axis)."""
  return tuple((name, mesh_axis or None) if name == HEADS_AXIS else (name, axes)
               for name, axes in rules)


def _inner_rules(rules, mesh_axis: str) -> tuple:
  """The rules inside one head's forward: no logical axis maps to the heads' mesh axis."""
  def drop(axes):
    if axes is None or not mesh_axis:
      return axes
    kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a != mesh_axis)
    return kept if len(kept) > 1 else (kept[0] if kept else None)
  return tuple((name, None if name == HEADS_AXIS else drop(axes)) for name, axes in rules)


# ---- the state: init, merge, main params --------------------------------------------------------

def _heads_index(box) -> int:
  """Where "lora_heads" sits among an adapter's logical axes (after the stacked layers)."""
  return box.names.index(HEADS_AXIS)


def _names(box, ndim: int) -> tuple:
  return tuple(box.names) if isinstance(box, nn.Partitioned) else (None,) * ndim


def _box(value, names):
  return nn.LogicallyPartitioned(value, names=tuple(names))


def _n_lead(kernel_ndim: int, a_ndim: int, b_ndim: int) -> int:
  """Stacked-layer axes of an adapted kernel, from the ranks of one head's A [*lead, *in, r]
  and B [*lead, r, *out] and of the kernel [*lead, *in, *out]."""
  return a_ndim + b_ndim - 2 - kernel_ndim


def init_boxed(config: LTEConfig, params, rng, *, seq_len: int = 16) -> LTEState:
  """`init`, with every array boxed in its logical axes (nn.Partitioned) for sharding."""
  abstract = jax.eval_shape(config.lora_model().make_model().init, jax.random.key(0),
                            jnp.zeros((1, seq_len), jnp.int32))["params"]
  values = nn.meta.unbox(params)
  main_dtype = MAIN_DTYPES[config.main_dtype]
  count = sum(1 for node in jax.tree.leaves(abstract, is_leaf=lora.is_adapted)
              if lora.is_adapted(node))
  keys = iter(jax.random.split(rng, count))
  n = config.heads

  def build(node, value):  # -> (main, heads, merged, master) of this subtree
    if lora.is_adapted(node):
      kernel_box, a_box, b_box = node["kernel"], node["lora_a"], node["lora_b"]
      h = _heads_index(a_box)
      lead_names = lambda box: (HEADS_AXIS, *box.names[:h], *box.names[h + 1:])
      a_shape = (n, *a_box.value.shape[:h], *a_box.value.shape[h + 1:])  # [N, *lead, *in, r]
      b_shape = (n, *b_box.value.shape[:h], *b_box.value.shape[h + 1:])  # [N, *lead, r, *out]
      rows = (n * math.prod(a_shape[1:h + 1]), *a_shape[h + 1:])
      a = orthogonal_adapter_init(next(keys), rows).reshape(a_shape)
      b = jnp.zeros(b_shape, jnp.float32)
      kernel = jnp.asarray(value["kernel"], jnp.float32)
      adapters = lambda: {"lora_a": _box(a, lead_names(a_box)),
                          "lora_b": _box(b, lead_names(b_box))}
      master = ({"kernel": _box(kernel, kernel_box.names)} if main_dtype != jnp.float32
                else None)
      return ({"kernel": _box(kernel.astype(main_dtype), kernel_box.names)}, adapters(),
              adapters(), master)
    if isinstance(node, dict):
      parts = {k: build(v, value[k]) for k, v in node.items()}
      pick = lambda i: {k: p[i] for k, p in parts.items() if p[i] is not None} or None
      return pick(0), pick(1), pick(2), pick(3)
    leaf = jnp.asarray(value)
    names = _names(node, leaf.ndim)
    return (_box(leaf, names), _box(jnp.broadcast_to(leaf, (n, *leaf.shape)),
                                     (HEADS_AXIS, *names)), None, None)

  main, heads, merged, master = build(abstract, values)
  return LTEState(main=main, heads=heads, merged=merged, master=master, scale=config.scale)


@functools.partial(jax.jit, static_argnames=("config", "seq_len"))
def init(config: LTEConfig, params, rng, *, seq_len: int = 16) -> LTEState:
  """The LTE state of a model whose params are `params` (the ordinary model's, e.g. fresh or
  pretrained): W and the replicas from them, A_n orthogonal from `rng`, B_n zero, merged
  adapters equal to the heads' (so the first merge adds what the heads learnt since)."""
  return nn.meta.unbox(init_boxed(config, params, rng, seq_len=seq_len))


def _per_adapted(fn_adapted, fn_replica, main, heads, merged, master):
  """Maps the adapted Linears (fn_adapted(main, heads, merged, master) -> 4 parts) and the
  replicated leaves (fn_replica(main, heads) -> (main, heads)) of a state's trees."""
  if isinstance(heads, dict) and "lora_a" in heads:
    return fn_adapted(main, heads, merged, master)
  if isinstance(main, dict):
    parts = {k: _per_adapted(fn_adapted, fn_replica, main[k], heads[k],
                             (merged or {}).get(k), (master or {}).get(k)) for k in main}
    pick = lambda i: {k: p[i] for k, p in parts.items() if p[i] is not None} or None
    return pick(0), pick(1), pick(2), pick(3)
  return (*fn_replica(main, heads), None, None)


def merge(state: LTEState) -> LTEState:
  """W += mean_n s (B_n A_n - B'_n A'_n) (on the float32 master if there is one), then
  B'_n A'_n := B_n A_n, and every replica := the heads' mean. A pure function."""

  def adapted(main, heads, merged, master):
    kernel = main["kernel"]
    n = heads["lora_a"].shape[0]
    lead = _n_lead(kernel.ndim, heads["lora_a"].ndim - 1, heads["lora_b"].ndim - 1)
    # B_n A_n - B'_n A'_n as one rank-2r product per head: [A_n, A'_n] and [B_n; -B'_n].
    a = jnp.concatenate([heads["lora_a"], merged["lora_a"]], axis=-1)
    b = jnp.concatenate([heads["lora_b"], -merged["lora_b"]], axis=1 + lead)
    delta = lora.adapter_delta(kernel.shape, jnp.moveaxis(a, 0, lead), jnp.moveaxis(b, 0, lead),
                               state.scale / n)  # contracts the heads: one all-reduce of |W|
    new = (master["kernel"] if master is not None else kernel).astype(jnp.float32) + delta
    return ({**main, "kernel": new.astype(kernel.dtype)}, heads,
            {"lora_a": heads["lora_a"], "lora_b": heads["lora_b"]},
            None if master is None else {"kernel": new})

  def replica(main, heads):
    mean = jnp.mean(heads.astype(jnp.float32), axis=0)
    return mean.astype(main.dtype), jnp.broadcast_to(mean, heads.shape).astype(heads.dtype)

  main, heads, merged, master = _per_adapted(adapted, replica, state.main, state.heads,
                                             state.merged, state.master)
  return state.replace(main=main, heads=heads, merged=merged, master=master)


def main_params(state: LTEState):
  """The ordinary model's params (float32) with everything the heads learnt merged in: what
  every head computes right after a merge. Evaluation and sampling read these."""
  merged = merge(state)
  if merged.master is None:
    return merged.main

  def overlay(main, master):
    if master is None:
      return main
    if isinstance(main, dict):
      return {k: overlay(v, master.get(k)) for k, v in main.items()}
    return master
  return overlay(merged.main, merged.master)


def assemble(main, head, merged):
  """One head's params for `LTEConfig.head_model()`: W and its adapters [A_n, A'_n],
  [B_n, -B'_n] stacked as two LoRA heads, its replicas for the rest. `head` and `merged` are
  one head's slices (no [N] axis)."""
  def adapted(main, head, merged, _):
    lead = _n_lead(main["kernel"].ndim, head["lora_a"].ndim, head["lora_b"].ndim)
    return ({**main, "lora_a": jnp.stack([head["lora_a"], merged["lora_a"]], axis=lead),
             "lora_b": jnp.stack([head["lora_b"], -merged["lora_b"]], axis=lead)},
            None, None, None)
  return _per_adapted(adapted, lambda main, head: (head, None), main, head, merged, None)[0]


def head_params(state: LTEState, n: int):
  """Head n's params for `LTEConfig.head_model()` (what it computes with, between merges)."""
  pick = lambda tree: jax.tree.map(lambda x: x[n], tree)
  return assemble(state.main, pick(state.heads), pick(state.merged))


# ---- training: the trainer's method ----------------------------------------------------------

def _dict_keys(path) -> list[str]:
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def make_optimizer(tc, adapter_learning_rate: float) -> optax.GradientTransformation:
  """One head's optimizer: `train.make_optimizer` for the adapters at `adapter_learning_rate`,
  and another at train.learning_rate for the replicas (each its own clipping norm)."""
  adapters_tc = ml_collections.ConfigDict(tc.to_dict())
  adapters_tc.learning_rate = adapter_learning_rate
  labels = lambda heads: jax.tree_util.tree_map_with_path(
      lambda path, _: "adapters" if _dict_keys(path)[-1] in ("lora_a", "lora_b") else "replicas",
      heads)
  return optax.multi_transform({"adapters": train.make_optimizer(adapters_tc),
                                "replicas": train.make_optimizer(tc)}, labels)


class LTE:
  """`train.method="lte"` for train.Trainer (the method seam; train.Standard is the default).

  The train state is a TrainState whose params are an LTEState and whose opt_state holds the
  heads' optimizer states; `model_params` gives the main params (merged) to eval and sampling.
  """

  def __init__(self, trainer, hooks=()):
    config, tc = trainer.config, trainer.config.train
    self.config = settings(config, trainer.model_config)
    self.model, self.seq_len = trainer.model, config.data.seq_len
    self.head_model = self.config.head_model().make_model()
    axis = config.lte.mesh_axis
    base = sharding.rules_from_config(config)
    self.rules, self.inner_rules = _rules(base, axis), _inner_rules(base, axis)
    self.spmd_axis = axis or None
    adapter_lr = config.lte.learning_rate or tc.learning_rate / self.config.scale
    self.optimizer = make_optimizer(tc, adapter_lr)
    self.schedules = {"learning_rate": train.learning_rate_schedule(tc),
                      "adapter_learning_rate": train.learning_rate_schedule(
                          ml_collections.ConfigDict({**tc.to_dict(),
                                                     "learning_rate": adapter_lr}))}
    self.grad_accum, self.z_loss, self.trainable = tc.grad_accum, tc.z_loss, tc.trainable
    merge_hook = train.AfterStepHook(self.config.merge_every,
                                     lambda s: s.replace(params=merge(s.params)))
    self.hooks = (merge_hook, *hooks)

  @staticmethod
  def check_config(config, model_config) -> None:
    settings(config, model_config)

  check_mesh = staticmethod(check_mesh)

  def init(self, params_key, state_key) -> train.TrainState:
    model_key, adapters_key = jax.random.split(params_key)
    params = self.model.init(model_key, jnp.zeros((1, self.seq_len), jnp.int32))["params"]
    state = init_boxed(self.config, params, adapters_key, seq_len=self.seq_len)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=state,
                            opt_state=self.optimizer.init(state.heads),
                            rng=jax.random.key_data(state_key))

  def trained(self, params: LTEState):
    """The params the optimizer trains (those train.trainable selects from)."""
    return params.heads

  def model_param_shardings(self, shardings: LTEState):
    return shardings.main

  def model_params(self, params: LTEState):
    return main_params(params)

  def step(self, state: train.TrainState, batch: dict):
    state, metrics = local_step(state, batch, method=self)
    return train.apply_hooks(state, self.hooks), metrics


def local_step(state: train.TrainState, batch: dict, *, method: LTE):
  """Every head's update on its share of `batch` (no merge): (state, metrics)."""
  lte_state, n = state.params, method.config.heads
  shares = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

  def head_grads(head, merged, share):  # one head, one share: summed grads and sums
    def grads_and_sums(micro_batch):
      loss = lambda h: train._batch_losses(assemble(lte_state.main, h, merged),
                                           method.head_model, micro_batch, method.z_loss)
      (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(head)
      return grads, sums
    return train.accumulated(grads_and_sums, share, method.grad_accum)

  vmap = functools.partial(jax.vmap, spmd_axis_name=method.spmd_axis)
  with nn.logical_axis_rules(method.inner_rules):
    grads, sums = vmap(head_grads)(lte_state.heads, lte_state.merged, shares)
  tokens = sums.pop("count")  # [N]
  per_head = lambda g: jnp.maximum(tokens, 1.0).reshape(-1, *(1,) * (g.ndim - 1))
  grads = jax.tree.map(lambda g, t: g / per_head(g) if t else jnp.zeros_like(g), grads,
                       train.trainable_mask(grads, method.trainable))
  opt_axes = jax.tree.map(lambda x: 0 if x.ndim else None, state.opt_state)
  updates, opt_state = vmap(method.optimizer.update, in_axes=(0, opt_axes, 0),
                            out_axes=(0, opt_axes))(grads, state.opt_state, lte_state.heads)
  new_state = state.replace(
      step=state.step + 1, opt_state=opt_state,
      params=lte_state.replace(heads=optax.apply_updates(lte_state.heads, updates)))
  total = jnp.maximum(jnp.sum(tokens), 1.0)
  metrics = {"loss": jnp.sum(sums.pop("nll")) / total, "grad_norm": optax.tree.norm(grads),
             **{k: schedule(state.step) for k, schedule in method.schedules.items()},
             **{k: jnp.sum(v, axis=0) / total if k.startswith("aux_loss/") else
                jnp.sum(v, axis=0) for k, v in sums.items()}}
  return new_state, metrics


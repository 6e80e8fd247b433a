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

from llm_research import sharding
from llm_research.errors import ConfigError
from llm_research.methods import lora
from llm_research.models.linear import orthogonal_adapter_init
from llm_research.training import checks
from llm_research.training.method import TrainingMethod, register
from llm_research.training.objective import (accumulated, batch_losses, frozen_to_zero,
                                             logged_metrics)
from llm_research.training.optimizer import learning_rate_schedule, make_optimizer
from llm_research.training.state import AfterStepHook, TrainState, apply_hooks, step_key

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
  need = lambda ok, key, what: checks.need(config, ok, key, what)
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


# ---- training: the method ------------------------------------------------------------------

def _dict_keys(path) -> list[str]:
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def head_optimizer(tc, adapter_learning_rate: float) -> optax.GradientTransformation:
  """One head's optimizer: `make_optimizer` for the adapters at `adapter_learning_rate`, and
  another at train.learning_rate for the replicas (each its own clipping norm)."""
  labels = lambda heads: jax.tree_util.tree_map_with_path(
      lambda path, _: "adapters" if _dict_keys(path)[-1] in ("lora_a", "lora_b") else "replicas",
      heads)
  return optax.multi_transform({"adapters": make_optimizer(_with_lr(tc, adapter_learning_rate)),
                                "replicas": make_optimizer(tc)}, labels)


def _with_lr(tc, learning_rate: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({**tc.to_dict(), "learning_rate": learning_rate})


@register("lte")
class LTE(TrainingMethod):
  """`train.method="lte"`: the state's params are an LTEState; its opt_state holds the heads'
  optimizer states; `model_params` gives the main params (merged) to eval and sampling."""

  # `heads` LoRA heads of rank `rank` (0: the smallest with heads x rank >= model.embed_dim),
  # s = alpha / rank, merged every `merge_every` steps. The adapters train at `learning_rate`
  # (0: train.learning_rate / s), the replicas of the other params (norms, embeddings) at
  # train.learning_rate. `main_dtype` holds the main weights on the devices (bfloat16: with a
  # float32 master, updated at merges); `mesh_axis` spreads the heads.
  config_section = dict(heads=4, rank=0, alpha=4096.0, merge_every=10, learning_rate=0.0,
                        main_dtype="float32", mesh_axis="data")
  shape_keys = ("lte.heads", "lte.rank", "lte.main_dtype")

  def __init__(self, config, model_config, hooks=()):
    super().__init__(config, model_config, hooks)
    tc = config.train
    self.lte = settings(config, model_config)
    self.head_model = self.lte.head_model().make_model()
    axis = config.lte.mesh_axis
    base = sharding.rules_from_config(config)
    self._rules, self.inner_rules = _rules(base, axis), _inner_rules(base, axis)
    self.spmd_axis = axis or None
    adapter_lr = config.lte.learning_rate or tc.learning_rate / self.lte.scale
    self.optimizer = head_optimizer(tc, adapter_lr)
    self.schedules = {"learning_rate": learning_rate_schedule(tc),
                      "adapter_learning_rate": learning_rate_schedule(_with_lr(tc, adapter_lr))}
    merge_hook = AfterStepHook(self.lte.merge_every, lambda s: s.replace(params=merge(s.params)))
    self.hooks = (merge_hook, *self.hooks)

  @classmethod
  def check_config(cls, config, model_config) -> None:
    settings(config, model_config)

  @classmethod
  def check_mesh(cls, config, mesh) -> None:
    check_mesh(config, mesh)

  @property
  def rules(self) -> tuple:
    return self._rules

  def init(self, params, rng):
    state = init_boxed(self.lte, params, rng, seq_len=self.config.data.seq_len)
    return state, self.optimizer.init(state.heads)

  def trained(self, params: LTEState):
    return params.heads

  def model_params(self, params: LTEState):
    return main_params(params)

  def model_param_shardings(self, shardings: LTEState):
    return shardings.main

  def step(self, state: TrainState, batch: dict):
    state, metrics = local_step(state, batch, method=self)
    return apply_hooks(state, self.hooks), metrics


def local_step(state: TrainState, batch: dict, *, method: LTE):
  """Every head's update on its share of `batch`, each with its own key (no merge):
  (state, metrics)."""
  lte_state, n = state.params, method.lte.heads
  tc = method.config.train
  shares = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

  def head_grads(head, merged, share, rng):  # one head, one share: summed grads and sums
    def grads_and_sums(micro_batch, micro_rng):
      loss = lambda h: batch_losses(assemble(lte_state.main, h, merged), micro_batch, micro_rng,
                                    model=method.head_model, z_loss=tc.z_loss)
      (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(head)
      return grads, sums
    return accumulated(grads_and_sums, share, tc.grad_accum, rng)

  vmap = functools.partial(jax.vmap, spmd_axis_name=method.spmd_axis)
  with nn.logical_axis_rules(method.inner_rules):
    grads, sums = vmap(head_grads)(lte_state.heads, lte_state.merged, shares,
                                   jax.random.split(step_key(state), n))
  tokens = sums["count"]  # [N]
  per_head = lambda g: jnp.maximum(tokens, 1.0).reshape(-1, *(1,) * (g.ndim - 1))
  grads = frozen_to_zero(jax.tree.map(lambda g: g / per_head(g), grads), tc.trainable)
  opt_axes = jax.tree.map(lambda x: 0 if x.ndim else None, state.opt_state)
  updates, opt_state = vmap(method.optimizer.update, in_axes=(0, opt_axes, 0),
                            out_axes=(0, opt_axes))(grads, state.opt_state, lte_state.heads)
  new_state = state.replace(
      step=state.step + 1, opt_state=opt_state,
      params=lte_state.replace(heads=optax.apply_updates(lte_state.heads, updates)))
  metrics = logged_metrics(jax.tree.map(lambda v: jnp.sum(v, axis=0), sums), grads,
                           {k: schedule(state.step) for k, schedule in method.schedules.items()})
  return new_state, metrics

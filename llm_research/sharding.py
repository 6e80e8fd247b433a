"""Meshes from config, logical-axis rules, sharded init and sharded batches.

Model code names only logical axes; this module turns them into `NamedSharding`s on a mesh with
axes (data, fsdp, tensor, expert). Works the same for one process or many (one per host).
"""
import contextlib
import math
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_research.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the config's axis sizes (one may be -1) against the device count."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh ({described}): sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh ({described}) does not fit {num_devices} devices: "
                        f"{num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh ({described}) needs {math.prod(sizes)} devices, "
                      f"but there are {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def rules_from_config(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.logical_axis_rules)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree whose leaves carry logical-axis metadata (others replicate).

  A dimension its mesh axes do not divide evenly (e.g. the byte tokenizer's vocab of 259 over
  tensor=2) is replicated instead: JAX cannot create arrays sharded unevenly.
  """
  # A frozen param's optimizer slot (optax.MaskedNode, boxed like the param) holds nothing.
  abstract_tree = jax.tree.map(
      lambda x: x.value if isinstance(getattr(x, "value", None), optax.MaskedNode) else x,
      abstract_tree,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  return jax.tree.map(_divisible, shardings, nn.meta.unbox(abstract_tree))


def _divisible(sharding: NamedSharding, abstract) -> NamedSharding:
  def ways(axes):
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(sharding.mesh.shape[a] for a in axes if a is not None)
  spec = [axes if axes is None or size % ways(axes) == 0 else None
          for axes, size in zip(sharding.spec, abstract.shape)]
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """The mesh and logical-axis rules that model code's sharding constraints resolve against."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def mesh_axes(logical_axis: str, rules) -> tuple[str, ...]:
  """The mesh axes `logical_axis` maps to under `rules` (its first rule)."""
  axes = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  return () if axes is None else axes if isinstance(axes, tuple) else (axes,)


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes the logical axis "batch" maps to under `rules`."""
  return mesh_axes("batch", rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Batches split their leading dim over the batch axes of `rules`, and replicate the rest."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(rules)))


def check_batch_size(global_batch_size: int, mesh: Mesh, rules, what: str = "") -> None:
  """`what` names the batch in the error (default: train.batch_size=<global_batch_size>)."""
  axes = batch_axes(rules)
  ways = math.prod(mesh.shape[a] for a in axes)
  if global_batch_size % ways or global_batch_size % jax.process_count():
    raise ConfigError(
        f"{what or f'train.batch_size={global_batch_size}'} cannot be split over the data axes "
        f"({' x '.join(axes) or 'none'} = {ways} ways) and {jax.process_count()} processes: "
        "choose a multiple of both")


def check_expert_axis(num_experts: int, mesh: Mesh, rules) -> None:
  """Refuses MoE experts that the mesh axes of the logical axis "expert" cannot split evenly:
  each device along them holds num_experts / ways whole experts (and the dropless path sends
  tokens to them), so an axis larger than the experts, or not dividing them, leaves a device
  without its share."""
  axes = mesh_axes("expert", rules)
  ways = math.prod(mesh.shape[a] for a in axes)
  split = f"the expert axis ({' x '.join(axes) or 'none'} = {ways} ways)"
  if ways > num_experts:
    raise ConfigError(f"{split} is larger than model.moe.num_experts={num_experts}: each device "
                      "along it must hold at least one expert")
  if num_experts % ways:
    raise ConfigError(f"model.moe.num_experts={num_experts} cannot be split over {split}: "
                      "choose a multiple of it")


def shard_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
  """Per-process numpy rows -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}



_COLLECTIVE = re.compile(  # an instruction: name = result-type collective(operands)
    r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s"
    r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[a-z][a-z0-9]*)\[([\d,]*)\]")


def collective_bytes(hlo_text: str, *, in_conditionals: bool | None = None) -> dict[str, int]:
  """{collective: bytes} a compiled program (`.compile().as_text()`) moves per run on one
  device: each cross-device collective's result size, times the trip count of the while loops
  around it (a scanned layer's gradient all-reduce counts once per layer), summed by kind (an
  async pair counted at its start).

  `in_conditionals`: only the collectives inside (True) or outside (False) the branches of the
  program's conditionals, e.g. of an after-step hook that runs every T steps; None: all (both
  branches of a conditional count, taken or not).
  """
  computations: dict[str, list[str]] = {}  # name -> its instruction lines
  entry, lines = None, None
  for line in hlo_text.splitlines():
    header = re.match(r"(ENTRY\s+)?%([\w.\-]+)\s.*\{$", line)
    if header:
      lines = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.startswith("}"):
      lines = None
    elif lines is not None:
      lines.append(line)
  totals: dict[str, int] = {}

  def visit(name: str, times: int, conditional: bool) -> None:
    for line in computations[name]:
      match = _COLLECTIVE.match(line)
      if match and in_conditionals in (None, conditional):
        result, kind = match.groups()
        size = 0
        for dtype, dims in _ARRAY.findall(result):
          bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
          size += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
        totals[kind] = totals.get(kind, 0) + times * size
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      inner = times * (int(trips.group(1)) if trips and re.search(r"\swhile\(", line) else 1)
      branch = conditional or bool(re.search(r"\sconditional\(", line))
      for called in re.findall(r"%([\w.\-]+)", line.split("metadata=")[0]):
        if called in computations and called != name:
          visit(called, inner, branch)

  if entry is not None:
    visit(entry, 1, False)
  return totals

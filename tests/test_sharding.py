"""Sharding: train steps on 8 fake devices (data, fsdp, tensor and expert parallel) compute what
one device computes, with the XLA attention, the Pallas kernel inside shard_map and MoE experts
sharded over `expert` (tokens sent to them by all-to-all, capacity and dropless paths); params
and grads are laid out as the logical-axis rules say; configs that do not fit the devices are
refused by name.

The 8-device side runs in one subprocess (tests/sharding_worker.py): the main pytest process
already has its single CPU device.
"""
import fcntl
import json
import os
import pathlib
import re
import shutil

import numpy as np
import pytest
from jax.sharding import AbstractMesh

import sharding_worker
from conftest import TESTS_DIR, beside_eight_devices
from llm_research import sharding


def once_per_run(tmp_path_factory, name: str, produce) -> pathlib.Path:
  """Runs `produce(directory)` once per pytest run, even when pytest-xdist workers (who share
  the parent of their temporary folders) each ask for it; returns the directory."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  directory = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (directory / "done").exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      produce(directory)
      (directory / "done").touch()
  return directory


def compute(directory: pathlib.Path) -> None:
  """8 devices (the worker, in a subprocess) and, meanwhile, 1 device (here), into files."""
  workdir = directory / "workdir"
  workdir.mkdir()
  with open(workdir / "metrics.jsonl", "w") as f:
    f.write('{"step": 1, "loss": 1.0}\n')
  def one_device():
    np.save(directory / "one_packed_logits.npy", sharding_worker.packed_logits())
    np.savez(directory / "one_dropless_moe.npz", **sharding_worker.dropless_moe_grads())
    return {variant: sharding_worker.run(overrides)
            for variant, overrides in sharding_worker.VARIANTS.items()}

  ones = beside_eight_devices(
      [os.path.join(TESTS_DIR, "sharding_worker.py"), directory / "eight.npz", workdir],
      directory / "worker.log", one_device)
  for variant, one in ones.items():
    arrays = {f"{kind}|{name}": value for kind in ("grads", "params")
              for name, value in one.pop(kind).items()}
    np.savez(directory / f"one_{variant}.npz", summary=json.dumps(one), **arrays)


def load_one_device(path) -> dict:
  one = dict(np.load(path))
  result = json.loads(str(one.pop("summary")))
  for kind in ("grads", "params"):
    result[kind] = {k.split("|", 1)[1]: v for k, v in one.items() if k.startswith(kind)}
  return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """(one device's result per model variant, 8 devices' summary, their arrays, the workdir
  refused runs saw)."""
  directory = once_per_run(tmp_path_factory, "sharding_results", compute)
  one_device = {variant: load_one_device(directory / f"one_{variant}.npz")
                for variant in sharding_worker.VARIANTS}
  one_device["packed_logits"] = np.load(directory / "one_packed_logits.npy")
  one_device["dropless_moe"] = dict(np.load(directory / "one_dropless_moe.npz"))
  arrays = dict(np.load(directory / "eight.npz"))
  return one_device, json.loads(str(arrays.pop("summary"))), arrays, directory / "workdir"


@pytest.fixture(scope="module")
def eight_devices(results):
  return results[1:]


@pytest.fixture(scope="module")
def one_device(results):
  return results[0]


@pytest.mark.parametrize("mesh", list(sharding_worker.MESHES))
def test_losses_gradients_and_params_match_one_device(mesh, eight_devices, one_device):
  summary, arrays, _ = eight_devices
  result = summary[mesh]
  one_device = one_device[sharding_worker.MESHES[mesh][0]]
  assert np.prod(list(result["mesh"].values())) == 8
  assert one_device["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}

  np.testing.assert_allclose(result["losses"], one_device["losses"], rtol=1e-5)
  assert one_device["losses"][-1] < one_device["losses"][0]  # the steps did train
  assert set(one_device["grads"]) == {k.split("|")[2] for k in arrays
                                      if k.startswith(f"{mesh}|grads|")}
  grad_norm = np.sqrt(sum(np.sum(g**2) for g in one_device["grads"].values()))
  for name, want in one_device["grads"].items():
    got = arrays[f"{mesh}|grads|{name}"]
    assert got.shape == want.shape, name
    # Relative to the whole gradient: summation order differs across devices.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * grad_norm, err_msg=name)
  for name, want in one_device["params"].items():
    np.testing.assert_allclose(arrays[f"{mesh}|params|{name}"], want, rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_params_and_grads_are_sharded_as_the_rules_say(eight_devices):
  summary, _, _ = eight_devices
  layout = summary["data2_fsdp2_tensor2"]["init_layout"]
  # (spec, one device's shard) with layers=2, embed=32, mlp=64, heads=4, kv_heads=2, head_dim=8.
  assert layout["layers/mlp/gate/kernel"] == ["P(None, 'fsdp', 'tensor')", [2, 16, 32]]
  assert layout["layers/mlp/down/kernel"] == ["P(None, 'tensor', 'fsdp')", [2, 32, 16]]
  assert layout["layers/attn/query/kernel"] == ["P(None, 'fsdp', 'tensor', None)", [2, 16, 2, 8]]
  assert layout["layers/attn/key/kernel"] == ["P(None, 'fsdp', 'tensor', None)", [2, 16, 1, 8]]
  assert layout["layers/attn/out/kernel"] == ["P(None, 'tensor', None, 'fsdp')", [2, 2, 8, 16]]
  assert layout["layers/attn_norm/scale"] == ["P(None, 'fsdp')", [2, 16]]
  # The byte vocab (259) does not split over tensor=2: that dim is replicated, embed still fsdp.
  assert layout["embedding"] == ["P(None, 'fsdp')", [259, 16]]

  layout = summary["fsdp4_tensor2"]["init_layout"]
  assert layout["layers/mlp/gate/kernel"] == ["P(None, 'fsdp', 'tensor')", [2, 8, 32]]
  assert layout["embedding"] == ["P(None, 'fsdp')", [259, 8]]
  for mesh in sharding_worker.MESHES:  # gradients come out laid out like their params
    result = summary[mesh]
    assert result["grad_layout"] == {k: v[0] for k, v in result["init_layout"].items()}


def test_configs_that_do_not_fit_8_devices_are_refused_by_name(eight_devices):
  summary, _, workdir = eight_devices
  refusals = summary["refusals"]
  assert refusals["mesh_3"] == ("mesh (data=3, fsdp=1, tensor=1, expert=1) needs 3 devices, "
                                "but there are 8")
  assert "needs 16 devices, but there are 8" in refusals["mesh_16"]
  assert refusals["batch_12_on_8"].startswith(
      "train.batch_size=12 cannot be split over the data axes "
      "(data x fsdp x expert = 8 ways)")
  assert refusals["micro_batch_4_on_8"].startswith(
      "the micro-batch of train.batch_size=8 / train.grad_accum=2 = 4 rows cannot be split "
      "over the data axes (data x fsdp x expert = 8 ways)")
  assert refusals["experts_6_on_expert4"] == (
      "model.moe.num_experts=6 cannot be split over the expert axis (expert = 4 ways): "
      "choose a multiple of it")
  # The refused runs left the workdir they were pointed at as it was.
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]
  with open(workdir / "metrics.jsonl") as f:
    assert f.read() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.parametrize("sizes, devices, message", [
    (dict(data=-1, fsdp=3), 8, "8 is not divisible by 3"),
    (dict(data=-1, fsdp=-1), 8, "at most one -1"),
    (dict(data=0), 8, "sizes must be positive"),
    (dict(data=2, fsdp=2, tensor=2), 4, "needs 8 devices, but there are 4"),
])
def test_mesh_shape_names_what_does_not_fit(sizes, devices, message):
  mesh_config = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **sizes}
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh_config, devices)


@pytest.mark.parametrize("num_experts, expert_axis, message", [
    (6, 4, "model.moe.num_experts=6 cannot be split over the expert axis (expert = 4 ways): "
           "choose a multiple of it"),
    (2, 4, "the expert axis (expert = 4 ways) is larger than model.moe.num_experts=2: each "
           "device along it must hold at least one expert"),
    (0, 2, "the expert axis (expert = 2 ways) is larger than model.moe.num_experts=0"),
])
def test_experts_the_expert_axis_cannot_split_are_refused_in_one_line(num_experts, expert_axis,
                                                                      message, tiny_config):
  """(The CLI's refusal, nothing written: test_configs_that_do_not_fit_8_devices_...)"""
  mesh = AbstractMesh((8 // expert_axis, 1, 1, expert_axis), sharding.MESH_AXES)
  rules = sharding.rules_from_config(tiny_config())
  with pytest.raises(ValueError, match=re.escape(message)) as raised:
    sharding.check_expert_axis(num_experts, mesh, rules)
  assert "\n" not in str(raised.value)
  sharding.check_expert_axis(2 * expert_axis, mesh, rules)  # a multiple: accepted


def test_mesh_shape_fills_the_one_free_axis():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2, "expert": 1}, 8) == (2, 2, 2, 1)
  assert sharding.mesh_shape({"data": 1, "fsdp": 4, "tensor": -1, "expert": 1}, 8) == (1, 4, 2, 1)


def test_pallas_attention_under_a_mesh_runs_per_shard_without_extra_all_gathers(eight_devices):
  """The kernel inside shard_map: the compiled step gathers no more than the XLA attention's
  (outside shard_map XLA would gather q, k, v whole onto every device)."""
  summary, _, _ = eight_devices
  pallas = summary["data2_fsdp2_tensor2_pallas"]["all_gathers"]
  xla = summary["xla_yardstick_all_gathers"]
  assert 0 < pallas <= xla, (pallas, xla)


def test_packed_ternary_model_under_a_mesh_computes_what_one_device_computes(eight_devices,
                                                                             one_device):
  """2-bit projections through the ternary matmul inside shard_map (rows over the batch axes,
  output features over their mesh axis) on data=2, fsdp=2, tensor=2."""
  _, arrays, _ = eight_devices
  np.testing.assert_allclose(arrays["packed_logits"], one_device["packed_logits"], atol=1e-5)


def test_moe_experts_are_sharded_over_expert_and_tokens_reach_them_by_all_to_all(eight_devices):
  """Mesh data=4 x expert=2, capacity path: each device holds 2 of the 4 experts; the compiled
  step moves the dispatched tokens to their experts' devices and back with all-to-alls (forward
  and backward) and gathers no expert weights. (Losses, gradients and params equal one
  device's: test_losses_gradients_and_params_match_one_device[data4_expert2_moe].)"""
  summary, _, _ = eight_devices
  result = summary["data4_expert2_moe"]
  # [layers, expert, embed, mlp]: the experts split over `expert`.
  assert result["init_layout"]["layers/mlp/gate/kernel"] == [
      "P(None, 'expert', 'fsdp', 'tensor')", [2, 2, 32, 64]]
  assert result["init_layout"]["layers/mlp/down/kernel"] == [
      "P(None, 'expert', 'tensor', 'fsdp')", [2, 2, 64, 32]]
  assert result["all_to_alls"] >= 4, result["all_to_alls"]
  expert_weights = {"4,32,64", "4,64,32"}
  assert not [s for s in result["all_gather_shapes"] if s.split(",", 1)[-1] in expert_weights
              or s in expert_weights], result["all_gather_shapes"]


def test_moe_drops_the_same_tokens_sharded(eight_devices, one_device):
  summary, _, _ = eight_devices
  dropped = summary["data4_expert2_moe"]["dropped_tokens"]
  assert dropped == one_device["moe"]["dropped_tokens"]
  assert all(d > 0 for d in dropped)  # capacity 16 of 32 a row: the case drops copies


@pytest.mark.parametrize("mesh", ["data2_expert4_moe_dropless", "fsdp2_expert4_moe_dropless"])
def test_dropless_moe_sends_tokens_to_their_experts_and_gathers_no_expert(mesh, eight_devices):
  """Dropless top-2 with the 4 experts split over expert=4 (one a device), beside data=2 or
  fsdp=2: the compiled step exchanges token copies with all-to-alls (forward: copies, their
  expert ids and outputs; backward the copies and outputs again) and never gathers the experts
  (FSDP gathers one device's expert over fsdp, [1, 32, 64], as it gathers every weight).
  Beside data=2 it gathers nothing at all: not the rows' router probabilities either (top_k runs
  per device). (Losses, gradients and params equal one device's:
  test_losses_gradients_and_params_match_one_device.)"""
  summary, _, _ = eight_devices
  result = summary[mesh]
  assert result["init_layout"]["layers/mlp/gate/kernel"][1][1] == 1  # [layers, 1 expert, ...]
  assert result["all_to_alls"] >= 5, result["all_to_alls"]
  assert result["collective_bytes"]["all-to-all"] > 0
  experts = re.compile(r"(\d+,)?4,(32,64|64,32)$")  # [layers,] 4 experts, embed x mlp or back
  assert not [s for s in result["all_gather_shapes"] if experts.match(s)], (
      result["all_gather_shapes"])
  if mesh.startswith("data2"):
    assert result["all_gather_shapes"] == []


def test_dropless_moe_layer_with_expert_parallelism_computes_one_devices_output_and_gradients(
    eight_devices, one_device):
  """One dropless MoE layer on data=2 x expert=4 (copies exchanged with their experts'
  devices), every token routed to the first two devices' experts (the exchange's worst case):
  its output (through a fixed probe) and the gradients of the params and the input equal one
  device's."""
  _, arrays, _ = eight_devices
  want = one_device["dropless_moe"]
  assert set(want) == {"loss", "x", "router/kernel", "gate/kernel", "up/kernel", "down/kernel"}
  for name, value in want.items():
    np.testing.assert_allclose(arrays[f"dropless_moe|{name}"], value, rtol=1e-4,
                               atol=1e-5 * np.abs(value).max(), err_msg=name)

"""`convert.from_hf` under meshes of 8 devices, for tests/test_convert.py.

Run as a subprocess on 8 fake CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/convert_worker.py HF_DIR OUT.npz

Converts the checkpoint in HF_DIR under each mesh of `MESHES`, scanned and looped, and saves
each param gathered (`<mesh>|<layout>|<path>`), with its PartitionSpec and the shape of the
slice each device holds (`summary`, json). The test compares them with the one-device
conversion and with the layout training gives the params.
"""
import json
import sys

import jax
import numpy as np

from llm_research import convert, sharding

MESHES = {
    "fsdp2_tensor2_expert2": dict(data=1, fsdp=2, tensor=2, expert=2),
    "fsdp8": dict(data=1, fsdp=8, tensor=1, expert=1),
}
LAYOUTS = {"scanned": True, "looped": False}


def leaves(params) -> dict:
  """{"a/b/c": leaf} of a params tree."""
  return {"/".join(key.key for key in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def main(hf_dir: str, out_path: str) -> None:
  summary, arrays = {}, {}
  for mesh_name, sizes in MESHES.items():
    mesh = sharding.make_mesh(sizes)
    for layout, scan_layers in LAYOUTS.items():
      _, params = convert.from_hf(hf_dir, scan_layers=scan_layers, mesh=mesh)
      for path, leaf in leaves(params).items():
        name = f"{mesh_name}|{layout}|{path}"
        summary[name] = dict(spec=[list(a) if isinstance(a, tuple) else a
                                   for a in leaf.sharding.spec],
                             devices=sorted(d.id for d in leaf.sharding.device_set),
                             slice=[list(s.data.shape) for s in leaf.addressable_shards])
        arrays[name] = np.asarray(leaf)
  np.savez(out_path, summary=json.dumps(summary), **arrays)


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  main(*sys.argv[1:])

"""experiments/benchmarks/step_profile.py reading a GPU trace, before any GPU has made one.

A hand-made XSpace shaped like a GPU profile (kernels on two overlapping streams, a derived "XLA
Ops" line that must not count twice, one kernel known by its `hlo_op` stat, one only by its
kernel name, a memcpy with no instruction) over the HLO of a real compiled module: a matmul, an
RMS normalisation (llm_research/models/norms.py) and a tanh. The split of busy time is worked
out by hand below.
"""
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest

from llm_research.models import norms

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "experiments" / "benchmarks"))
import step_profile  # noqa: E402  (experiments/benchmarks/step_profile.py)

MS = 10**9  # picoseconds


def _module_text():
  """A compiled module whose entry holds a matmul fusion, normalisation fusions and a fusion
  of the final multiply with tanh (XLA:CPU names them; found by what they compute)."""
  def f(x, w):
    return jnp.tanh(norms.rms_normalize(jnp.dot(x, w)))
  x, w = jnp.ones((64, 128), jnp.float32), jnp.ones((128, 256), jnp.float32)
  return jax.jit(f).lower(x, w).compile().as_text()


def _entry_fusion(text, op):
  """The name of the entry computation's fusion made for the jax op `op` (its op_name)."""
  entry = text[text.index("\nENTRY"):]
  names = re.findall(r'^\s+(?:ROOT )?%?(\S+) = \S+ fusion\(.*op_name="[^"]*/' + op + '"',
                     entry, re.M)
  assert len(names) == 1, (op, entry)
  return names[0]


def test_gpu_trace_is_split_by_category_and_overlap():
  text = _module_text()
  module = re.match(r"HloModule (\S+?),", text).group(1)
  matmul = _entry_fusion(text, "dot_general")
  norm = _entry_fusion(text, "rsqrt")
  # Kernels, on two streams (ms): matmul 0-4 and norm 2-6 overlap; the tanh fusion's kernel
  # 5-6 (named like XLA names a fusion's kernel, `.` as `_`, no hlo_op stat) overlaps the norm;
  # a memcpy 9-10. By hand: matmul 2 + 1, norm 1 + 1 + 0.5, tanh 0.5, memcpy 1: busy 7 of the
  # 10 ms step, host 3.
  tanh_kernel = _entry_fusion(text, "tanh").replace(".", "_")
  xspace = f'''
  planes {{
    id: 1 name: "/device:GPU:0"
    lines {{ id: 1 name: "Stream #13(Compute)" timestamp_ns: 0
      events {{ metadata_id: 1 offset_ps: 0 duration_ps: {4 * MS}
               stats {{ metadata_id: 1 str_value: "{matmul}" }}
               stats {{ metadata_id: 2 str_value: "{module}" }} }}
      events {{ metadata_id: 2 offset_ps: {5 * MS} duration_ps: {1 * MS} }}
      events {{ metadata_id: 3 offset_ps: {9 * MS} duration_ps: {1 * MS} }} }}
    lines {{ id: 2 name: "Stream #14(Compute)" timestamp_ns: 0
      events {{ metadata_id: 4 offset_ps: {2 * MS} duration_ps: {4 * MS}
               stats {{ metadata_id: 1 ref_value: 10 }} }} }}
    lines {{ id: 3 name: "XLA Ops" timestamp_ns: 0
      events {{ metadata_id: 1 offset_ps: 0 duration_ps: {10 * MS} }} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "sm90_xmma_gemm_f32f32_f32f32" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "{tanh_kernel}" }} }}
    event_metadata {{ key: 3 value {{ id: 3 name: "MemcpyD2H" }} }}
    event_metadata {{ key: 4 value {{ id: 4 name: "norm_kernel" }} }}
    stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_op" }} }}
    stat_metadata {{ key: 2 value {{ id: 2 name: "hlo_module" }} }}
    stat_metadata {{ key: 10 value {{ id: 10 name: "{norm}" }} }}
  }}'''
  profile = jax.profiler.ProfileData.from_text_proto(xspace)
  lines = step_profile.breakdown(profile, text, steps=1, traced_step_s=0.010)
  assert lines[0].startswith("Read from: device kernels on 2 lines")
  table = {row[0]: float(row[1]) for row in
           (line.strip("|").split("|") for line in lines if line.startswith("| "))
           for row in [[cell.strip() for cell in row]] if re.fullmatch(r"[\d.]+", row[1])}
  expected = {"matmul": 3.0, "norm": 2.5, "elementwise": 0.5, "other": 1.0, "device busy": 7.0,
              "host (traced step minus device busy)": 3.0, "traced step": 10.0}
  assert {k: table[k] for k in expected} == pytest.approx(expected)

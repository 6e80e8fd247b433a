"""Run records: metrics.jsonl, TensorBoard events, the peak FLOP/s behind MFU (the model config
counts its FLOPs: `flops_per_token`), and the timer the benchmarks share."""
import json
import math
import os
import statistics
import time

import jax
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per device (vendor datasheets: the with-sparsity figures halved), by
# `jax.devices()[0].device_kind`. GPUs report the CUDA device name ("NVIDIA H100 80GB HBM3" is
# the SXM card; "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", ... all peak at 312); TPUs
# report "TPU v4", "TPU v4 lite" (v4i), "TPU v5 lite" (v5e), "TPU v5" (v5p), "TPU v6 lite" (v6e).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12, "TPU v4 lite": 138e12,
    "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5": 459e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """The configured peak, else the table's for this device kind, else None (e.g. CPU).

  The most specific entry wins: the kind itself, else the longest entry the kind starts with
  followed by a space or '-' (so "NVIDIA H100 PCIe" is not an H100 SXM, nor "TPU v5 lite" a v5p).
  """
  if override:
    return override
  kind = jax.devices()[0].device_kind
  matches = [k for k in PEAK_FLOPS
             if kind == k or (kind.startswith(k) and kind[len(k)] in " -")]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

  Only process 0 writes. `truncate_after(step)` drops records past a restored checkpoint, so a
  resumed run's file reads as one uninterrupted trajectory.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.enabled else None

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  value = float(value) if hasattr(value, "dtype") or isinstance(value, float) else value
  return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` calls, each waited for on the device, after one
  warm-up call that absorbs compilation."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)

"""Run records: metrics.jsonl, TensorBoard events, the FLOP count behind MFU, and the timer
the benchmarks share."""
import json
import math
import os
import statistics
import time

import jax
from tensorboardX import SummaryWriter

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor datasheets).
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  """The configured peak, else the table's for this device kind, else None (e.g. CPU)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def training_flops_per_token(model_config, seq_len: int) -> float:
  """6 N for the matmul weights (embedding lookup excluded, output head included) plus
  attention: QK^T and PV are 4 * seq_len * heads * head_dim FLOPs per token per layer forward,
  halved for the causal mask, times 3 for forward + backward."""
  cfg = model_config
  matmul_params = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.embed_dim
  attention = 4 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers / 2
  return 6 * matmul_params + 3 * attention


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

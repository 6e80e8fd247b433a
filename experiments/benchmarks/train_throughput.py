"""Training throughput: step time, tokens/s and MFU of a config's train step; or a sweep of them.

One point, measured in this process:

    python experiments/benchmarks/train_throughput.py --config experiments/quickstart.py \
        [--preset 125m|350m] [--config.train.batch_size=8 ...] [--steps 10] [--peer_size N] \
        [--compile_depths 4,8,16,32] [--out table.md]

A sweep over attention_impl x remat policy x batch size (any axis may be one value), each point
in its own process so that one running out of memory, failing or hanging costs only its cell
("OOM", "error: ...", "timeout"); rows are appended to `--out` as they finish, so a session cut
off keeps what it measured. Points run attention-major, in the order given: put the one that
matters most first. `--point_timeout` bounds each point (compile included); `--budget_s` bounds
the whole sweep (a point starts only while budget is left, and gets at most what is left).
`--profile` then runs step_profile.py on the point with the most tokens/s and appends its tables
(its trace and HLO go to `<out stem>_trace/`); the points leave it the budget's last 60 s:

    python experiments/benchmarks/train_throughput.py ... --attention cudnn,pallas \
        --remat dots,none --batch_sizes 16 [--point_timeout 150] [--budget_s 240] [--profile] \
        --out sweep.md

The 350m preset on one H100/H200 (bfloat16, 16 x 2048 tokens: 77.0 TFLOP a step, so 45% MFU
of 989 TFLOP/s is a 173 ms step), sweep and profile in ~4 minutes:

    export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
    python experiments/benchmarks/train_throughput.py --config experiments/quickstart.py \
        --preset 350m --config.model.dtype=bfloat16 --config.data.seq_len=2048 --steps 5 \
        --attention cudnn,pallas --remat dots --batch_sizes 16,32 --point_timeout 150 \
        --budget_s 240 --profile --out $OUT/train_throughput_350m.md

Why these points: each costs a process start, a compile (tens of seconds: most of the budget)
and seven steps, so about four fit beside the profile. An earlier H200 run (pallas, batch 16:
remat dots 32.6% MFU, none 31.0%) found remat moving little, and attention, 12.9% of the model
FLOPs, runs in a kernel of unknown speed: the attention kernel is the open lever, so cudnn comes
first and pallas repeats that run as the anchor. `none` is left out: slower there, and twice the
memory of `dots` (XLA's CPU buffer assignment for this step: 101 GiB of temporaries at batch 16
against 46 GiB for `dots`, 18 GiB for `full`; a GPU's differ somewhat), which is more than an
H100 has. Batch 32 with `dots` (91 GiB on the same estimate) fits only an H200, and reports OOM
on an H100; it shows what amortising the per-step costs (optimizer, launch gaps) buys, which
the profile also measures. `full` recomputes the forward (+1/3 matmul FLOPs): unlikely to win.
The compilation cache lets the profile reuse its point's compile and later points reuse
autotuning; the memory fraction lets a point use the card's memory rather than the default 75%.

Each point times the jitted, sharded train step on synthetic tokens (the data pipeline is
measured by its own tests): the median of `--steps` steps after a warm-up step. FLOPs per token
are the model config's (6 x matmul params + attention; README "MFU"). MFU is against the
datasheet's dense bf16 peak for the device kind (989 TFLOP/s for an H100 SXM or H200; none on
CPU, or `--config.train.peak_flops_per_device`); `of matmul` is against the peer measured in
the same run, a `--peer_size`^3 bfloat16 matmul (8192 on an accelerator, 1024 on CPU by
default). `--compile_depths` compiles the step at several depths with and without scan over
layers: scanned compile time should stay flat.
"""
import argparse
import datetime
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_research import config as config_lib
from llm_research.metrics import median_seconds, peak_flops_per_device
from llm_research.models.attention import ATTENTION_IMPLS
from llm_research.models.stack import REMAT_POLICIES
from llm_research.training import Trainer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import commit  # noqa: E402 (experiments/report.py)

# LLaMA-shaped sizes (SwiGLU mlp ~ 8/3 embed, vocab 32k).
PRESETS = {
    "125m": dict(num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12, head_dim=64,
                 mlp_dim=2048),
    "350m": dict(num_layers=24, embed_dim=1024, num_heads=16, num_kv_heads=16, head_dim=64,
                 mlp_dim=2816),
}
PEER_DTYPE = jnp.bfloat16
QUEUED_MATMULS = 10  # per timing: the host's launch and wait stay out of the peer's number
TABLE_HEADER = ["attention", "remat", "batch", "step (ms)", "tokens/s", "model TFLOP/s", "MFU",
                "of matmul", "peak GiB", "compile + first step (s)"]
OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory")
PROFILE_RESERVE_S = 60  # of --budget_s, kept back for --profile: its compile is a cache hit


class VocabSize:
  """Stands in for a tokenizer: only the vocab size matters for throughput."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size


def synthetic_batch(config, seed=0):
  rows, length = config.train.batch_size // jax.process_count(), config.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 255, (rows, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}


def add_config_args(parser):
  """The arguments that say which train step to build (shared with step_profile.py)."""
  parser.add_argument("--config", default="experiments/quickstart.py")
  parser.add_argument("--preset", choices=sorted(PRESETS))
  parser.add_argument("--vocab_size", type=int, default=32000)


def config_overrides(parser, args, rest) -> list[str]:
  """The preset's model keys, then the `--config.<key>=<value>` arguments (later ones win)."""
  overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
  if len(overrides) != len(rest):
    parser.error(f"unrecognized arguments: {[a for a in rest if not a.startswith('--config.')]}")
  preset = [f"model.{k}={v}" for k, v in PRESETS[args.preset].items()] if args.preset else []
  return preset + overrides


def matmul_flops_per_s(size: int) -> float:
  """The peer: a `size`^3 bfloat16 matmul's FLOP/s on this device (a 4096^3 one reads low and
  noisy on an H100/H200; 8192^3 runs near the card's best)."""
  a = jax.random.normal(jax.random.key(1), (size, size), PEER_DTYPE)
  b = jax.random.normal(jax.random.key(2), (size, size), PEER_DTYPE)
  matmul = jax.jit(jnp.dot)

  def queued():
    for _ in range(QUEUED_MATMULS):
      out = matmul(a, b)
    return out
  return QUEUED_MATMULS * 2 * size**3 / median_seconds(queued, 5)


def peak_memory_bytes() -> int | None:
  """The allocator's high-water mark on device 0 (None where the backend keeps none: CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure_step(config, vocab_size: int, steps: int) -> dict:
  trainer = Trainer(config, VocabSize(vocab_size))
  state = trainer.init_state()
  batch = synthetic_batch(config)
  start = time.perf_counter()
  state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start

  def one_step():
    nonlocal state
    state, m = trainer.step(state, batch)
    return m
  seconds = median_seconds(one_step, steps)
  tokens = config.train.batch_size * config.data.seq_len
  flops = trainer.model_config.flops_per_token(config.data.seq_len) * tokens
  return dict(params=trainer.model_config.num_params(), step_s=seconds,
              tokens_per_s=tokens / seconds, flops_per_s=flops / seconds,
              compile_and_first_step_s=first, peak_bytes=peak_memory_bytes())


def compile_seconds(config, vocab_size: int, depth: int, scan: bool) -> float:
  config = config_lib.with_overrides(config, [f"model.num_layers={depth}",
                                                f"model.scan_layers={scan}"])
  trainer = Trainer(config, VocabSize(vocab_size))
  abstract = trainer.abstract_state()
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), synthetic_batch(config))
  start = time.perf_counter()
  trainer.lower_step(abstract, batch).compile()
  return time.perf_counter() - start


def device_info(config, peer_size: int) -> dict:
  """This process's device, the datasheet peak and the peer matmul's FLOP/s (all devices)."""
  device = jax.devices()[0]
  size = peer_size or (1024 if device.platform == "cpu" else 8192)
  peak_source = ("set by train.peak_flops_per_device" if config.train.peak_flops_per_device
                 else f"the dense bf16 datasheet peak of {device.device_kind}")
  return dict(device=f"{jax.device_count()} x {device.device_kind} ({device.platform})",
              peak_source=peak_source, jax=jax.__version__, peer_size=size,
              peer_flops_per_s=matmul_flops_per_s(size) * jax.device_count(),
              peak_flops_per_s=(peak_flops_per_device(config.train.peak_flops_per_device) or 0)
              * jax.device_count())


def header_lines(info: dict, command: str) -> list[str]:
  """The table's context: what ran where, and what MFU and `of matmul` divide by."""
  peak = (f"{info['peak_flops_per_s'] / 1e12:.0f} TFLOP/s, {info['peak_source']}"
          if info["peak_flops_per_s"] else "none known for this device")
  return [f"Command: `{command}`  ",
          f"Device: {info['device']}; jax {info['jax']}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"commit {commit()}  ",
          f"MFU: model FLOP/s over the peak ({peak}).  ",
          f"of matmul: over the peer measured in this run, the bfloat16 matmul of two "
          f"{info['peer_size']}^2 matrices at {info['peer_flops_per_s'] / 1e12:.3g} TFLOP/s.", ""]


def markdown_row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def table_start() -> list[str]:
  return [markdown_row(TABLE_HEADER), "|" + "---|" * len(TABLE_HEADER)]


def result_row(point: dict, result: dict, info: dict) -> list:
  """One table row: the point, then its measurements or, in the step cell, why there are none."""
  cells = [point["attention"], point["remat"], point["batch"]]
  if "step_s" not in result:
    return cells + [result["failure"]] + [""] * (len(TABLE_HEADER) - 4)
  flops = result["flops_per_s"]
  peak = info["peak_flops_per_s"]
  return cells + [
      f"{result['step_s'] * 1e3:.1f}", f"{result['tokens_per_s']:,.0f}", f"{flops / 1e12:.3g}",
      f"{flops / peak:.1%}" if peak else "n/a", f"{flops / info['peer_flops_per_s']:.1%}",
      f"{result['peak_bytes'] / 2**30:.1f}" if result["peak_bytes"] else "n/a",
      f"{result['compile_and_first_step_s']:.1f}"]


def run_child(argv: list[str], timeout: float) -> dict:
  """Runs this script (or step_profile.py) with `argv` in its own process group. Returns its
  last stdout line as JSON if it printed one and exited 0, else {"failure": why}; `stdout`
  holds what it printed. A point past `timeout` is killed with everything it started."""
  proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    return {"failure": f"timeout (> {timeout:.0f} s)", "stdout": stdout}
  if proc.returncode == 0:
    lines = stdout.strip().splitlines()
    try:
      return {**json.loads(lines[-1]), "stdout": stdout}
    except (IndexError, json.JSONDecodeError):
      return {"stdout": stdout}
  # Its traceback, for the person reading the log: the cell has room for one line only.
  print("\n".join(stderr.strip().splitlines()[-15:]), file=sys.stderr)
  if OOM.search(stderr):
    return {"failure": "OOM", "stdout": stdout}
  last = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
  return {"failure": f"error: {last[:160].replace('|', '/')}", "stdout": stdout}


def config_argv(args, rest: list[str]) -> list[str]:
  """The arguments that rebuild this train step in another process (add_config_args)."""
  preset = ["--preset", args.preset] if args.preset else []
  return ["--config", args.config, *preset, "--vocab_size", str(args.vocab_size), *rest]


def point_argv(point: dict) -> list[str]:
  return [f"--config.model.attention_impl={point['attention']}",
          f"--config.model.remat_policy={point['remat']}",
          f"--config.train.batch_size={point['batch']}"]


def sweep(args, base_argv: list[str], command: str, setting: str) -> None:
  """Runs each point in its own process, appending its row to `args.out` as it finishes."""
  deadline = time.monotonic() + (args.budget_s or float("inf"))
  reserve = PROFILE_RESERVE_S if args.profile else 0
  left = lambda reserved=0: min(args.point_timeout, deadline - reserved - time.monotonic())
  worker = [__file__, *base_argv, "--steps", str(args.steps), "--peer_size", str(args.peer_size)]
  info = run_child([*worker, "--worker", "peer"], left(reserve))
  if "failure" in info:
    sys.exit(f"the peer matmul failed ({info['failure']}): no device to sweep on")
  write_lines(args.out, [f"# Training throughput sweep: {args.preset or args.config}", "",
                         *header_lines(info, command), setting, "", *table_start()], "w")
  best = None  # (tokens/s, point)
  for point in [dict(attention=a, remat=r, batch=b) for a, r, b in
                itertools.product(args.attention, args.remat, args.batch_sizes)]:
    result = {"failure": "skipped: out of budget"}
    if left(reserve) > 0:
      result = run_child([*worker, *point_argv(point), "--worker", "point"], left(reserve))
    if "step_s" in result and (best is None or result["tokens_per_s"] > best[0]):
      best = (result["tokens_per_s"], point)
    write_lines(args.out, [markdown_row(result_row(point, result, info))])
  if args.profile:
    profile(args, base_argv, best and best[1], left())


def profile(args, base_argv: list[str], point: dict | None, timeout: float) -> None:
  """step_profile.py on `point` (the most tokens/s), its report appended to `args.out`."""
  if point is None or timeout <= 0:
    why = "no point was measured" if point is None else "out of budget"
    write_lines(args.out, ["", f"No step profile: {why}."])
    return
  save_dir = os.path.splitext(args.out)[0] + "_trace" if args.out else ""
  profiler = os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_profile.py")
  result = run_child([profiler, *base_argv, *point_argv(point), "--save", save_dir], timeout)
  if "failure" in result:
    write_lines(args.out, ["", f"Step profile of the best point: {result['failure']}."])
    return
  # Its headings one level down, under the sweep's.
  write_lines(args.out, [""] + ["#" + line if line.startswith("#") else line
                                for line in result["stdout"].strip().splitlines()])


def write_lines(path: str, lines: list[str], mode: str = "a") -> None:
  """Prints `lines` and writes them to `path` at once (flushed: a cut-off session keeps them)."""
  print("\n".join(lines), flush=True)
  if path:
    with open(path, mode) as f:
      f.write("\n".join(lines) + "\n")


def split_list(text: str, allowed=None, kind=str) -> list:
  values = [kind(v) for v in text.split(",") if v]
  unknown = [v for v in values if allowed is not None and v not in allowed]
  if unknown:
    raise argparse.ArgumentTypeError(f"{unknown} not in {sorted(allowed)}")
  return values


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_args(parser)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--peer_size", type=int, default=0,
                      help="the peer matmul's size (0: 8192, or 1024 on CPU)")
  parser.add_argument("--compile_depths", default="", help="e.g. 4,8,16,32")
  parser.add_argument("--out", default="", help="also write the table (markdown) here")
  sweep_axes = parser.add_argument_group("sweep: --attention, --remat or --batch_sizes makes one")
  sweep_axes.add_argument("--attention", help="attention_impl values, e.g. cudnn,pallas",
                          type=lambda t: split_list(t, ("auto", *ATTENTION_IMPLS)))
  sweep_axes.add_argument("--remat", type=lambda t: split_list(t, REMAT_POLICIES),
                          help=f"remat policies, of {','.join(REMAT_POLICIES)}")
  sweep_axes.add_argument("--batch_sizes", type=lambda t: split_list(t, kind=int),
                          help="global batch sizes, e.g. 16,32")
  sweep_axes.add_argument("--point_timeout", type=float, default=300, help="seconds per point")
  sweep_axes.add_argument("--budget_s", type=float, default=0, help="seconds for all (0: none)")
  sweep_axes.add_argument("--profile", action="store_true",
                          help="then profile the point with the most tokens/s")
  parser.add_argument("--worker", choices=["point", "peer"], help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args()
  overrides = config_overrides(parser, args, rest)
  command = " ".join(["python", *sys.argv])

  config = config_lib.load_config(args.config, overrides)
  setting = (f"Rows of {config.data.seq_len} tokens, dtype {config.model.dtype}, mesh "
             f"{config.mesh.to_dict()}.")
  if args.attention or args.remat or args.batch_sizes:
    # Unset axes keep the config's value. This process never touches the device, so that each
    # point gets the whole of it.
    args.attention = args.attention or [config.model.attention_impl]
    args.remat = args.remat or [config.model.remat_policy]
    args.batch_sizes = args.batch_sizes or [config.train.batch_size]
    sweep(args, config_argv(args, rest), command, setting)
    return
  if args.worker == "peer":
    print(json.dumps(device_info(config, args.peer_size)))
    return
  if args.worker == "point":
    print(json.dumps(measure_step(config, args.vocab_size, args.steps)))
    return
  info = device_info(config, args.peer_size)  # first: the peer's memory is free again after
  result = measure_step(config, args.vocab_size, args.steps)
  point = dict(attention=config.model.attention_impl, remat=config.model.remat_policy,
               batch=config.train.batch_size)
  write_lines(args.out, [
      f"# Training throughput: {args.preset or args.config}", "", *header_lines(info, command),
      f"{setting} Model {result['params'] / 1e6:.1f}M params.", "", *table_start(),
      markdown_row(result_row(point, result, info))], "w")

  if args.compile_depths:
    print("\ncompile time of the train step (s)\n| layers | scan | loop |\n|---|---|---|")
    for depth in [int(d) for d in args.compile_depths.split(",")]:
      scanned = compile_seconds(config, args.vocab_size, depth, True)
      looped = compile_seconds(config, args.vocab_size, depth, False)
      print(f"| {depth} | {scanned:.1f} | {looped:.1f} |", flush=True)


if __name__ == "__main__":
  main()

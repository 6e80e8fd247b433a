"""Where a training step's time goes: a jax.profiler trace of a few steps, read into a table.

    python experiments/benchmarks/step_profile.py --config experiments/quickstart.py \
        [--preset 350m] [--config.<key>=<value> ...] [--steps 3] [--save DIR] [--out FILE.md]
    python experiments/benchmarks/step_profile.py --parse DIR   # a saved trace, read again

Builds the train step as train_throughput.py does (synthetic tokens), runs two warm-up steps,
times `--steps` steps, then traces `--steps` more; both dispatch the steps back to back, as the
training loop does, and wait once at the end (train_throughput.py waits on every step instead).
The trace is read with `jax.profiler.ProfileData`:

  device time: the kernels on the device plane's stream lines ("/device:GPU:0", "Stream #..."),
    each mapped to the HLO instruction it ran (its `hlo_op` stat, else its kernel name);
  CPU fallback (no device plane): the XLA CPU runtime's per-instruction events on the host
    threads ("tf_XLA..." lines), control flow (while, call, conditional) left out since the
    instructions inside it have events of their own.

Instructions overlap (two CPU threads, several streams), so every instant of busy time is split
evenly among the events running in it: the categories add up to the busy time, and host time is
the traced step's wall time minus the busy time (dispatch, launch gaps, the host's part of the
scan loop). Under the profiler XLA runs its CUDA graphs op by op, so the traced step can be a
little slower than the unprofiled one; both are shown.

Categories come from the compiled step's HLO (`compiled.as_text()`), first match winning:
`CATEGORIES` says how each is recognised. "Innermost frame" is the instruction's metadata
stack_frame_id, resolved through the module's FileNames/FunctionNames/FileLocations/StackFrames
tables to the innermost Python frame outside JAX (for a fusion, that of its root instruction).
A kernel that maps to no instruction (memcpy, a library's helper) is classified by its name.
The 20 instructions that take longest are listed with their opcode, fusion kind or custom-call
target, name stack and frame, so a reader can check the classification.

On an H100/H200 the 350m preset's best sweep point is profiled by `train_throughput.py
--profile` (its docstring has the command), with `--save` to `<out stem>_trace/`, so that a CPU
machine can read the trace again (`--parse`) after the GPU is gone. By hand (an estimated 30 s
with the compilation cache warm, a compile more without):

    python experiments/benchmarks/step_profile.py --config experiments/quickstart.py \
        --preset 350m --config.model.dtype=bfloat16 --config.data.seq_len=2048 \
        --config.train.batch_size=16 --config.model.attention_impl=cudnn \
        --config.model.remat_policy=dots --save $OUT/step_trace --out $OUT/step_profile.md
"""
import argparse
import collections
import dataclasses
import datetime
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax

from llm_research import config as config_lib
from llm_research.training import Trainer
from train_throughput import (VocabSize, add_config_args, commit, config_overrides,
                              synthetic_batch, write_lines)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "send", "recv")
CONTROL_FLOW = ("while", "conditional", "call")
STRUCTURAL = {"parameter", "constant", "tuple", "get-tuple-element"}
DATA_MOVEMENT = ("copy", "transpose", "dynamic-slice", "dynamic-update-slice", "slice",
                 "concatenate", "pad", "gather", "scatter", "broadcast", "reshape", "bitcast")
ATTENTION_FUNCTIONS = ("xla_attention", "pallas_attention", "cudnn_attention",
                       "segment_lengths_and_offsets")
# (category, how it is recognised), in the order the rules are tried.
CATEGORIES = (
    ("collective", "opcode all-reduce, all-gather, ... (async -start/-done too), NCCL kernels"),
    ("attention", "cuDNN fmha custom calls; innermost frame in kernels/flash_attention*.py (the "
     "Pallas kernels, the XLA path's QK^T, softmax and PV) or in models/attention.py's "
     f"{', '.join(ATTENTION_FUNCTIONS)}"),
    ("matmul", "dot or convolution, or a fusion holding one (cuBLAS, Triton, cuDNN GEMMs)"),
    ("norm", "innermost frame in models/norms.py"),
    ("loss", "innermost frame in training/objective.py's token_losses: log-softmax over the "
     "vocabulary"),
    ("optimizer", "innermost frame in optax or training/objective.py's train_step: the gradient "
     "scaling, clipping, AdamW and the update"),
    ("data movement", f"{', '.join(DATA_MOVEMENT)}, or a fusion of nothing else: the scan's "
     "per-layer slices and saved activations, layout changes"),
    ("elementwise", "every other fusion or op: rotary, SwiGLU gating, residual adds, casts"),
    ("other", "kernels no instruction accounts for: memcpy, memset, other programs"),
)
KERNEL_NAME_CATEGORIES = (("attention", r"fmha|flash|sdpa"),
                          ("matmul", r"gemm|xmma|nvjet|cutlass|matmul"),
                          ("collective", r"nccl"))


@dataclasses.dataclass
class HloOp:
  """One instruction of the compiled module, with what the categories are decided by."""
  name: str
  opcode: str
  kind: str  # a fusion's kind or a custom call's target ("" for neither)
  op_name: str  # JAX's name stack
  frame: tuple[str, str]  # the innermost Python frame outside JAX: (file, function)
  calls: tuple[str, ...]  # the computations a fusion runs
  computation: str
  scalar: bool  # a one-element result: index arithmetic inside a fusion, not its work


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?(\S+) = (.*?) ([a-z][a-z0-9-]*)\(")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def _attribute(pattern: str, line: str) -> str:
  match = re.search(pattern, line)
  return match.group(1) if match else ""


def _frame_tables(lines: list[str]) -> dict[str, dict[int, str]]:
  """The module's FileNames, FunctionNames, FileLocations and StackFrames tables: id -> text."""
  tables, current = {}, None
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and (row := _TABLE_ROW.match(line)):
      current[int(row.group(1))] = row.group(2).strip('"')
    elif current is not None:
      current = None
  return tables


def _innermost_frame(tables, frame_id: str) -> tuple[str, str]:
  try:
    frame = tables["StackFrames"][int(frame_id)]
    location = tables["FileLocations"][int(_attribute(r"file_location_id=(\d+)", frame))]
    file_id = int(_attribute(r"file_name_id=(\d+)", location))
    function_id = int(_attribute(r"function_name_id=(\d+)", location))
    return tables["FileNames"][file_id], tables["FunctionNames"][function_id]
  except (KeyError, IndexError, ValueError):  # no tables, or a form this parser does not know
    return "", ""


def parse_hlo(text: str) -> tuple[str, dict[str, HloOp]]:
  """(module name, instruction name -> HloOp) of an HLO module's text. Instruction names are
  unique in a module."""
  lines = text.splitlines()
  tables = _frame_tables(lines)
  module = _attribute(r"^HloModule (\S+?),? ", lines[0] + " ")
  ops, computation = {}, ""
  for line in lines:
    if (header := _COMPUTATION.match(line)) and not line.startswith(" "):
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    frame_id = _attribute(r"stack_frame_id=(\d+)", line)
    frame = (_innermost_frame(tables, frame_id) if frame_id else
             (_attribute(r'source_file="([^"]*)"', line), ""))
    ops[name] = HloOp(
        name=name, opcode=opcode, op_name=_attribute(r'op_name="((?:[^"\\]|\\.)*)"', line),
        kind=_attribute(r'custom_call_target="([^"]*)"', line)
        or _attribute(r'"kind":"(__[^"]*)"', line) or _attribute(r"kind=(k\w+)", line),
        frame=frame, calls=tuple(re.findall(r"calls=%?([^\s,}]+)", line)),
        computation=computation, scalar=bool(re.fullmatch(r"\w+\[\]", shape)))
  return module, ops


class Classifier:
  """HLO instruction -> category (CATEGORIES), for one compiled module."""

  def __init__(self, hlo_text: str):
    self.module, self.ops = parse_hlo(hlo_text)
    self._by_computation = collections.defaultdict(list)
    for op in self.ops.values():
      self._by_computation[op.computation].append(op)
    self._opcodes = {}

  def opcodes(self, op: HloOp) -> set[str]:
    """The opcodes `op` runs: its own, and for a fusion every one inside it that makes more
    than a scalar."""
    return {op.opcode}.union(*(self._computation_opcodes(c) for c in op.calls))

  def _computation_opcodes(self, computation: str) -> set[str]:
    if computation not in self._opcodes:
      self._opcodes[computation] = set().union(
          *(self.opcodes(op) for op in self._by_computation[computation] if not op.scalar))
    return self._opcodes[computation]

  def category(self, op: HloOp) -> str:
    base = op.opcode.removesuffix("-start").removesuffix("-done")
    file, function = op.frame[0], op.frame[1].split(".")[0]  # "f.<locals>.<lambda>": f
    if base in COLLECTIVES or "nccl" in op.kind.lower():
      return "collective"
    if ("fmha" in op.kind.lower() or re.search(r"kernels/flash_attention\w*\.py$", file)
        or function in ATTENTION_FUNCTIONS):
      return "attention"
    opcodes = self.opcodes(op)
    if opcodes & {"dot", "convolution"} or re.search(r"gemm|matmul", op.kind, re.I):
      return "matmul"
    if file.endswith("models/norms.py"):
      return "norm"
    if function == "token_losses":
      return "loss"
    if "/optax/" in file or function == "train_step":
      return "optimizer"
    if opcodes - {"fusion"} <= set(DATA_MOVEMENT) | STRUCTURAL:
      return "data movement"
    return "elementwise"

  def describe(self, op: HloOp) -> str:
    """opcode[kind] · name stack (its tail) · file:function, for the top-ops table."""
    scope = "/".join(op.op_name.split("/")[-3:])
    file, function = op.frame
    where = f"{os.path.basename(file)}:{function}" if file else "no frame"
    kind = f"[{op.kind}]" if op.kind else ""
    return f"{op.opcode}{kind} · {scope} · {where}"


@dataclasses.dataclass
class Event:
  key: str  # the HLO instruction's name, else the kernel's
  start_ns: float
  end_ns: float
  kernel: str


def device_events(profile, module: str, ops: dict[str, HloOp]) -> tuple[str, list[Event]]:
  """(what was read, the events): the kernels on the device planes, keyed by the instruction of
  `module` they ran ("program <name>" for another module's)."""
  events, lines = [], []
  for plane in profile.planes:
    if not plane.name.startswith("/device:"):
      continue
    # GPU: one line per stream, plus lines derived from them ("XLA Ops", "XLA Modules"): only
    # the streams count. TPU (not checked here): the op line.
    plane_lines = [line for line in plane.lines if line.name.startswith("Stream")] or [
        line for line in plane.lines if line.name == "XLA Ops"]
    for line in plane_lines:
      lines.append(f"{plane.name} {line.name}")
      for event in line.events:
        stats = dict(event.stats)
        other_module = stats.get("hlo_module", module) != module
        key = (f"program {stats['hlo_module']}" if other_module else
               str(stats.get("hlo_op", "")) or kernel_name_key(event.name, ops))
        events.append(Event(key, event.start_ns, event.end_ns, event.name))
  if events:
    return f"device kernels on {len(lines)} lines ({'; '.join(lines[:4])})", events
  return "", []


def host_xla_events(profile, ops: dict[str, HloOp]) -> tuple[str, list[Event]]:
  """The CPU fallback: the instructions' events on the host's XLA threads."""
  events, threads = [], set()
  for plane in profile.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        op = ops.get(event.name)
        if op is not None and op.opcode not in CONTROL_FLOW:
          threads.add(line.name)
          events.append(Event(event.name, event.start_ns, event.end_ns, event.name))
  return (f"CPU fallback, no device plane: XLA CPU instruction events on {len(threads)} host "
          "threads", events)


def kernel_name_key(name: str, ops: dict[str, HloOp]) -> str:
  """XLA names a fusion's kernel after the instruction with '.' as '_' (loop_fusion_52 runs
  loop_fusion.52): the instruction, where the event carried no hlo_op stat."""
  if name in ops:
    return name
  dotted = re.sub(r"_(\d+)$", r".\1", name)
  return dotted if dotted in ops else name


def busy_shares(events: list[Event]) -> list[float]:
  """Each event's share of the busy time in ns: every instant is split evenly among the events
  live in it, so the shares add up to the union of the events' intervals."""
  boundaries = sorted([(e.start_ns, 1, i) for i, e in enumerate(events)]
                      + [(e.end_ns, -1, i) for i, e in enumerate(events)])
  shares, live, last = [0.0] * len(events), set(), 0
  for time_ns, change, index in boundaries:
    if live and time_ns > last:
      piece = (time_ns - last) / len(live)
      for j in live:
        shares[j] += piece
    last = time_ns
    (live.add if change > 0 else live.discard)(index)
  return shares


def breakdown(profile, hlo_text: str, steps: int, traced_step_s: float) -> list[str]:
  """The report: time by category, host time, and the top 20 instructions."""
  classifier = Classifier(hlo_text)
  source, events = device_events(profile, classifier.module, classifier.ops)
  if not events:
    source, events = host_xla_events(profile, classifier.ops)
  if not events:
    raise RuntimeError("the trace holds no device kernels and no XLA CPU instruction events")
  by_category = collections.Counter()
  by_key = collections.Counter()
  runs, kernels = collections.Counter(), {}
  for event, share in zip(events, busy_shares(events)):
    by_key[event.key] += share
    runs[event.key] += 1
    kernels.setdefault(event.key, event.kernel)
  category_of = {key: event_category(key, kernels[key], classifier) for key in by_key}
  for key, ns in by_key.items():
    by_category[category_of[key]] += ns

  step_ms = traced_step_s * 1e3
  ms = lambda ns: ns / 1e6 / steps
  busy_ms = ms(sum(by_key.values()))
  rows = ["| where | ms/step | % of traced step |", "|---|---|---|"]
  for name, _ in CATEGORIES:
    if by_category[name]:
      rows.append(f"| {name} | {ms(by_category[name]):.2f} | "
                  f"{ms(by_category[name]) / step_ms:.1%} |")
  rows.append(f"| device busy | {busy_ms:.2f} | {busy_ms / step_ms:.1%} |")
  host_ms = max(step_ms - busy_ms, 0.0)
  rows.append(f"| host (traced step minus device busy) | {host_ms:.2f} | "
              f"{host_ms / step_ms:.1%} |")
  rows.append(f"| traced step | {step_ms:.2f} | 100% |")

  top = ["| instruction (or kernel) | category | ms/step | runs/step | what |",
         "|---|---|---|---|---|"]
  for key, ns in by_key.most_common(20):
    op = classifier.ops.get(key)
    what = classifier.describe(op) if op else "no HLO instruction"
    if kernel_name_key(kernels[key], classifier.ops) != key:
      what += f" · kernel {kernels[key][:60]}"
    top.append(f"| {key} | {category_of[key]} | {ms(ns):.3f} | {runs[key] / steps:g} | "
               f"{what.replace('|', '/')} |")
  legend = [f"- {name}: {how}" for name, how in CATEGORIES]
  return [f"Read from: {source}.", "", *rows, "", "How each category is recognised (first match "
          "wins; from the compiled HLO):", "", *legend, "", "Top 20 instructions by time:", "",
          *top]


def event_category(key: str, kernel: str, classifier: Classifier) -> str:
  op = classifier.ops.get(key)
  if op is not None:
    return classifier.category(op)
  for name, pattern in KERNEL_NAME_CATEGORIES:
    if re.search(pattern, kernel, re.I):
      return name
  return "other"


def trace_steps(config, vocab_size: int, steps: int, trace_dir: str) -> dict:
  """Warms up, times `steps` steps, then traces `steps` more into `trace_dir`. Returns the
  seconds per step of both and the compiled step's HLO text."""
  trainer = Trainer(config, VocabSize(vocab_size))
  state = trainer.init_state()
  batch = synthetic_batch(config)

  def seconds_per_step(count: int) -> float:
    """`count` steps dispatched back to back, as the training loop does, waited for once."""
    nonlocal state
    start = time.perf_counter()
    for _ in range(count):
      state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / count

  for _ in range(2):  # the first compiles; the second runs with everything allocated
    seconds_per_step(1)
  step_s = seconds_per_step(steps)
  # The live state (not an abstract one, whose shardings differ) finds the cached executable.
  abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  hlo_text = trainer.lower_step(state, abstract_batch).compile().as_text()
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # Python frames would only slow the host down
  with jax.profiler.trace(trace_dir, profiler_options=options):
    traced_step_s = seconds_per_step(steps)
  return dict(step_s=step_s, traced_step_s=traced_step_s, steps=steps, hlo_text=hlo_text)


def newest_xplane(trace_dir: str) -> str:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  return max(paths, key=os.path.getmtime)


def report(title: list[str], times: dict, xplane: str, hlo_text: str) -> list[str]:
  profile = jax.profiler.ProfileData.from_file(xplane)
  return [*title, f"Step: {times['step_s'] * 1e3:.1f} ms unprofiled, "
          f"{times['traced_step_s'] * 1e3:.1f} ms traced (each the mean of {times['steps']} "
          "steps dispatched back to back).", "",
          *breakdown(profile, hlo_text, times["steps"], times["traced_step_s"])]


def save(save_dir: str, xplane: str, times: dict, title: list[str]) -> None:
  """The trace, the HLO and the times, flat in `save_dir`: `--parse save_dir` reads them."""
  os.makedirs(save_dir, exist_ok=True)
  shutil.copy(xplane, os.path.join(save_dir, "step.xplane.pb"))
  with open(os.path.join(save_dir, "train_step.hlo.txt"), "w") as f:
    f.write(times["hlo_text"])
  with open(os.path.join(save_dir, "step_times.json"), "w") as f:
    json.dump({k: v for k, v in times.items() if k != "hlo_text"} | {"title": title}, f)


def parse_saved(save_dir: str) -> list[str]:
  with open(os.path.join(save_dir, "step_times.json")) as f:
    times = json.load(f)
  with open(os.path.join(save_dir, "train_step.hlo.txt")) as f:
    hlo_text = f.read()
  return report(times["title"], times, os.path.join(save_dir, "step.xplane.pb"), hlo_text)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_args(parser)
  parser.add_argument("--steps", type=int, default=3, help="steps timed, then steps traced")
  parser.add_argument("--save", default="", help="keep the trace, HLO and times in this folder")
  parser.add_argument("--parse", default="", help="read a folder --save wrote; run nothing")
  parser.add_argument("--out", default="", help="also write the report (markdown) here")
  args, rest = parser.parse_known_args()
  if args.parse:
    write_lines(args.out, parse_saved(args.parse), "w")
    return
  config = config_lib.load_config(args.config, config_overrides(parser, args, rest))
  device = jax.devices()[0]
  model = config.model
  title = [f"# Step profile: {args.preset or args.config}, attention {model.attention_impl}, "
           f"remat {model.remat_policy}, {config.train.batch_size} x {config.data.seq_len} "
           f"tokens, {model.dtype}", "",
           f"Command: `{' '.join(['python', *sys.argv])}`  ",
           f"Device: {jax.device_count()} x {device.device_kind} ({device.platform}); jax "
           f"{jax.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
           f"UTC; commit {commit()}", ""]
  with tempfile.TemporaryDirectory() as trace_dir:
    times = trace_steps(config, args.vocab_size, args.steps, trace_dir)
    xplane = newest_xplane(trace_dir)
    if args.save:
      save(args.save, xplane, times, title)
    write_lines(args.out, report(title, times, xplane, times["hlo_text"]), "w")


if __name__ == "__main__":
  main()

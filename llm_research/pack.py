"""Pack a BitNet b1.58 run for inference: 2 bits per projection weight.

    python -m llm_research.pack --workdir <bitnet run> --out <dir>

Reads (and only reads) the newest good checkpoint of a run trained with
`model.linear_impl="bitnet"`, packs its params (`methods/ternary_packing.py`: the byte layout,
and the property kept: the packed model computes the fake-quantized model's function) and
writes an inference run to <dir>:
`config.json` (the run's config with `model.linear_impl="ternary_packed"`) and
`checkpoints/<step>/params` (orbax; no optimizer state, no data position).
`python -m llm_research.sample --workdir <dir>` generates from it with the same decoding code as
the float model; its projections run through `kernels/ternary_matmul.py`.
"""
import argparse
import dataclasses
import os
import sys

import jax

from llm_research import checkpoints, sample
from llm_research.errors import ConfigError
from llm_research.methods import ternary_packing
from llm_research.models import registry


def pack_run(workdir: str, out: str) -> int:
  """Packs `workdir`'s newest checkpoint into the inference run `out`; returns its step. The
  source run is only read."""
  check_out(out)
  check_packable(workdir, sample.read_config(workdir))  # before any checkpoint is read
  config, _, model_config, params, step = sample.load_run(workdir, to="pack")
  _, packed = ternary_packing.pack_params(model_config, jax.device_get(params))
  config.model.linear_impl = "ternary_packed"
  checkpoints.save_params(out, step, packed)
  with open(os.path.join(out, "config.json"), "w") as f:  # last: a run exists once complete
    f.write(config.to_json_best_effort(indent=2))
  return step


def check_out(out: str) -> None:
  """Refuses an --out that is not a new or an empty directory."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"--out {out!r} is a file: give a new directory")
  if os.path.exists(out) and os.listdir(out):
    raise ConfigError(f"--out {out!r} is not empty: give a new directory")


def check_packable(workdir: str, config) -> None:
  """Refuses a run whose model has no BitNet layers, or was not trained with them."""
  name = config.model.get("name", registry.DEFAULT_MODEL)
  if "linear_impl" not in {f.name for f in dataclasses.fields(registry.model_class(name))}:
    raise ConfigError(f"{workdir!r}: model.name={name!r} has no BitNet linear layers to pack")
  linear_impl = config.model.get("linear_impl")
  if linear_impl != "bitnet":
    raise ConfigError(f"{workdir!r} was trained with model.linear_impl={linear_impl!r}; only a "
                      "'bitnet' run packs to ternary")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llm_research.pack", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a run trained with linear_impl=bitnet")
  parser.add_argument("--out", required=True, help="a new directory for the inference run")
  args = parser.parse_args(argv)
  try:
    step = pack_run(args.workdir, args.out)
  except ConfigError as error:
    sys.exit(f"error: {error}")
  print(f"packed step {step} of {args.workdir} into {args.out}")
  return step


if __name__ == "__main__":
  main()

#!/usr/bin/env bash
# Fetches, on a machine with pip, the wheels that a lent GPU machine lacks (Python 3.12, x86-64)
# into .whl/ of the checkout, for scripts/gpu_session.sh to install there without an index.
#
#   bash scripts/gpu_wheels.sh        # once per checkout; .whl/ is git-ignored via .git/info/exclude
#
# The device image already has jax, flax, optax, orbax, chex, sentencepiece, pytest,
# pytest-xdist, matplotlib, scikit-learn, tqdm and the rest of /work/.library/device/KINDS.md's
# list. What it lacks, pinned to the versions this project's suite passed with:
#   the project's own requirements: tensorflow-datasets (and its pure-Python needs), grain,
#     array_record, ml_collections, tensorboardX, music21 (and its needs), portpicker;
#   the attention benchmark's peer tokamax and what it imports (qwix, pydantic, einshape,
#     typeguard; tokamax 0.0.17 needs jax >= 0.11.1). Not xprof, which tokamax also imports:
#     its 32 MB wheel would take the carried tree over 64 MiB; the benchmark stands in for it.
# Checked by installing them with Python 3.12 beside jax 0.11.2 (CPU) and the image's other
# packages, then running the suite there.
# promise ships no wheel: it is built here (pure Python).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl

PLATFORMS=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

WHEELS=(
  tensorflow-datasets==4.9.10 array_record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1
  simple-parsing==0.1.9 docstring_parser==0.18.0 tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  grain==0.2.18 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5
  music21==10.5.1 webcolors==25.10.0 chardet==7.7.0 jsonpickle==4.1.4 more-itertools==11.2.1
  tokamax qwix pydantic annotated-types typing-inspection einshape typeguard
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
python3 -m pip wheel -q --no-deps -w .whl promise==2.3
# pydantic pins the pydantic-core it was built with; a mismatch fails at import on the device.
core=$(unzip -p .whl/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d .whl "pydantic-core==${core}"
du -sh .whl

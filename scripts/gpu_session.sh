#!/usr/bin/env bash
# One call on a lent GPU machine: install what its image lacks, then run the named stages, each
# under its own time limit, each writing its table under $OUT as it goes (a stage cut off by its
# limit keeps the rows it finished). Sized for a 15-minute device lease, two calls:
#
#   (here, once)  bash scripts/gpu_wheels.sh                  # the wheels, into .whl/
#   (there)       OUT=... LLM_RESEARCH_COMMIT=<short hash> bash scripts/gpu_session.sh \
#                     tests attention attention_sweep          # <= 550 s
#                 OUT=... LLM_RESEARCH_COMMIT=<short hash> bash scripts/gpu_session.sh \
#                     ternary train generation                 # <= 280 s
#
# (the device tool's run, with carry [".whl"]; the working tree travels without .git, so the
# commit the tables name comes from LLM_RESEARCH_COMMIT, see experiments/report.py).
#
# Stages, their limits in seconds and their files:
#   tests            270  tests.txt: the kernel tests first (the real Pallas kernels, no interpret
#                         mode), then the rest of the suite but the slow marks and the notebooks
#   attention        180  attention.md, attention_long.md: the issue's tables (2k and 8k at batch
#                         4, 16k and 32k at batch 1), ours against cuDNN, JAX's Pallas mha, JAX's
#                         Mosaic GPU attention and tokamax
#   attention_sweep  100  attention_sweep.md: tiles, warps and stages of ours; best marked
#   ternary           60  ternary.md: ternary matmul against bf16 and the card's copy bandwidth
#   train            160  train.md: the 350m preset's MFU over remat and batch; where the
#                         step's time goes (a profile)
#   generation        60  generation.md: a BitNet model's tokens/s, packed against bfloat16
# session.log holds every stage's output; the last lines printed are the stages' summary.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the tables}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
SUMMARY=()
# Several test processes share the one GPU: none may take 75% of its memory up front.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

setup() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
  {
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
    echo "commit ${LLM_RESEARCH_COMMIT:-unknown}"
  } 2>&1 | tee -a "$LOG"
}

# stage NAME LIMIT COMMAND...: runs COMMAND under LIMIT seconds, its output into the log.
stage() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ' (time limit)')")
}

pytest_on_gpu() {  # -P: the checkout's llm_research/ must not shadow the installed package
  python3 -P -m pytest -n 8 -q -p no:cacheprovider -rfE --durations=10 "$@"
}

run_tests() {
  local kernels=(tests/test_flash_attention.py tests/test_bitnet.py)
  [ -f tests/test_flash_attention_mgpu.py ] && kernels+=(tests/test_flash_attention_mgpu.py)
  stage tests_kernels 120 pytest_on_gpu "${kernels[@]}" --junitxml="$OUT/tests_kernels.xml"
  local deselect=()
  for f in "${kernels[@]}" tests/test_notebooks.py; do deselect+=(--ignore="$f"); done
  stage tests_rest 150 pytest_on_gpu -m "not slow" "${deselect[@]}" tests \
    --junitxml="$OUT/tests_rest.xml"
  python3 - "$OUT" <<'EOF' | tee "$OUT/tests.txt"
import glob, sys, xml.etree.ElementTree as ET
for path in sorted(glob.glob(f"{sys.argv[1]}/tests_*.xml")):
  root = ET.parse(path).getroot()  # <testsuites><testsuite ...> or a bare <testsuite>
  suite = root if root.tag == "testsuite" else root.find("testsuite")
  print(path.rsplit("/", 1)[1], {k: suite.get(k) for k in ("tests", "failures", "errors",
                                                         "skipped", "time")})
  for case in suite.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
      first_line = (bad.get("message") or "").strip().split("\n")[0]
      print(f"  FAILED {case.get('classname')}::{case.get('name')}: {first_line[:300]}")
EOF
}

setup
for name in "$@"; do
  case $name in
    tests) run_tests ;;
    attention)
      stage attention 100 python3 experiments/benchmarks/attention.py --mode speed --causal \
        --lengths 2048,8192 --head_dims 64,128 --batch 4 --heads 16 --out "$OUT/attention.md"
      stage attention_long 80 python3 experiments/benchmarks/attention.py --mode speed --causal \
        --lengths 16384,32768 --head_dims 128 --batch 1 --heads 16 --out "$OUT/attention_long.md"
      ;;
    attention_sweep)
      stage attention_sweep 100 python3 experiments/benchmarks/attention.py --sweep --causal \
        --lengths 8192 --head_dims 64,128 --batch 4 --heads 16 --out "$OUT/attention_sweep.md"
      ;;
    ternary)
      stage ternary 60 python3 experiments/benchmarks/ternary_matmul.py --sweep \
        --shapes 4096x4096,8192x28672 --rows 1,16,4096 --out "$OUT/ternary.md"
      ;;
    train)
      stage train 160 python3 experiments/benchmarks/train_throughput.py --preset 350m \
        --sweep --profile --out "$OUT/train.md"
      ;;
    generation)
      stage generation 60 python3 experiments/benchmarks/bitnet_generation.py \
        --out "$OUT/generation.md"
      ;;
    *) echo "unknown stage $name (tests attention attention_sweep ternary train generation)"
       exit 2 ;;
  esac
done
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"

#!/usr/bin/env bash
# One call on a lent GPU machine: install what its image lacks, then run the named stages in
# order, each under its own time limit, each writing its table under $OUT as it goes (a stage
# cut off by its limit keeps the rows it finished; the tests stage, the results of the tests it
# finished). A stage whose limit no longer fits in $BUDGET_S (default 600, one call's most) is
# skipped and says so. For a 15-minute device lease, two calls in order of importance:
#
#   (here, once)  bash scripts/gpu_wheels.sh                    # the wheels, into .whl/
#   (there)       OUT=$OUT BUDGET_S=540 LLM_RESEARCH_COMMIT=<short hash> \
#                   bash scripts/gpu_session.sh tests attention ternary
#                 OUT=$OUT BUDGET_S=<device time left - 90> LLM_RESEARCH_COMMIT=<short hash> \
#                   bash scripts/gpu_session.sh train attention_sweep generation
#
# each through the device tool's run with carry [".whl"] (the working tree travels without .git,
# so the commit the tables name comes from LLM_RESEARCH_COMMIT: experiments/report.py).
#
# Stages, their limits in seconds and their files under $OUT:
#   tests            270  tests.txt (and tests_*.xml): the kernel tests first, compiled on the
#                         GPU (no interpret mode), then the rest of the suite but the slow marks
#                         and the notebooks (CPU notebooks)
#   attention        180  attention.md, attention_long.md: the issue's tables (2k and 8k at batch
#                         4 x 16 heads, 16k and 32k at batch 1), ours (the Hopper kernels where
#                         they apply, with the Triton backward, the Triton kernels alone) against
#                         cuDNN, JAX's Pallas Triton and Mosaic GPU attention, tokamax
#   ternary           90  ternary.md: the decode sweep (rows 1, 16), then every path against a
#                         bf16 dot at 1..4096 rows, and GB/s against the card's measured bandwidth
#   train            250  train.md (and train_trace/): the 350m preset's MFU, cudnn and pallas
#                         attention at batch 16 and 32, remat dots; where the step's time goes
#   attention_sweep  120  attention_sweep.md: tiles, warps and stages of the Triton kernels,
#                         variants of the Hopper forward; the fastest marked
#   generation       150  generation.md: a 1B BitNet model's tokens/s at batch 1 and 16, packed
#                         weights against bfloat16, and memory
#   moe              120  moe.md: the MoE layer and a 4-layer MoE model (dropless with
#                         ragged_dot, capacity) against the dense peers of the same active
#                         params, forward and forward + backward, bfloat16, one GPU
#   layerskip        150  layerskip.md, layerskip.png: a small model trained with and without
#                         LayerSkip, its early exits' eval loss, self-speculative vs ordinary
#                         greedy decoding (tokens/s, acceptance) at every exit layer
# session.log holds every stage's output; the last lines printed are the stages' summary.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the tables}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
SUMMARY=()
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

setup() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  python3 -P -c "import llm_research.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
  {
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
    echo "commit ${LLM_RESEARCH_COMMIT:-unknown}"
  } 2>&1 | tee -a "$LOG"
}

# stage NAME LIMIT COMMAND...: runs COMMAND under LIMIT seconds, its output into the log; skips
# it when LIMIT no longer fits in $BUDGET_S (the device time this call may still spend).
stage() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  if [ $((SECONDS + limit)) -gt "${BUDGET_S:-600}" ]; then
    SUMMARY+=("$name: skipped, its ${limit} s limit does not fit in BUDGET_S=${BUDGET_S:-600}")
    return
  fi
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  # SIGINT first: pytest then still writes its summary and junit file of the tests it finished.
  timeout -s INT -k 20 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  SUMMARY+=("$name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ' (time limit)')")
}

# -P: the checkout's llm_research/ must not shadow the installed package. Eight test processes
# share the one GPU: none may take 75% of its memory up front.
PYTEST=(env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -P -m pytest -n 8 -q -p no:cacheprovider
        -rfE --durations=10)

run_tests() {
  # Never run on a GPU before first (xdist hands tests out in this order): the Hopper kernels.
  local kernels=(tests/test_flash_attention_mgpu.py tests/test_flash_attention_mgpu_backward.py
                 tests/test_flash_attention.py tests/test_bitnet.py)
  stage tests_kernels 120 "${PYTEST[@]}" "${kernels[@]}" --junitxml="$OUT/tests_kernels.xml"
  local deselect=()
  for f in "${kernels[@]}" tests/test_notebooks.py; do deselect+=(--ignore="$f"); done
  stage tests_rest 150 "${PYTEST[@]}" -m "not slow" "${deselect[@]}" tests \
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
      stage attention_sweep 120 python3 experiments/benchmarks/attention.py --sweep --causal \
        --lengths 8192 --head_dims 64,128 --batch 4 --heads 16 --out "$OUT/attention_sweep.md"
      ;;
    moe)
      stage moe 120 python3 experiments/benchmarks/moe.py --devices 1 --batch 8 --length 2048 \
        --embed 1024 --mlp 2816 --layers 4 --repeats 5 --out "$OUT/moe.md"
      ;;
    ternary)
      stage ternary 90 python3 experiments/benchmarks/ternary_matmul.py --sweep \
        --shapes 8192x28672 --rows 1,16,64,128,4096 --out "$OUT/ternary.md"
      ;;
    train)
      stage train 250 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 \
        experiments/benchmarks/train_throughput.py --config experiments/quickstart.py \
        --preset 350m --config.model.dtype=bfloat16 --config.data.seq_len=2048 --steps 5 \
        --attention cudnn,pallas --remat dots --batch_sizes 16,32 --point_timeout 150 \
        --budget_s 240 --profile --out "$OUT/train.md"
      ;;
    generation)
      stage generation 150 python3 experiments/benchmarks/bitnet_generation.py \
        --new_tokens 64 --out "$OUT/generation.md"
      ;;
    layerskip)
      stage layerskip 150 python3 experiments/benchmarks/layerskip.py \
        --workdir /tmp/layerskip_bench --out "$OUT/layerskip"
      ;;
    *) echo "unknown stage $name (tests attention attention_sweep ternary train generation moe layerskip)"
       exit 2 ;;
  esac
done
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"

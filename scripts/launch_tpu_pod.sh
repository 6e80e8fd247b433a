#!/usr/bin/env bash
# Runs one training command on every worker of a TPU VM pod slice (one process per host).
set -euo pipefail

usage() {
  cat >&2 <<'TXT'
usage: scripts/launch_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]

  TPU_NAME  the TPU VM (pod slice), e.g. my-v4-32
  ZONE      its zone, e.g. us-central2-b
  CONFIG    experiment config, relative to the repository, e.g. experiments/quickstart.py
  WORKDIR   a path every worker sees, e.g. a bucket mounted with gcsfuse at the same place on
            every worker (/mnt/my-bucket/runs/qs); gs:// URLs are not supported
Every worker runs `python -m llm_research.main ... --multihost` in ~/llm_research. Re-running the
same command resumes the run from its newest checkpoint.

environment:
  SETUP=1     first clone REPO_URL into ~/llm_research on every worker and install it with
              jax[tpu] into ~/llm_research/.venv (needs Python 3.11 or newer on the workers)
  REPO_URL    the repository's git URL (for SETUP=1)
TXT
  exit 2
}

[[ $# -ge 4 ]] || usage
tpu_name=$1 zone=$2 config=$3 workdir=$4
shift 4
[[ $workdir != gs://* ]] || { echo "WORKDIR must be a mounted path, not $workdir" >&2; exit 2; }

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all --command="$1"
}

if [[ ${SETUP:-0} == 1 ]]; then
  : "${REPO_URL:?set REPO_URL to the git URL of the repository}"
  on_all_workers "set -e
    [ -d ~/llm_research ] || git clone $(printf '%q' "$REPO_URL") ~/llm_research
    cd ~/llm_research && git pull --ff-only
    python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'"
fi

# The same command on every worker; jax.distributed.initialize() finds the others.
command=(python -m llm_research.main --config "$config" --workdir "$workdir" --multihost "$@")
on_all_workers "cd ~/llm_research && . .venv/bin/activate && $(printf '%q ' "${command[@]}")"

#!/usr/bin/env bash
# Runs one training command as one process per GPU node, over ssh or with SLURM's srun.
set -euo pipefail

usage() {
  cat >&2 <<'TXT'
usage: scripts/launch_gpu_nodes.sh ssh CONFIG WORKDIR HOST0,HOST1,... [--config.key=value ...]
       scripts/launch_gpu_nodes.sh slurm CONFIG WORKDIR [--config.key=value ...]

  ssh    starts process i on the i-th host over ssh, with --coordinator_address=HOST0:$PORT,
         --num_processes and --process_id; waits for all and fails if any fails
  slurm  inside an allocation (sbatch/salloc): srun one task per node with --multihost;
         JAX reads the coordinator, process count and id from SLURM's environment
  CONFIG   experiment config, relative to the repository, e.g. experiments/quickstart.py
  WORKDIR  a path on a filesystem every node shares
Each process uses all GPUs of its node. Re-running the same command resumes the run.

environment:
  REPO_DIR  the repository on every host, with its .venv (ssh mode; default ~/llm_research)
  PORT      the coordinator's port on HOST0 (ssh mode; default 12355)
TXT
  exit 2
}

[[ $# -ge 3 ]] || usage
mode=$1 config=$2 workdir=$3
shift 3

case $mode in
  slurm)
    exec srun --ntasks-per-node=1 python -m llm_research.main \
      --config "$config" --workdir "$workdir" --multihost "$@"
    ;;
  ssh)
    [[ $# -ge 1 ]] || usage
    IFS=, read -r -a hosts <<< "$1"
    shift
    coordinator="${hosts[0]}:${PORT:-12355}"
    pids=()
    for i in "${!hosts[@]}"; do
      command=(python -m llm_research.main --config "$config" --workdir "$workdir"
               --coordinator_address="$coordinator" --num_processes="${#hosts[@]}"
               --process_id="$i" "$@")
      ssh "${hosts[$i]}" "cd ${REPO_DIR:-~/llm_research} && . .venv/bin/activate && \
        $(printf '%q ' "${command[@]}")" &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit "$status"
    ;;
  *)
    usage
    ;;
esac

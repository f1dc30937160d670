#!/usr/bin/env bash
# Runs several benchmark steps in one GPU-machine call, each under its own time limit, and
# packs every result under $OUT/results.tar.gz after each step (so a run cut short still
# returns what finished).  Usage (on the GPU machine, from the repo root):
#   bash benchmarks/gpu_session.sh "NAME:SECONDS:COMMAND" ...
# Each COMMAND may use $R/NAME as its output folder.
set -uo pipefail
source .devbundle/setup.sh >/dev/null
# The GPU image sets PYTHONDONTWRITEBYTECODE=1 over a torch that ships no bytecode: every process
# then compiles ~2,000 modules from source (5.3 s of rank 0's start-up, profiled 2026-11-27 s5).
# A normal install has the .pyc files; write them once under /tmp as such an install would.
# MP_IMAGE_BYTECODE=1 keeps the image's setting.
if [[ "${MP_IMAGE_BYTECODE:-0}" != 1 ]]; then
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=/tmp/pyc
fi
export R=$OUT/r && mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpus.csv" 2>&1
nvidia-smi topo -m > "$R/topology.txt" 2>&1
env | grep -E '^(PYTHON|OMP_|NCCL_|CUDA_)' | sort > "$R/env.txt"
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  mkdir -p "$R/$name"; start=$(date +%s)
  echo "== $name (limit ${limit}s): $cmd"
  timeout -k 10 "$limit" bash -c "$cmd" >"$R/$name.log" 2>&1; rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - start ))s"; tail -n 30 "$R/$name.log" | cut -c1-220
  tar -C "$OUT" -czf "$OUT/results.tar.gz" r
done

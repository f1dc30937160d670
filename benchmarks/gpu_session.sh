#!/usr/bin/env bash
# Runs several benchmark steps in one GPU-machine call, each under its own time limit, and
# packs every result under $OUT/results.tar.gz after each step (so a run cut short still
# returns what finished).  Usage (on the GPU machine, from the repo root):
#   bash benchmarks/gpu_session.sh "NAME:SECONDS:COMMAND" ...
# Each COMMAND may use $R/NAME as its output folder.
set -uo pipefail
source .devbundle/setup.sh >/dev/null
export R=$OUT/r && mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpus.csv" 2>&1
nvidia-smi topo -m > "$R/topology.txt" 2>&1
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  mkdir -p "$R/$name"; start=$(date +%s)
  echo "== $name (limit ${limit}s): $cmd"
  timeout -k 10 "$limit" bash -c "$cmd" >"$R/$name.log" 2>&1; rc=$?
  echo "== $name rc=$rc in $(( $(date +%s) - start ))s"; tail -n 30 "$R/$name.log" | cut -c1-220
  tar -C "$OUT" -czf "$OUT/results.tar.gz" r
done

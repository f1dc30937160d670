#!/bin/bash
# $1: script path, $2: iterations, $3: log
cd /work/main && source .venv/bin/activate
python -c "while True: pass" & S1=$!
python -c "while True: pass" & S2=$!
python - "$1" "$2" > "$3" 2>&1 <<'PY'
import sys
sys.path.insert(0, "/work/main/tests"); sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
import test_autotune_train as t
t.SCRIPT = Path(sys.argv[1])
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.strategies.deepspeed_config import deepspeed_config
job = t._job()
zero2 = deepspeed_config(job, Plan(dp=2, zero_stage=2, micro_batch=2, grad_accum=2), on_cpu=True)
n = int(sys.argv[2]); bad = 0
for i in range(n):
    p = t._launch(2, zero2, ["--warmup", "1", "--steps", "3", "--result", "/tmp/flake/r2.json"])
    out, _ = p.communicate(timeout=400)
    bad += p.returncode != 0
    print(i, p.returncode, "terminate" in out, flush=True)
print("bad", bad, "of", n)
PY
kill $S1 $S2

import sys, os, json, subprocess
sys.path.insert(0, "/work/main/tests"); sys.path.insert(0, "/work/main/benchmarks")
import test_autotune_train as t
from meshpilot.orchestrator.plan.plan import Plan
from meshpilot.strategies.deepspeed_config import deepspeed_config
job = t._job()
zero2 = deepspeed_config(job, Plan(dp=2, zero_stage=2, micro_batch=2, grad_accum=2), on_cpu=True)
n = int(sys.argv[1]); bad = 0
for i in range(n):
    p = t._launch(2, zero2, ["--warmup", "1", "--steps", "3", "--result", "/tmp/flake/r.json"])
    out, _ = p.communicate(timeout=240)
    if p.returncode != 0:
        bad += 1
        open(f"/tmp/flake/fail{i}.log", "w").write(out)
    print(i, p.returncode, flush=True)
print("bad", bad, "of", n)

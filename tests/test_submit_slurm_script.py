"""``meshpilot submit --to slurm --dry-run`` without a Slurm: the sbatch script is byte-stable, carries
the preset's and the plan's options, quotes what users type (bash parses it back to the same
strings), and rejects what cannot be written safely; the plan goes through the same fit check as
``meshpilot run``; Slurm's states map onto meshpilot's keeping TIMEOUT, OUT_OF_MEMORY, PREEMPTED and
FAILED apart; the driver command needs no torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from no_torch import run_without

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import QUICKSTART, TWO_NODES, meshpilot  # noqa: E402

from meshpilot.launch.slurm import SlurmClient, SlurmSpec, map_state, sbatch_script, time_limit_seconds  # noqa: E402
from meshpilot.orchestrator.errors import ConfigError  # noqa: E402


def _dry(tmp_path: Path, *extra: str, out: Path | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    out = out or tmp_path / "out"
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", "--dry-run", "--out", out, f"train.output_dir={tmp_path}/runs",
                   *extra], tmp_path)
    return r, out


def test_dry_run_is_byte_stable_and_submits_nothing(tmp_path):
    r1, out = _dry(tmp_path, *TWO_NODES)
    assert r1.returncode == 0, r1.stderr
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["job.yaml", "sbatch.sh"]
    r2, _ = _dry(tmp_path, *TWO_NODES)
    assert r2.returncode == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert r1.stdout == r2.stdout and "dry run: nothing submitted" in r1.stdout
    assert not (out / "submission.json").exists() and not (tmp_path / "submissions").exists()
    # another job, another run id
    r3, out3 = _dry(tmp_path, *TWO_NODES, "train.lr=1e-3", out=tmp_path / "out3")
    assert (out3 / "sbatch.sh").read_bytes() != first["sbatch.sh"]
    assert subprocess.run(["bash", "-n", str(out / "sbatch.sh")]).returncode == 0


def test_script_is_one_torchrun_per_node_with_requeue_and_preset_options(tmp_path):
    r, out = _dry(tmp_path, "cluster=slurm-dgx-h100", "plan.dp=16", "train.global_batch=32", "--max-requeues", "2")
    assert r.returncode == 0, r.stderr
    s = (out / "sbatch.sh").read_text()
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=112", "--mem=1843G",
              "--partition=gpu", "--account=ml-research", "--qos=normal", "--time=24:00:00", "--requeue",
              "--open-mode=append", "--signal=B:USR2@120", "--exclusive"):
        assert f"#SBATCH {d}\n" in s, d
    assert "srun --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks-per-node=1 --kill-on-bad-exit=1 --unbuffered" in s
    assert "--nproc_per_node=\"$NPROC_PER_NODE\"" in s and "NPROC_PER_NODE=8" in s
    assert "--rdzv_backend=c10d --rdzv_endpoint=\"$MASTER_ADDR:$MASTER_PORT\"" in s
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in s
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))" in s
    assert "export PYTHONUNBUFFERED=1" in s and "MAX_REQUEUES=2" in s and "FINAL_CHECKPOINT=step_00000030" in s
    assert 'scontrol requeue "$SLURM_JOB_ID"' in s and "trap on_usr2 USR2" in s
    assert "DS_ACCELERATOR" not in s                          # GPU workers
    # CLI options override the preset
    r, out = _dry(tmp_path, "cluster=slurm-dgx-h100", "plan.dp=16", "train.global_batch=32", "--partition", "debug",
                  "--time", "30", "--mem", "0", out=tmp_path / "o2")
    s = (out / "sbatch.sh").read_text()
    assert "#SBATCH --partition=debug\n" in s and "#SBATCH --time=30\n" in s and "#SBATCH --mem=0\n" in s


def _assignments(script: str) -> dict[str, str]:
    """The values bash gives the script's variables (its header run, nothing after it)."""
    head = script.split("\nMASTER_ADDR=")[0]
    code = head + "\nprintf '%s\\0' \"$RUN_DIR\" \"$JOB_FILE\" \"$PYTHON\"\n"
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout.split("\0")
    return dict(zip(("RUN_DIR", "JOB_FILE", "PYTHON"), out))


def test_spaces_quotes_and_command_substitutions_stay_data(tmp_path):
    evil = tmp_path / "a b 'c' \"d\" $(touch PWNED) `touch PWNED2` ;e &f %g"
    spec = SlurmSpec(name="x $(touch PWNED3)", run_dir=str(evil), job_file=str(evil / "job.yaml"),
                     python="/opt/my env/bin/python", nodes=2, procs_per_node=1, gpus_per_node=0, cpus_per_task=1,
                     omp_threads=1, final_step=10, partition="p q", account="a'b", extra_sbatch=("--comment=$(id)",))
    s = sbatch_script(spec)
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
    v = _assignments(s)
    assert v == {"RUN_DIR": str(evil), "JOB_FILE": str(evil / "job.yaml"), "PYTHON": "/opt/my env/bin/python"}
    assert not list(tmp_path.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert "#SBATCH --job-name=x-touch-PWNED3\n" in s
    # sbatch's directive parser strips shell quotes; % is doubled where Slurm expands patterns
    assert re.search(r"#SBATCH --output='.*%%g/logs/slurm-%j\.out'\n", s), s
    assert "#SBATCH --partition='p q'\n" in s and "#SBATCH '--comment=$(id)'\n" in s
    assert sbatch_script(spec) == s


@pytest.mark.parametrize("output_dir,why", [("a\nb", "control character"), ("a\\b", "backslash")])
def test_unwritable_values_are_rejected(tmp_path, output_dir, why):
    import yaml
    job = yaml.safe_load(QUICKSTART.read_text())
    job["train"]["output_dir"] = str(tmp_path / output_dir)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    r = meshpilot(["submit", tmp_path / "job.yaml", "--to", "slurm", "--dry-run"], tmp_path)
    assert r.returncode == 2 and "run dir" in r.stderr and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["job.yaml"]          # nothing written


@pytest.mark.parametrize("args,needle", [
    (["--time", "1 day"], "not a Slurm time limit"),
    (["--mem", "64 GB"], "not a Slurm memory size"),
    (["--time", "1", "--signal-lead", "120"], "is not shorter than the time limit"),
    (["--max-requeues", "-1"], "must be >= 0"),
    (["cluster=slurm-dgx-h100", "plan.dp=16", "train.global_batch=32", "cluster.slurm.extra_sbatch=[exclusive]"],
     "each entry must be one sbatch option"),
    (["cluster=slurm-dgx-h100", "plan.dp=12", "train.global_batch=12"], "do not fill 2 nodes"),
])
def test_bad_options_are_config_errors(tmp_path, args, needle):
    r, _ = _dry(tmp_path, *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_same_fit_check_as_run(tmp_path):
    """A plan the simulator says does not fit is refused as by `meshpilot run`, unless --force."""
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", "--dry-run", "model=llama-2-7b", "train.seq_len=4096",
                   "train.global_batch=2", "plan.dp=2", "cluster.gpu.memory_gib=4", f"--out={tmp_path / 'o'}"], tmp_path)
    assert r.returncode == 2 and "does not fit" in r.stderr and "--force" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    r = meshpilot(["submit", QUICKSTART, "--to", "slurm", "--dry-run", "model=llama-2-7b", "train.seq_len=4096",
                   "train.global_batch=2", "plan.dp=2", "cluster.gpu.memory_gib=4", f"--out={tmp_path / 'o'}",
                   "--force"], tmp_path)
    assert r.returncode == 0 and (tmp_path / "o" / "sbatch.sh").exists(), r.stderr


def test_plan_auto_is_pinned_in_the_job_file(tmp_path):
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.plan.plan import resolve_plan
    r, out = _dry(tmp_path, "plan=auto")
    assert r.returncode == 0, r.stderr
    job = load_job(out / "job.yaml")
    assert not job.plan.auto and resolve_plan(job).world_size >= 1


def test_state_mapping_keeps_failure_kinds_apart():
    assert map_state("TIMEOUT") == "timeout" and map_state("OUT_OF_MEMORY") == "out_of_memory"
    assert map_state("PREEMPTED") == "preempted" and map_state("FAILED") == "failed"
    assert map_state("NODE_FAIL") == "node_fail" and map_state("CANCELLED by 0") == "cancelled"
    assert map_state("COMPLETED") == "succeeded" and map_state("PENDING") == "pending"
    assert map_state("RUNNING") == "running" and map_state("weird") == "unknown"
    assert time_limit_seconds("1-02:03:04") == 93784 and time_limit_seconds("90") == 5400
    with pytest.raises(ConfigError):
        time_limit_seconds("1h")


class _Runner:
    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, cmd):
        self.calls.append(list(cmd))
        rc, out = self.answers.get(cmd[0], (1, ""))
        return subprocess.CompletedProcess(cmd, rc, out, "")


def test_status_reads_scontrol_then_falls_back():
    c = SlurmClient(_Runner({"scontrol": (0, "JobId=7 JobName=x JobState=PENDING Reason=BeginTime Restarts=1 "
                                             "ExitCode=0:0 NodeList=(null)\n")}))
    st = c.status("7")
    assert st.state == "requeued" and st.restarts == 1 and st.reason == "BeginTime"
    c = SlurmClient(_Runner({"scontrol": (1, ""), "squeue": (0, ""), "sacct": (0, "OUT_OF_MEMORY|0:125|None\n")}))
    assert c.status("7").state == "out_of_memory"
    c = SlurmClient(_Runner({}))
    assert c.status("7").state == "unknown"
    r = _Runner({"sbatch": (0, "42;cluster\n")})
    assert SlurmClient(r).submit("/x/sbatch.sh", chdir="/x") == "42" and r.calls[0][:2] == ["sbatch", "--parsable"]
    with pytest.raises(ConfigError, match="refused"):
        SlurmClient(_Runner({"sbatch": (1, "")})).submit("/x/sbatch.sh")


@pytest.mark.parametrize("to", ["slurm", "mpi", "k8s", "ray"])
def test_dry_run_needs_neither_torch_nor_the_backend_clients(tmp_path, to):
    args = ["submit", str(QUICKSTART), "--to", to, "--dry-run", f"train.output_dir={tmp_path}"]
    if to == "k8s":
        args += ["--image", "example.com/meshpilot:1"]
    r = run_without(args, tmp_path, blocked=("torch", "deepspeed", "ray", "kubernetes"))
    assert r.returncode == 0, r.stdout + r.stderr

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
    head = script.split("\nMASTER_ADDR=" if "\nMASTER_ADDR=" in script else "\nHEAD_NODE=")[0]
    code = head + "\nprintf '%s\\0' \"$RUN_DIR\" \"$JOB_FILE\" \"$PYTHON\"\n"
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout.split("\0")
    return dict(zip(("RUN_DIR", "JOB_FILE", "PYTHON"), out))


@pytest.mark.parametrize("mode", ["torchrun", "ray"])
def test_spaces_quotes_and_command_substitutions_stay_data(tmp_path, mode):
    evil = tmp_path / "a b 'c' \"d\" $(touch PWNED) `touch PWNED2` ;e &f %g"
    spec = SlurmSpec(name="x $(touch PWNED3)", run_dir=str(evil), job_file=str(evil / "job.yaml"),
                     python="/opt/my env/bin/python", nodes=2, procs_per_node=1, gpus_per_node=0, cpus_per_task=1,
                     omp_threads=1, final_step=10, partition="p q", account="a'b", extra_sbatch=("--comment=$(id)",),
                     mode=mode)
    s = sbatch_script(spec)
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
    v = _assignments(s)
    assert v == {"RUN_DIR": str(evil), "JOB_FILE": str(evil / "job.yaml"), "PYTHON": "/opt/my env/bin/python"}
    assert not list(tmp_path.glob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert "#SBATCH --job-name=x-touch-PWNED3\n" in s
    # sbatch's directive parser strips shell quotes; % is doubled where Slurm expands patterns
    assert re.search(r"#SBATCH --output='.*%%g/logs/slurm-%j\.out'\n", s), s
    if mode == "ray":                 # the srun output paths of the Ray steps: quoted, % doubled
        assert re.search(r"--output='.*%%g/logs/ray-head\.log' ", s) and re.search(r"--output='.*%%g/logs/ray-worker%n\.log' ", s)
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


# --- Ray on Slurm (--slurm-mode ray) ---------------------------------------------------------------

def test_ray_mode_dry_run_is_byte_stable_and_another_run(tmp_path):
    r1, out = _dry(tmp_path, *TWO_NODES, "--slurm-mode", "ray")
    assert r1.returncode == 0, r1.stderr
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["job.yaml", "sbatch.sh"] and "Ray on Slurm" in r1.stdout
    r2, _ = _dry(tmp_path, *TWO_NODES, "--slurm-mode", "ray")
    assert r2.returncode == 0 and {p.name: p.read_bytes() for p in out.iterdir()} == first and r1.stdout == r2.stdout
    assert subprocess.run(["bash", "-n", str(out / "sbatch.sh")]).returncode == 0
    # the same job in the torchrun mode: another script, and another run id (run directory)
    r3, out3 = _dry(tmp_path, *TWO_NODES, out=tmp_path / "t")
    assert (out3 / "sbatch.sh").read_bytes() != first["sbatch.sh"]
    run_id = lambda r: re.search(r"--to slurm: (\S+):", r.stdout).group(1)   # noqa: E731
    assert run_id(r1) != run_id(r3)


def test_ray_mode_head_workers_driver_and_shared_requeue(tmp_path):
    r, out = _dry(tmp_path, "cluster=slurm-dgx-h100", "plan.dp=16", "train.global_batch=32", "--slurm-mode", "ray")
    assert r.returncode == 0, r.stderr
    s = (out / "sbatch.sh").read_text()
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=112", "--partition=gpu",
              "--requeue", "--signal=B:USR2@120", "--exclusive"):
        assert f"#SBATCH {d}\n" in s, d
    flat = re.sub(r"\s*\\\n\s*", " ", s)              # continuation lines joined
    # the head: one task on the first node, its address and a port derived from the job id
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in s
    assert "RAY_PORT=$((20000 + SLURM_JOB_ID % 20000))" in s and "RAY_CLIENT_PORT=$((RAY_PORT + 20000))" in s
    head = re.search(r"srun --nodes=1 --ntasks=1 -w \"\$HEAD_NODE\" .*?&\n", flat).group(0)
    for part in ('ray.scripts.scripts start --head --block --node-ip-address="$HEAD_IP" --port="$RAY_PORT"',
                 '--ray-client-server-port="$RAY_CLIENT_PORT"', "--include-dashboard=false",
                 '--num-cpus="$RAY_NUM_CPUS" --num-gpus="$RAY_NUM_GPUS"', "--dashboard-agent-listen-port=0",
                 '--temp-dir="$RAY_TMP"'):
        assert part in head, part
    assert "RAY_NUM_CPUS=112\n" in s and "RAY_NUM_GPUS=8\n" in s          # the allocation of a node
    # one `ray start --address=HEAD:PORT --block` per other node, after the head answers
    workers = re.search(r'srun --nodes=\$\(\(SLURM_JOB_NUM_NODES - 1\)\) .*?&\n', flat).group(0)
    assert ('--ntasks=$((SLURM_JOB_NUM_NODES - 1)) --ntasks-per-node=1 --exclude="$HEAD_NODE"' in workers
            and 'start --address="$HEAD_IP:$RAY_PORT" --block' in workers and '--temp-dir="$RAY_TMP"' in workers)
    assert 'RAY_TMP="${TMPDIR:-/tmp}/ray-$SLURM_JOB_ID"' in s          # not /tmp/ray: see test_submit_slurm_ray
    assert s.index('/dev/tcp/$0/$1') < s.index("--exclude=") < s.index("--wait-nodes")
    # the driver: meshpilot run of the job file on that cluster, in the batch shell
    assert ('"$PYTHON" -m meshpilot.orchestrator.cli run "$JOB_FILE" --run-dir "$RUN_DIR" '
            '--address "$HEAD_IP:$RAY_PORT" --no-progress &') in flat
    assert "torch.distributed.run" not in s and "MASTER_PORT" not in s
    # USR2 goes to the driver; the trap, the wait and the requeue are the torchrun mode's, once each
    assert 'kill -USR2 "$driver_pid"' in s and 'scancel --signal=USR2 "$SLURM_JOB_ID"' not in s
    for once in ("trap on_usr2 USR2", 'scontrol requeue "$SLURM_JOB_ID" && exit 0', "FINAL_CHECKPOINT=step_00000030",
                 'echo "meshpilot: the job step ended with status $rc"', 'exit "$rc"', 'wait "$driver_pid"; rc=$?'):
        assert s.count(once) == 1, once
    # Ray is stopped (SIGTERM to this job's steps) before the status is reported and the job requeued
    assert s.index('scancel --signal=TERM "$SLURM_JOB_ID"') < s.index("\nstop_ray\n") < s.index("ended with status")
    # the token: a file of the run dir, owner-only, named through the environment; never on a command line
    assert 'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RUN_DIR/ray_auth_token"' in s
    assert "umask 077" in s and "unset RAY_AUTH_TOKEN RAY_ADDRESS" in s and "--token" not in s
    torchrun = (_dry(tmp_path, "cluster=slurm-dgx-h100", "plan.dp=16", "train.global_batch=32", out=tmp_path / "t")[1]
                / "sbatch.sh").read_text()
    common = lambda t: t[t.index("\n# USR2"):t.index("on_usr2() {")]          # noqa: E731
    assert common(s).replace("the driver (the controller) has every worker checkpoint after its current step and stop",
                             "every worker checkpoints after its current step and exits") == common(torchrun)


def test_ray_mode_cpu_workers_get_one_ray_slot_each(tmp_path):
    r, out = _dry(tmp_path, "cluster.nodes=2", "cluster.gpus_per_node=2", "cluster.cpu_cores=4", "plan.dp=4",
                  "train.global_batch=8", "--slurm-mode", "ray")
    assert r.returncode == 0, r.stderr
    s = (out / "sbatch.sh").read_text()
    # 4 CPUs per node allocated, but Ray gets 2 slots per node: the 4 ranks spread 2 + 2 as planned
    assert "#SBATCH --cpus-per-task=4\n" in s and "RAY_NUM_CPUS=2\n" in s and "RAY_NUM_GPUS=0\n" in s
    assert "export DS_ACCELERATOR=cpu\n" in s


def test_ray_mode_from_the_preset_and_the_command_line_wins(tmp_path):
    r, out = _dry(tmp_path, *TWO_NODES, "cluster.slurm.mode=ray")
    assert r.returncode == 0 and "ray.scripts.scripts start --head" in (out / "sbatch.sh").read_text(), r.stderr
    r, out = _dry(tmp_path, *TWO_NODES, "cluster.slurm.mode=ray", "--slurm-mode", "torchrun", out=tmp_path / "o2")
    assert r.returncode == 0 and "torch.distributed.run" in (out / "sbatch.sh").read_text(), r.stderr
    r, _ = _dry(tmp_path, *TWO_NODES, "cluster.slurm.mode=mpi", out=tmp_path / "o3")
    assert r.returncode == 2 and "cluster.slurm.mode" in r.stderr and "torchrun, ray" in r.stderr, r.stderr
    r, _ = _dry(tmp_path, *TWO_NODES, "--slurm-mode", "mpi", out=tmp_path / "o4")
    assert r.returncode == 2 and "--slurm-mode" in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="not a Slurm launch mode"):
        sbatch_script(SlurmSpec(name="n", run_dir="/r", job_file="/r/job.yaml", python="/p", nodes=1, procs_per_node=1,
                                gpus_per_node=0, cpus_per_task=1, omp_threads=1, final_step=1, mode="Ray"))


def test_ray_mode_rejects_what_cannot_be_written(tmp_path):
    spec = dict(name="n", run_dir="/r", job_file="/r/job.yaml", python="/p", nodes=2, procs_per_node=1, gpus_per_node=0,
                cpus_per_task=1, omp_threads=1, final_step=1, mode="ray")
    for bad, why in ((dict(run_dir="/r\nx"), "control character"), (dict(run_dir="/r\\x"), "backslash"),
                     (dict(python="/p\n"), "control character"), (dict(ray_start_timeout_s=0), ">= 1")):
        with pytest.raises(ConfigError, match=why):
            sbatch_script(SlurmSpec(**{**spec, **bad}))



@pytest.mark.slow
def test_ray_mode_node_wait_counts_nodes_and_times_out(tmp_path):
    """The script's wait between `ray start` and the driver (python -m meshpilot.launch.ray_cluster): a real
    one-node Ray answers 1 node at once, and a second node that never joins ends it with status 1."""
    from ray_cluster import held_ray_cluster, subprocess_env
    with held_ray_cluster(tmp_path, num_cpus=1) as address:
        wait = [sys.executable, "-m", "meshpilot.launch.ray_cluster", address, "--timeout", "2", "--wait-nodes"]
        env = subprocess_env(tmp_path)
        r = subprocess.run([*wait, "1"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and "has 1 node(s)" in r.stdout, r.stdout + r.stderr
        r = subprocess.run([*wait, "2"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1 and "has 1 of 2 node(s) after 2 s" in r.stderr, r.stdout + r.stderr


def test_offload_ranks_get_the_threads_the_simulator_assumes(tmp_path):
    """``cluster.cpu_threads_per_rank`` is the OMP_NUM_THREADS of an offloading rank in the exported
    script (default: the gang's rule, cores per GPU capped at 8, within the cores the job gives a
    rank); a plan without CPU math keeps 1 thread, as torchrun gives it."""
    base = ["cluster=slurm-dgx-h100", "plan.dp=16", "train.global_batch=32"]
    off = [*base, "plan.zero_stage=2", "plan.offload_optimizer=cpu"]

    def omp(*extra: str) -> str:
        r, out = _dry(tmp_path, *extra, out=tmp_path / f"o{len(list(tmp_path.iterdir()))}")
        assert r.returncode == 0, r.stderr
        return re.search(r"OMP_NUM_THREADS=(\S+)", (out / "sbatch.sh").read_text()).group(1)

    assert omp(*base) == "1"
    assert omp(*off) == "8"                                     # 112 cores / 8 GPUs = 14, capped at 8
    assert omp(*off, "cluster.cpu_threads_per_rank=3") == "3"

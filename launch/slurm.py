"""Slurm: the sbatch script of one job (pure, byte-stable), and sbatch / scontrol / squeue / scancel.

Generation (:class:`SlurmSpec` -> :func:`sbatch_script`) is a pure function of plain data;
:class:`SlurmClient` runs the Slurm commands (a ``runner`` can be injected in tests).

The script (the launcher conventions this project follows):

* one launcher per node: ``#SBATCH --nodes=N --ntasks-per-node=1 [--gpus-per-node=G]``, then
  ``srun ... python -m torch.distributed.run --nnodes=N --nproc_per_node=G --rdzv_backend=c10d
  --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT -m meshpilot.orchestrator.worker --job J --run-dir D``;
  MASTER_ADDR is the first host of the allocation, MASTER_PORT is derived from the job id
  (20000 + id mod 40000), so two jobs sharing a node do not collide;
* ``--requeue``, ``--open-mode=append`` and ``--signal=B:USR2@LEAD``: the batch shell traps USR2
  (LEAD seconds before the time limit, or ``scancel --signal=USR2 --batch`` as a preemption
  notice), sends USR2 to every process of the step (``scancel --signal=USR2 $SLURM_JOB_ID``;
  the worker checkpoints after the current step and exits 0, see
  :mod:`meshpilot.orchestrator.train.preemption`; torchrun is started with USR2 ignored so the
  agent does not die or tear its workers down), waits for the step to end, and unless the
  last checkpoint is the final one runs ``scontrol requeue $SLURM_JOB_ID``. The requeued job
  resumes from ``RUN_DIR/checkpoints/latest`` (the worker's ``--resume auto``); Slurm starts a
  requeued job only once its old credential expired (``AuthInfo=cred_expire``, 120 s by default). At most
  ``max_requeues`` requeues (SLURM_RESTART_COUNT, submitit's default of 3); once they are used
  the USR2 is only logged and the job ends TIMEOUT at its limit, where Slurm's SIGTERM still
  makes the workers checkpoint (within KillWait). SIGTERM (scancel, time limit, preemption)
  reaches the workers from Slurm directly; torchrun forwards it too and waits up to
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT (set to the signal lead) before killing them;
* ``srun --kill-on-bad-exit=1 --unbuffered``, PYTHONUNBUFFERED=1, one log per node
  (``RUN_DIR/logs/node<N>.log``, appended across requeues) and the batch log
  ``RUN_DIR/logs/slurm-<jobid>.out``.

Quoting: every value that comes from the job, the cluster preset or the command line is
written through :func:`shlex.quote`, in ``#SBATCH`` lines too (sbatch's directive parser
strips shell quotes and does not expand anything), and ``%`` in paths used as Slurm file
name patterns is doubled. Values that cannot be written safely (control characters, and
backslashes, which sbatch's directive parser treats as escapes even inside quotes) are
rejected with a :class:`ConfigError`; so are malformed time limits, memory sizes and extra
options.

Why not submitit: submitit submits a pickled Python callable that it runs in every task, from
a job folder named per submission (uuid'd pickles): its sbatch script is not byte-stable for
the same input, it is not the ``srun torchrun`` line users read and rerun, and its
checkpoint-and-requeue handler runs in the task process, which here is torchrun's agent, not
the training worker (the worker already checkpoints on USR2/SIGTERM itself). Its job states
come from ``sacct``, which needs slurmdbd; :meth:`SlurmClient.status` reads
squeue/scontrol first and uses sacct only as a fallback. So the script and the status
mapping are meshpilot's own; the requeue budget follows submitit's default (3).

Status: Slurm's job states mapped onto :data:`STATES` (pending, running, requeued,
succeeded, failed, cancelled, timeout, out_of_memory, preempted, node_fail, suspended,
unknown), keeping TIMEOUT, OUT_OF_MEMORY, PREEMPTED and FAILED apart.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from meshpilot.orchestrator.errors import ConfigError

WORKER_MODULE = "meshpilot.orchestrator.worker"

# Slurm job state (first word; "CANCELLED by 0" -> CANCELLED) -> meshpilot's submitted-job state
SLURM_STATES = {
    "PENDING": "pending", "CONFIGURING": "pending", "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued",
    "REQUEUE_FED": "requeued", "RESIZING": "running", "RUNNING": "running", "COMPLETING": "running",
    "STAGE_OUT": "running", "SIGNALING": "running", "SUSPENDED": "suspended", "STOPPED": "suspended",
    "COMPLETED": "succeeded", "CANCELLED": "cancelled", "FAILED": "failed", "BOOT_FAIL": "failed",
    "DEADLINE": "failed", "SPECIAL_EXIT": "failed", "REVOKED": "cancelled", "TIMEOUT": "timeout",
    "OUT_OF_MEMORY": "out_of_memory", "PREEMPTED": "preempted", "NODE_FAIL": "node_fail",
}
STATES = ("pending", "running", "requeued", "suspended", "succeeded", "failed", "cancelled", "timeout",
          "out_of_memory", "preempted", "node_fail", "unknown")
TERMINAL = ("succeeded", "failed", "cancelled", "timeout", "out_of_memory", "preempted", "node_fail")

_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
_MEM = re.compile(r"^\d+[KMGT]?$")
_NAME = re.compile(r"[^A-Za-z0-9._-]")


def map_state(slurm_state: str) -> str:
    """A Slurm job state (``squeue %T``, ``scontrol JobState``, ``sacct State``) -> one of :data:`STATES`."""
    word = (slurm_state or "").strip().split(" ")[0].rstrip("+").upper()
    return SLURM_STATES.get(word, "unknown")


def time_limit_seconds(limit: str) -> int:
    """Slurm's time syntax (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds."""
    if not _TIME.match(limit):
        raise ConfigError("cluster.slurm.time_limit", limit, reason="not a Slurm time limit",
                          fix="e.g. 30 (minutes), 04:00:00, or 2-00:00:00")
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
        parts = [int(x) for x in limit.split(":")]
        h, m, s = (parts + [0, 0])[:3]
        return ((days * 24 + h) * 60 + m) * 60 + s
    parts = [int(x) for x in limit.split(":")]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def safe_job_name(name: str) -> str:
    """A Slurm/Kubernetes-friendly job name: letters, digits, '.', '_', '-' (others become '-')."""
    return re.sub(r"-+", "-", _NAME.sub("-", name)).strip("-.") or "meshpilot"


def check_text(key: str, value: str, *, path: bool = False) -> str:
    """``value`` can be written into a script through shlex.quote; raises ConfigError otherwise."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(key, value, reason="contains a control character (newline, tab, ...)",
                          fix="use a value without control characters")
    if path and "\\" in value:
        raise ConfigError(key, value, reason="contains a backslash, which sbatch's #SBATCH parser treats as an escape",
                          fix="use a path without backslashes")
    return value


def _pattern_path(p: str) -> str:
    """A literal path used where Slurm expands %-patterns (--output): % doubled."""
    return p.replace("%", "%%")


@dataclass(frozen=True)
class SlurmSpec:
    """Everything the sbatch script says; plain data (see :func:`sbatch_script`)."""
    name: str                         # job name (made Slurm-friendly by safe_job_name)
    run_dir: str                      # absolute; logs/, checkpoints/, metrics.jsonl
    job_file: str                     # absolute path of the resolved job YAML the workers read
    python: str                       # the interpreter on the nodes
    nodes: int
    procs_per_node: int               # workers (torchrun processes) per node
    gpus_per_node: int                # 0: CPU workers (no --gpus-per-node)
    cpus_per_task: int                # the node launcher's CPUs (all of its workers)
    omp_threads: int
    final_step: int                   # train.steps: a stop whose checkpoint is this step is not requeued
    mem: Optional[str] = None         # --mem (per node), e.g. "1843G"; None: the partition's default
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_limit: Optional[str] = None
    extra_sbatch: tuple[str, ...] = ()
    signal_lead_s: int = 120
    max_requeues: int = 3
    comments: tuple[str, ...] = ()    # header lines (plan, prediction)
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)   # extra exported variables

    def check(self) -> None:
        """Every value is safe to write and consistent; ConfigError otherwise."""
        for key, v in (("name", self.name), ("python", self.python), ("partition", self.partition),
                       ("account", self.account), ("qos", self.qos), ("mem", self.mem)):
            if v is not None:
                check_text(f"slurm.{key}", v)
        check_text("run dir", self.run_dir, path=True)
        check_text("job file", self.job_file, path=True)
        if not self.run_dir.startswith("/") or not self.job_file.startswith("/"):
            raise ConfigError("run dir", self.run_dir, reason="must be an absolute path (the nodes start elsewhere)")
        for n, v in (("nodes", self.nodes), ("procs_per_node", self.procs_per_node), ("cpus_per_task", self.cpus_per_task),
                     ("omp_threads", self.omp_threads)):
            if int(v) < 1:
                raise ConfigError(f"slurm.{n}", v, reason="must be >= 1")
        if self.mem is not None and not _MEM.match(self.mem):
            raise ConfigError("--mem", self.mem, reason="not a Slurm memory size",
                              fix="e.g. 64G, 512000M, or 0 (all of the node's memory)")
        if self.max_requeues < 0:
            raise ConfigError("--max-requeues", self.max_requeues, reason="must be >= 0")
        if not 1 <= self.signal_lead_s <= 65535:
            raise ConfigError("--signal-lead", self.signal_lead_s, reason="must be 1..65535 seconds")
        if self.time_limit is not None:
            check_text("cluster.slurm.time_limit", self.time_limit)
            limit = time_limit_seconds(self.time_limit)
            if limit and self.signal_lead_s >= limit:
                raise ConfigError("--signal-lead", self.signal_lead_s,
                                  reason=f"is not shorter than the time limit {self.time_limit} ({limit} s)",
                                  fix="a smaller --signal-lead or a longer --time")
        for opt in self.extra_sbatch:
            check_text("cluster.slurm.extra_sbatch", opt)
            if not opt.startswith("-"):
                raise ConfigError("cluster.slurm.extra_sbatch", opt, reason="each entry must be one sbatch option",
                                  fix='e.g. ["--exclusive", "--constraint=h100"]')
        for c in self.comments:
            check_text("comment", c)
        for k, v in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise ConfigError("env", k, reason="not a variable name")
            check_text(f"env {k}", v)


def sbatch_script(spec: SlurmSpec) -> str:
    """The sbatch script of ``spec``: the same bytes for the same spec."""
    spec.check()
    q = shlex.quote
    run_dir = spec.run_dir.rstrip("/") or "/"
    directives = [f"--job-name={q(safe_job_name(spec.name))}", f"--nodes={spec.nodes}", "--ntasks-per-node=1"]
    if spec.gpus_per_node:
        directives.append(f"--gpus-per-node={spec.gpus_per_node}")
    directives.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.mem is not None:
        directives.append(f"--mem={spec.mem}")
    for opt, v in (("partition", spec.partition), ("account", spec.account), ("qos", spec.qos),
                   ("time", spec.time_limit)):
        if v:
            directives.append(f"--{opt}={q(v)}")
    directives += [f"--output={q(_pattern_path(run_dir) + '/logs/slurm-%j.out')}", "--open-mode=append", "--requeue",
                   f"--signal=B:USR2@{spec.signal_lead_s}"]
    directives += [q(o) for o in spec.extra_sbatch]

    exports = [("PYTHONUNBUFFERED", "1"), ("OMP_NUM_THREADS", str(spec.omp_threads)),
               ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(spec.signal_lead_s))]
    if not spec.gpus_per_node:
        exports.append(("DS_ACCELERATOR", "cpu"))
    exports += list(spec.env)

    node_log = _pattern_path(run_dir) + "/logs/node%n.log"
    final_tag = f"step_{spec.final_step:08d}"
    lines = ["#!/bin/bash", f"# meshpilot submit --to slurm: {safe_job_name(spec.name)}"]
    lines += [f"# {c}" for c in spec.comments]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += [
        "set -u",
        "",
        f"RUN_DIR={q(run_dir)}",
        f"JOB_FILE={q(spec.job_file)}",
        f"PYTHON={q(spec.python)}",
        f"NPROC_PER_NODE={spec.procs_per_node}",
        f"FINAL_CHECKPOINT={final_tag}",
        f"MAX_REQUEUES={spec.max_requeues}",
        "",
    ]
    lines += [f"export {k}={q(v)}" for k, v in exports]
    lines += [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))",
        "export MASTER_ADDR MASTER_PORT",
        "RESTARTS=${SLURM_RESTART_COUNT:-0}",
        'mkdir -p "$RUN_DIR/logs"',
        'echo "meshpilot: job $SLURM_JOB_ID attempt $((RESTARTS + 1)) on $SLURM_JOB_NODELIST;'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT; run dir $RUN_DIR"',
        "",
        "# USR2 (before the time limit, or `scancel --signal=USR2 --batch` as a preemption notice):",
        "# every worker checkpoints after its current step and exits; then the job is requeued.",
        "requeue=0",
        "on_usr2() {",
        '  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then',
        '    echo "meshpilot: SIGUSR2: the $MAX_REQUEUES requeue(s) are used; not requeueing' 
        ' (at the time limit the workers checkpoint on SIGTERM)"',
        "    return",
        "  fi",
        '  echo "meshpilot: SIGUSR2: asking the workers to checkpoint and stop, then requeueing"',
        "  requeue=1",
        '  scancel --signal=USR2 "$SLURM_JOB_ID"',
        "}",
        "trap on_usr2 USR2",
        "trap 'echo \"meshpilot: SIGTERM: the workers checkpoint and stop\"' TERM",
        "",
        "srun --nodes=\"$SLURM_JOB_NUM_NODES\" --ntasks-per-node=1 --kill-on-bad-exit=1 --unbuffered --open-mode=append \\",
        f"  --output={q(node_log)} \\",
        "  bash -c 'trap \"\" USR2; exec \"$@\"' meshpilot-node \\",
        '  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$NPROC_PER_NODE" \\',
        '  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" --max_restarts=0 \\',
        f'  -m {WORKER_MODULE} --job "$JOB_FILE" --run-dir "$RUN_DIR" &',
        "srun_pid=$!",
        "while :; do",
        '  wait "$srun_pid"; rc=$?',
        '  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi   # a trapped signal interrupted wait',
        "  break",
        "done",
        'wait "$srun_pid" 2>/dev/null; last=$?; [ "$last" -ne 127 ] && rc=$last',
        'echo "meshpilot: the job step ended with status $rc"',
        'if [ "$requeue" = 1 ]; then',
        '  latest=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || true)',
        '  if [ "$latest" != "$FINAL_CHECKPOINT" ]; then',
        '    echo "meshpilot: stopped at checkpoint ${latest:-none}; requeueing'
        ' (restart $((RESTARTS + 1)) of at most $MAX_REQUEUES)"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "  fi",
        "fi",
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


# --- talking to Slurm ---------------------------------------------------------------------------

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


@dataclass
class SlurmStatus:
    state: str                  # one of STATES
    slurm_state: str            # Slurm's own word, "" when unknown
    reason: str = ""
    exit_code: str = ""
    restarts: int = 0
    nodes: str = ""
    source: str = ""            # scontrol | squeue | sacct | ""

    def to_dict(self) -> dict[str, Any]:
        return dict(state=self.state, native_state=self.slurm_state, reason=self.reason, exit_code=self.exit_code,
                    restarts=self.restarts, nodes=self.nodes, source=self.source)


class SlurmClient:
    """sbatch / scontrol / squeue / sacct / scancel. ``runner(argv) -> CompletedProcess`` is replaceable."""

    def __init__(self, runner: Optional[Runner] = None):
        self.run = runner or _run

    def submit(self, script_path: str, *, chdir: Optional[str] = None) -> str:
        """``sbatch --parsable SCRIPT`` -> the job id. ConfigError (with sbatch's message) on refusal."""
        cmd = ["sbatch", "--parsable"] + ([f"--chdir={chdir}"] if chdir else []) + [script_path]
        try:
            r = self.run(cmd)
        except FileNotFoundError:
            raise ConfigError("--to", "slurm", reason="sbatch is not on PATH",
                              fix="run on a Slurm login node, or use --dry-run to write the script only") from None
        if r.returncode != 0:
            raise ConfigError("--to", "slurm", reason=f"sbatch refused the job: {(r.stderr or r.stdout).strip()}")
        job_id = r.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise ConfigError("--to", "slurm", reason=f"unexpected sbatch output {r.stdout!r}")
        return job_id

    def status(self, job_id: str) -> SlurmStatus:
        """The job's state: ``scontrol show job`` (live and recently ended jobs, MinJobAge), then
        ``squeue``, then ``sacct`` (needs accounting). ``unknown`` when none knows the job."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if r.returncode == 0 and "JobState=" in r.stdout:
            f = _fields(r.stdout)
            state, restarts = map_state(f.get("JobState", "")), int(f.get("Restarts", "0") or 0)
            if state == "pending" and restarts:
                state = "requeued"          # pending again after `scontrol requeue` (Slurm says PENDING)
            return SlurmStatus(state, f.get("JobState", ""), f.get("Reason", ""),
                               f.get("ExitCode", ""), restarts, f.get("NodeList", ""), "scontrol")
        r = self.run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T|%r"])
        if r.returncode == 0 and r.stdout.strip():
            state, _, reason = r.stdout.strip().splitlines()[0].partition("|")
            return SlurmStatus(map_state(state), state, reason, source="squeue")
        r = self.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State,ExitCode,Reason"])
        if r.returncode == 0 and r.stdout.strip():
            parts = r.stdout.strip().splitlines()[0].split("|") + ["", "", ""]
            return SlurmStatus(map_state(parts[0]), parts[0], parts[2], parts[1], source="sacct")
        return SlurmStatus("unknown", "", "no Slurm command knows this job (ended before MinJobAge and no accounting?)")

    def cancel(self, job_id: str) -> bool:
        """``scancel JOB``; True if Slurm accepted it. Idempotent: cancelling an ended job is not an error."""
        r = self.run(["scancel", str(job_id)])
        return r.returncode == 0

    def signal(self, job_id: str, sig: str = "USR2", *, batch: bool = True) -> bool:
        """``scancel --signal=SIG [--batch] JOB``: a preemption notice to the batch script (checkpoint + requeue)."""
        r = self.run(["scancel", f"--signal={sig}"] + (["--batch"] if batch else []) + [str(job_id)])
        return r.returncode == 0


def _fields(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` of ``scontrol -o`` (values without spaces; the ones read here have none)."""
    out: dict[str, str] = {}
    for tok in line.split():
        k, sep, v = tok.partition("=")
        if sep and k not in out:
            out[k] = v
    return out

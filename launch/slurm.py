"""Slurm: the sbatch script of one job (pure, byte-stable), and sbatch / scontrol / squeue / scancel.

Generation (:class:`SlurmSpec` -> :func:`sbatch_script`) is a pure function of plain data;
:class:`SlurmClient` runs the Slurm commands (a ``runner`` can be injected in tests).

Two modes (``SlurmSpec.mode``), one allocation of ``--nodes=N --ntasks-per-node=1``:

* ``torchrun`` (the default): one torchrun per node, below;
* ``ray``: Ray on Slurm, with the meshpilot controller as the driver, below that.

The script of the torchrun mode (the launcher conventions this project follows):

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

The script of the ray mode (the same header, exports, preemption trap and requeue tail):

* the Ray head on the first node of the allocation, ``srun --nodes=1 --ntasks=1 -w HEAD ray start
  --head --block --node-ip-address=HEAD_IP --port=P``: HEAD_IP is Slurm's address of the node
  (``NodeAddr``, resolved), P = 20000 + job id mod 20000 and the Ray client server's port
  P + 20000, so two jobs sharing a node do not collide; no dashboard, the dashboard agent on a
  free port; ``--num-gpus`` the GPUs per node, ``--num-cpus`` the allocation's CPUs per node
  (GPU ranks) or the workers per node (CPU workers: one slot each, as an embedded Ray has
  them). The script waits until the head's port answers, then starts ``ray start
  --address=HEAD_IP:P --block`` on every other node (one srun, ``--exclude=HEAD``) and waits
  until the cluster has N nodes (:func:`meshpilot.launch.ray_cluster.wait_for_nodes`);
* the driver is ``meshpilot run JOB --run-dir RUN_DIR --address HEAD_IP:P`` in the batch shell
  (on the first node; its output is the batch log): the controller's gang scheduling,
  restarts, out-of-memory handling and stop checkpoint are those of ``meshpilot run``;
* Ray's token authentication: a new random token per attempt in ``RUN_DIR/ray_auth_token``,
  created owner-only (0600) and handed to the head, the workers and the driver through
  ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (never on a command line or in the
  script); a ``RAY_AUTH_TOKEN`` or ``RAY_ADDRESS`` of the submitting shell is unset. The run
  directory must be on a file system every node shares (as checkpoints need anyway). Ray's
  GCS and node services listen on every interface (Ray's choice), with that token required;
* USR2 goes to the driver only (``kill -USR2``): the controller asks the workers to checkpoint
  and stop and ends ``cancelled`` (exit 3); the script then requeues as in the torchrun mode.
  The Ray processes run with USR2 ignored. Slurm's SIGTERM (scancel, the time limit, a
  preemption without a USR2 notice) reaches the driver and every Ray process at once: the run
  ends cancelled, and a stop checkpoint is not guaranteed (the ranks' Ray processes end with
  them), so the time limit's USR2 (``--signal-lead``) and ``train.checkpoint_every`` are what
  keep the progress;
* at the end (driver done, failed, cancelled) the script stops this job's Ray: SIGTERM to the
  tasks of its steps (``scancel --signal=TERM JOB``: the batch shell is not signalled; srun
  would SIGKILL its step on a SIGTERM of its own), the ``ray start --block`` of every node,
  which stops the node's Ray processes (the path ``ray stop`` takes, but limited to this job:
  ``ray stop`` would end every Ray of the user on the node, other jobs' included; Ray's drain
  on SIGTERM is off, as it would wait for the GCS, which gets the same SIGTERM). It waits for
  them at most 30 s, removes the head node's Ray temp dir and exits with the driver's status
  (0 succeeded, 1 failed, 3 cancelled, 4 out of memory). Every node's ``ray start --temp-dir``
  is ``${TMPDIR:-/tmp}/ray-<jobid>``: a job's Ray sessions and its address record stay apart
  from other jobs' and from /tmp/ray, where a plain ``ray.init()`` on the node would find the
  last ``ray start``'s cluster and try to join it. A job that Slurm ends (cancel, time limit)
  before the script does leaves these folders, as Ray's own sessions stay in /tmp/ray;
* logs: the batch log (driver) ``RUN_DIR/logs/slurm-<jobid>.out``, ``ray-head.log`` and
  ``ray-worker<i>.log`` (``ray start`` of the head and of the i-th other node), the ranks'
  ``rank<R>.log`` beside them, and the controller's ``RUN_DIR/controller.log``.

Every srun step gets the allocation's CPUs per task (``SRUN_CPUS_PER_TASK``: srun 22.05 to 23.02
no longer reads SLURM_CPUS_PER_TASK, and a step would get one CPU per task).

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
MODES = ("torchrun", "ray")      # one torchrun per node | Ray on Slurm, the meshpilot controller as the driver

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
    mode: str = "torchrun"            # one of MODES: torchrun per node, or Ray on Slurm (see the module's doc)
    ray_start_timeout_s: int = 300    # ray mode: the head must answer and all nodes join within this

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
        if self.mode not in MODES:
            raise ConfigError("--slurm-mode", self.mode, reason="not a Slurm launch mode", allowed=MODES)
        if self.ray_start_timeout_s < 1:
            raise ConfigError("--ray-start-timeout", self.ray_start_timeout_s, reason="must be >= 1 second")
        for c in self.comments:
            check_text("comment", c)
        for k, v in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
                raise ConfigError("env", k, reason="not a variable name")
            check_text(f"env {k}", v)


def sbatch_script(spec: SlurmSpec) -> str:
    """The sbatch script of ``spec`` (its mode: one torchrun per node, or Ray on Slurm): the same bytes
    for the same spec."""
    spec.check()
    body = _ray_body(spec) if spec.mode == "ray" else _torchrun_body(spec)
    return "\n".join(_header(spec) + body + _requeue_tail()) + "\n"


def _header(spec: SlurmSpec) -> list[str]:
    """What both modes share up to the launch: the #SBATCH directives, the script's variables, the exports."""
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

    exports = [("PYTHONUNBUFFERED", "1"), ("OMP_NUM_THREADS", str(spec.omp_threads))]
    if spec.mode == "torchrun":
        exports.append(("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(spec.signal_lead_s)))
    if not spec.gpus_per_node:
        exports.append(("DS_ACCELERATOR", "cpu"))
    exports += list(spec.env)

    title = "" if spec.mode == "torchrun" else " (Ray on Slurm)"
    lines = ["#!/bin/bash", f"# meshpilot submit --to slurm{title}: {safe_job_name(spec.name)}"]
    lines += [f"# {c}" for c in spec.comments]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += [
        "set -u",
        "",
        f"RUN_DIR={q(run_dir)}",
        f"JOB_FILE={q(spec.job_file)}",
        f"PYTHON={q(spec.python)}",
    ]
    if spec.mode == "torchrun":
        lines.append(f"NPROC_PER_NODE={spec.procs_per_node}")
    else:
        # Ray's resources per node: the GPUs, and the CPUs of the allocation (GPU ranks) or one slot per
        # CPU worker (as an embedded Ray has them, so the gang spreads over the nodes as planned)
        ray_cpus = spec.procs_per_node if not spec.gpus_per_node else spec.cpus_per_task
        lines += [f"RAY_NUM_CPUS={ray_cpus}", f"RAY_NUM_GPUS={spec.gpus_per_node}"]
    lines += [
        f"FINAL_CHECKPOINT=step_{spec.final_step:08d}",
        f"MAX_REQUEUES={spec.max_requeues}",
        "",
    ]
    lines += [f"export {k}={q(v)}" for k, v in exports]
    return lines


def _preemption(*, what: str, whom: str, notify: str, at_limit: str, on_term: str) -> list[str]:
    """The batch shell's traps, both modes: USR2 (before the time limit, or a preemption notice) runs
    ``notify`` (asking ``whom`` to checkpoint and stop; ``what`` says what follows) and marks the job
    for requeueing while the requeue budget lasts (``at_limit``: what happens once it is used);
    SIGTERM is only logged (``on_term``: Slurm sends it to the job's processes itself)."""
    return [
        "",
        "# USR2 (before the time limit, or `scancel --signal=USR2 --batch` as a preemption notice):",
        f"# {what}; then the job is requeued.",
        "requeue=0",
        "on_usr2() {",
        '  if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then',
        f'    echo "meshpilot: SIGUSR2: the $MAX_REQUEUES requeue(s) are used; not requeueing ({at_limit})"',
        "    return",
        "  fi",
        f'  echo "meshpilot: SIGUSR2: asking {whom} to checkpoint and stop, then requeueing"',
        "  requeue=1",
        f"  {notify}",
        "}",
        "trap on_usr2 USR2",
        f"trap 'echo \"meshpilot: SIGTERM: {on_term}\"' TERM",
    ]


def _wait_for(pid_var: str) -> list[str]:
    """Wait for the background process ``$pid_var`` through trapped signals; its status in ``rc``."""
    return [
        "while :; do",
        f'  wait "${pid_var}"; rc=$?',
        f'  if [ "$rc" -gt 128 ] && kill -0 "${pid_var}" 2>/dev/null; then continue; fi'
        "   # a trapped signal interrupted wait",
        "  break",
        "done",
        f'wait "${pid_var}" 2>/dev/null; last=$?; [ "$last" -ne 127 ] && rc=$last',
    ]


def _requeue_tail() -> list[str]:
    """Both modes: report the job step's status, requeue after a USR2 unless the final checkpoint was
    reached, else exit with that status."""
    return [
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


def _srun(q_log: str, nodes: str, *extra: str) -> list[str]:
    """The head of an srun line of one task per node, its output appended to ``q_log`` (quoted)."""
    return [f"srun {nodes} {' '.join(extra) + ' ' if extra else ''}--kill-on-bad-exit=1 --unbuffered "
            "--open-mode=append \\",
            f"  --output={q_log} \\",
            "  bash -c 'trap \"\" USR2; exec \"$@\"' meshpilot-node \\"]


def _torchrun_body(spec: SlurmSpec) -> list[str]:
    q = shlex.quote
    node_log = q(_pattern_path(spec.run_dir.rstrip("/") or "/") + "/logs/node%n.log")
    return [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 40000))",
        "export MASTER_ADDR MASTER_PORT",
        *_attempt_lines("rendezvous $MASTER_ADDR:$MASTER_PORT"),
        *_preemption(what="every worker checkpoints after its current step and exits", whom="the workers",
                     notify='scancel --signal=USR2 "$SLURM_JOB_ID"',
                     at_limit="at the time limit the workers checkpoint on SIGTERM",
                     on_term="the workers checkpoint and stop"),
        "",
        *_srun(node_log, '--nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1'),
        '  "$PYTHON" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$NPROC_PER_NODE" \\',
        '  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" --max_restarts=0 \\',
        f'  -m {WORKER_MODULE} --job "$JOB_FILE" --run-dir "$RUN_DIR" &',
        "srun_pid=$!",
        *_wait_for("srun_pid"),
    ]


def _attempt_lines(where: str) -> list[str]:
    return [
        '[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"   # srun 22.05-23.02',
        "RESTARTS=${SLURM_RESTART_COUNT:-0}",
        'mkdir -p "$RUN_DIR/logs"',
        f'echo "meshpilot: job $SLURM_JOB_ID attempt $((RESTARTS + 1)) on $SLURM_JOB_NODELIST; {where}; run dir $RUN_DIR"',
    ]


def _ray_body(spec: SlurmSpec) -> list[str]:
    q = shlex.quote
    logs = _pattern_path(spec.run_dir.rstrip("/") or "/") + "/logs/"
    head_log, worker_log = q(logs + "ray-head.log"), q(logs + "ray-worker%n.log")
    ray = '"$PYTHON" -m ray.scripts.scripts start'
    node_opts = ('--num-cpus="$RAY_NUM_CPUS" --num-gpus="$RAY_NUM_GPUS" --dashboard-agent-listen-port=0 '
                 '--temp-dir="$RAY_TMP" --disable-usage-stats')
    return [
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "HEAD_ADDR=$(scontrol show node \"$HEAD_NODE\" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')",
        "HEAD_IP=$(getent ahostsv4 \"${HEAD_ADDR:-$HEAD_NODE}\" | awk 'NR == 1 {print $1}')",
        "RAY_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "RAY_CLIENT_PORT=$((RAY_PORT + 20000))",
        "# this job's Ray files, sessions and `ray start`'s address record (a plain ray.init() on the node would",
        "# join the cluster recorded in the default /tmp/ray/ray_current_cluster)",
        'RAY_TMP="${TMPDIR:-/tmp}/ray-$SLURM_JOB_ID"',
        *_attempt_lines("Ray head $HEAD_NODE ${HEAD_IP:-?}:$RAY_PORT"),
        "",
        "# Ray's token authentication: a new token per attempt, in an owner-only file of the (shared) run dir",
        "unset RAY_AUTH_TOKEN RAY_ADDRESS",
        'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$RUN_DIR/ray_auth_token"',
        "# a node stops at once on SIGTERM (Ray's drain before it would wait for the GCS, which gets the same SIGTERM)",
        "export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0",
        'rm -f "$RAY_AUTH_TOKEN_PATH"',
        "(umask 077 && \"$PYTHON\" -c 'import secrets; print(secrets.token_hex(32))' > \"$RAY_AUTH_TOKEN_PATH\")"
        " || exit 1",
        "driver_pid=",
        "ray_pids=",
        *_preemption(what="the driver (the controller) has every worker checkpoint after its current step and stop",
                     whom="the controller", notify='if [ -n "$driver_pid" ]; then kill -USR2 "$driver_pid"; fi',
                     at_limit="at the time limit Slurm ends the job; its last periodic checkpoint stands",
                     on_term="the controller, the workers and Ray stop (a stop checkpoint needs USR2 first)"),
        "",
        "start_ray() {",
        '  if [ -z "$HEAD_IP" ]; then echo "meshpilot: cannot resolve the address of $HEAD_NODE"; return 1; fi',
        *["  " + ln for ln in _srun(head_log, '--nodes=1 --ntasks=1 -w "$HEAD_NODE"')],
        f'    {ray} --head --block --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \\',
        f'    --ray-client-server-port="$RAY_CLIENT_PORT" --include-dashboard=false {node_opts} &',
        "  ray_pids=$!",
        f"  local deadline=$((SECONDS + {spec.ray_start_timeout_s}))",
        "  until timeout 5 bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' \"$HEAD_IP\" \"$RAY_PORT\" 2>/dev/null; do",
        '    if ! kill -0 $ray_pids 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then',
        '      echo "meshpilot: the Ray head did not answer at $HEAD_IP:$RAY_PORT"; return 1',
        "    fi",
        "    sleep 1",
        "  done",
        '  if [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; then',
        *["    " + ln for ln in _srun(worker_log, '--nodes=$((SLURM_JOB_NUM_NODES - 1))',
                                      '--ntasks=$((SLURM_JOB_NUM_NODES - 1)) --ntasks-per-node=1 --exclude="$HEAD_NODE"')],
        f'      {ray} --address="$HEAD_IP:$RAY_PORT" --block {node_opts} &',
        '    ray_pids="$ray_pids $!"',
        "  fi",
        "  # every node joined, or fail as soon as a Ray step ends",
        '  "$PYTHON" -m meshpilot.launch.ray_cluster --wait-nodes "$SLURM_JOB_NUM_NODES" '
        '--timeout $((deadline - SECONDS)) "$HEAD_IP:$RAY_PORT" &',
        "  local waiter=$!",
        '  while kill -0 "$waiter" 2>/dev/null; do',
        "    for p in $ray_pids; do",
        '      if ! kill -0 "$p" 2>/dev/null; then',
        '        kill "$waiter" 2>/dev/null; echo "meshpilot: a Ray step ended while the cluster started"; return 1',
        "      fi",
        "    done",
        "    sleep 1",
        "  done",
        '  wait "$waiter"',
        "}",
        "",
        "# SIGTERM to the tasks of this job's steps, the `ray start --block` of every node, which stop their node's",
        "# Ray processes (srun itself would SIGKILL its step on a SIGTERM; the batch shell is not signalled)",
        "stop_ray() {",
        '  [ -n "$ray_pids" ] || return 0',
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        "  for _ in $(seq 60); do kill -0 $ray_pids 2>/dev/null || break; sleep 0.5; done",
        '  if kill -0 $ray_pids 2>/dev/null; then echo "meshpilot: Ray still stopping after 30 s: Slurm ends it with the job"',
        '  else echo "meshpilot: Ray stopped"; rm -rf "$RAY_TMP"; fi',
        "}",
        "",
        "rc=1",
        'if start_ray && [ "$requeue" = 0 ]; then',
        '  "$PYTHON" -m meshpilot.orchestrator.cli run "$JOB_FILE" --run-dir "$RUN_DIR" --address "$HEAD_IP:$RAY_PORT" \\',
        "    --no-progress &",
        "  driver_pid=$!",
        *["  " + ln for ln in _wait_for("driver_pid")],
        'elif [ "$requeue" = 1 ]; then',
        "  rc=0",
        "fi",
        "stop_ray",
    ]


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

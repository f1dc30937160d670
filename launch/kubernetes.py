"""Kubernetes: the manifests of one job (pure, byte-stable), their check against the official CRD
schemas, and submission / status / cancel / logs through the ``kubernetes`` Python client.

Kinds (:func:`manifests`; the first document is always the ConfigMap holding the resolved job):

* ``trainjob`` (default): Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1) that
  refers to a ClusterTrainingRuntime (``torch-distributed`` unless told otherwise) by
  ``runtimeRef``. ``trainer`` sets image, ``torchrun -m meshpilot.orchestrator.worker`` (torchrun
  reads the runtime's PET_NNODES/PET_NPROC_PER_NODE/PET_NODE_RANK/PET_MASTER_ADDR/PET_MASTER_PORT),
  env, numNodes, numProcPerNode, resourcesPerNode; ``runtimePatches`` (manager
  ``meshpilot.io/submit``) patches the runtime's ``node`` pod: volumes and mounts, tolerations,
  node selector, a security context and the termination grace period;
* ``pytorchjob``: PyTorchJob v1 (training-operator): Master + Worker replicas, container
  ``pytorch``, ``torchrun --nnodes --nproc_per_node --node_rank=$(RANK)
  --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)`` (variables the operator injects);
* ``mpijob``: MPIJob v2beta1: a launcher running ``mpirun`` (the worker finds rank 0 through
  mpi4py) and ``nodes`` workers running sshd, ``slotsPerWorker`` = workers per node;
* ``rayjob``: KubeRay RayJob (ray.io/v1): a head group and one worker group of ``nodes`` pods; the
  entrypoint is ``meshpilot run`` (the Ray gang controller with restarts) inside the cluster.

Every pod that trains: ``resources.limits["nvidia.com/gpu"]`` (requests equal to limits), CPU and
memory, a memory-backed emptyDir at /dev/shm (``shm_size``), the preset's tolerations and node
selector, the ConfigMap at /etc/meshpilot, the run directory's volume (a PersistentVolumeClaim with
``--pvc`` or the preset's ``kubernetes.checkpoint_pvc``, else an emptyDir, which loses checkpoints
with the pod), ``privileged: false`` and
``allowPrivilegeEscalation: false``, and a termination grace period for the checkpoint the worker
writes on SIGTERM. The Kueue label ``kueue.x-k8s.io/queue-name`` is set when a queue is given
(``--queue`` or the preset's ``kubernetes.queue``).
Commands are argument lists (no shell), except RayJob's entrypoint string, built with shlex.

Checks (:func:`validate`): a custom resource against its CRD's ``openAPIV3Schema`` with jsonschema,
made strict the way ``kubectl apply --validate=strict`` is (an object schema that lists its
properties and does not preserve unknown fields rejects others), plus metadata (name,
namespace and labels in Kubernetes' syntax). The pod templates inside PyTorchJob, MPIJob and
RayJob, and TrainJob's pod patches, are validated by those schemas (they embed the core PodSpec
schema). Not validated: CEL rules (``x-kubernetes-validations``), the ConfigMap beyond its
metadata and string data, and the ClusterTrainingRuntime the TrainJob names (it lives in the cluster).
"""
from __future__ import annotations

import copy
import functools
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from meshpilot.orchestrator.errors import ConfigError

WORKER_MODULE = "meshpilot.orchestrator.worker"
JOB_MOUNT = "/etc/meshpilot"
MANAGER = "meshpilot.io/submit"
RUN_LABEL = "meshpilot.io/run"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GRACE_S = 300

# kind -> (apiVersion, Kind, plural, CRD file, version)
KINDS = {
    "trainjob": ("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs", "trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    "pytorchjob": ("kubeflow.org/v1", "PyTorchJob", "pytorchjobs", "kubeflow.org_pytorchjobs.yaml", "v1"),
    "mpijob": ("kubeflow.org/v2beta1", "MPIJob", "mpijobs", "kubeflow.org_mpijobs.yaml", "v2beta1"),
    "rayjob": ("ray.io/v1", "RayJob", "rayjobs", "ray.io_rayjobs.yaml", "v1"),
}
_BY_KIND = {v[1]: k for k, v in KINDS.items()}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def k8s_name(run_id: str, limit: int = 50) -> str:
    """A DNS-1123 label from a run id (lowercase, '-' for anything else, at most ``limit`` characters,
    keeping the trailing hash)."""
    s = re.sub(r"[^a-z0-9-]+", "-", run_id.lower())
    s = re.sub(r"-+", "-", s).strip("-") or "job"
    if len(s) > limit:
        head, _, tail = s.rpartition("-")
        s = (head[: limit - len(tail) - 1].rstrip("-") + "-" + tail) if head else s[:limit]
    if not s[0].isalpha():
        s = "j" + s[: limit - 1]
    return s


@dataclass(frozen=True)
class K8sSpec:
    name: str                       # run id (made a DNS label by k8s_name)
    namespace: str
    image: str
    job_text: str                   # the resolved job YAML (ConfigMap data)
    run_dir: str                    # inside the pods; its parent is the volume's mount path
    nodes: int
    procs_per_node: int
    gpus_per_node: int              # 0: CPU workers
    cpus_per_node: int
    memory_gib: int
    omp_threads: int = 1
    shm_size: str = "16Gi"
    tolerations: tuple[dict, ...] = ()
    node_selector: Optional[dict] = None
    queue: Optional[str] = None
    pvc: Optional[str] = None
    runtime: str = "torch-distributed"
    queue_key: str = "--queue"      # where queue and pvc came from, for errors (the CLI or the cluster preset)
    pvc_key: str = "--pvc"
    comments: tuple[str, ...] = ()

    @property
    def kname(self) -> str:
        return k8s_name(self.name)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def check(self) -> None:
        if not self.image:
            raise ConfigError("--image", reason="missing: no image given and the cluster preset has no kubernetes.image",
                              fix="--image REGISTRY/IMAGE:TAG (an image with meshpilot installed)")
        if not self.run_dir.startswith("/") or self.run_dir.rstrip("/").count("/") < 2:
            raise ConfigError("--run-dir", self.run_dir, reason="must be an absolute path below a mount folder, "
                              "e.g. /checkpoints/<run id>")
        if not _DNS_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ConfigError("--namespace", self.namespace, reason="not a Kubernetes namespace name (DNS-1123 label)")
        if self.queue is not None and (not _LABEL_VALUE.match(self.queue) or len(self.queue) > 63):
            raise ConfigError(self.queue_key, self.queue, reason="not a valid label value (Kueue LocalQueue name)")
        if self.pvc is not None and (not _DNS_SUBDOMAIN.match(self.pvc) or len(self.pvc) > 253):
            raise ConfigError(self.pvc_key, self.pvc, reason="not a PersistentVolumeClaim name")
        if not _DNS_SUBDOMAIN.match(self.runtime):
            raise ConfigError("--runtime", self.runtime, reason="not a ClusterTrainingRuntime name")
        if not _QUANTITY.match(self.shm_size):
            raise ConfigError("cluster.kubernetes.shm_size", self.shm_size, reason="not a Kubernetes quantity",
                              fix="e.g. 16Gi")
        for t in self.tolerations:
            bad = set(t) - {"key", "operator", "value", "effect", "tolerationSeconds"}
            if bad:
                raise ConfigError("cluster.kubernetes.tolerations", t, reason=f"unknown field(s) {sorted(bad)}",
                                  allowed=["key", "operator", "value", "effect", "tolerationSeconds"])


# --- the pieces every training pod has ------------------------------------------------------------

def _labels(spec: K8sSpec, *, queue: bool) -> dict[str, str]:
    labels = {"app.kubernetes.io/managed-by": "meshpilot", "app.kubernetes.io/name": "meshpilot",
              RUN_LABEL: spec.kname}
    if queue and spec.queue:
        labels[QUEUE_LABEL] = spec.queue
    return labels


def _metadata(spec: K8sSpec, name: str, *, queue: bool = True) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": spec.namespace, "labels": _labels(spec, queue=queue)}
    if spec.comments:
        md["annotations"] = {"meshpilot.io/plan": " | ".join(spec.comments)}
    return md


def _mount_root(spec: K8sSpec) -> str:
    return os.path.dirname(spec.run_dir.rstrip("/"))


def _volumes(spec: K8sSpec) -> list[dict[str, Any]]:
    run = {"persistentVolumeClaim": {"claimName": spec.pvc}} if spec.pvc else {"emptyDir": {}}
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
            {"name": "job", "configMap": {"name": f"{spec.kname}-job"}},
            {"name": "run", **run}]


def _mounts() -> list[dict[str, Any]]:
    return [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True}]


def _mounts_with_run(spec: K8sSpec) -> list[dict[str, Any]]:
    return _mounts() + [{"name": "run", "mountPath": _mount_root(spec)}]


def _security() -> dict[str, Any]:
    return {"privileged": False, "allowPrivilegeEscalation": False}


def _resources(spec: K8sSpec) -> dict[str, Any]:
    res: dict[str, Any] = {"cpu": str(spec.cpus_per_node), "memory": f"{spec.memory_gib}Gi"}
    if spec.gpus_per_node:
        res["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return {"limits": dict(res), "requests": dict(res)}


def _env(spec: K8sSpec) -> list[dict[str, str]]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "OMP_NUM_THREADS", "value": str(spec.omp_threads)}]
    if not spec.gpus_per_node:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    return env


def _pod_extras(spec: K8sSpec) -> dict[str, Any]:
    extras: dict[str, Any] = {"terminationGracePeriodSeconds": GRACE_S}
    if spec.tolerations:
        extras["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.node_selector:
        extras["nodeSelector"] = dict(spec.node_selector)
    return extras


def _worker_args(spec: K8sSpec) -> list[str]:
    return ["-m", WORKER_MODULE, "--job", f"{JOB_MOUNT}/job.yaml", "--run-dir", spec.run_dir]


def _train_container(spec: K8sSpec, name: str, command: list[str], args: list[str]) -> dict[str, Any]:
    return {"name": name, "image": spec.image, "command": command, "args": args, "env": _env(spec),
            "resources": _resources(spec), "volumeMounts": _mounts_with_run(spec), "securityContext": _security()}


def _pod_template(spec: K8sSpec, containers: list[dict[str, Any]], *, restart: Optional[str] = None) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": containers, "volumes": _volumes(spec), **_pod_extras(spec)}
    if restart:
        pod["restartPolicy"] = restart
    return {"metadata": {"labels": _labels(spec, queue=False)}, "spec": pod}


# --- manifests ---------------------------------------------------------------------------------------

def configmap(spec: K8sSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(spec, f"{spec.kname}-job", queue=False),
            "data": {"job.yaml": spec.job_text}}


def trainjob(spec: K8sSpec) -> dict[str, Any]:
    pod_patch = {"volumes": _volumes(spec), **_pod_extras(spec),
                 "containers": [{"name": "node", "volumeMounts": _mounts_with_run(spec), "securityContext": _security()}]}
    return {
        "apiVersion": KINDS["trainjob"][0], "kind": "TrainJob", "metadata": _metadata(spec, spec.kname),
        "spec": {
            "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": spec.runtime},
            "trainer": {"image": spec.image, "command": ["torchrun"], "args": _worker_args(spec), "env": _env(spec),
                        "numNodes": spec.nodes, "numProcPerNode": spec.procs_per_node,
                        "resourcesPerNode": _resources(spec)},
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": "node", "template": {"spec": {"template": {
                    "metadata": {"labels": _labels(spec, queue=False)}, "spec": pod_patch}}}}]}}}}],
        },
    }


def pytorchjob(spec: K8sSpec) -> dict[str, Any]:
    args = [f"--nnodes={spec.nodes}", f"--nproc_per_node={spec.procs_per_node}", "--node_rank=$(RANK)",
            "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)", "--max_restarts=0"] + _worker_args(spec)
    replica = lambda n: {"replicas": n, "restartPolicy": "OnFailure",  # noqa: E731
                         "template": _pod_template(spec, [_train_container(spec, "pytorch", ["torchrun"], args)])}
    specs = {"Master": replica(1)}
    if spec.nodes > 1:
        specs["Worker"] = replica(spec.nodes - 1)
    return {"apiVersion": KINDS["pytorchjob"][0], "kind": "PyTorchJob", "metadata": _metadata(spec, spec.kname),
            "spec": {"nprocPerNode": str(spec.procs_per_node), "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
                     "pytorchReplicaSpecs": specs}}


def mpijob(spec: K8sSpec) -> dict[str, Any]:
    env = [f"{e['name']}={e['value']}" for e in _env(spec)]
    mpirun_args = ["-np", str(spec.world_size), "--map-by", f"ppr:{spec.procs_per_node}:node", "--bind-to", "none"]
    for e in env:
        mpirun_args += ["-x", e]
    mpirun_args += ["python", *_worker_args(spec)]
    launcher = {"name": "launcher", "image": spec.image, "command": ["mpirun"], "args": mpirun_args,
                "env": [{"name": "OMPI_ALLOW_RUN_AS_ROOT", "value": "1"},
                        {"name": "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "value": "1"}],
                "resources": {"limits": {"cpu": "1", "memory": "2Gi"}, "requests": {"cpu": "1", "memory": "2Gi"}},
                "securityContext": _security()}
    worker = _train_container(spec, "worker", ["/usr/sbin/sshd"], ["-De"])
    launcher_tpl = {"metadata": {"labels": _labels(spec, queue=False)},
                    "spec": {"containers": [launcher], **({"tolerations": [dict(t) for t in spec.tolerations]}
                                                          if spec.tolerations else {})}}
    return {"apiVersion": KINDS["mpijob"][0], "kind": "MPIJob", "metadata": _metadata(spec, spec.kname),
            "spec": {"slotsPerWorker": spec.procs_per_node, "mpiImplementation": "OpenMPI",
                     "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3},
                     "mpiReplicaSpecs": {
                         "Launcher": {"replicas": 1, "restartPolicy": "OnFailure", "template": launcher_tpl},
                         "Worker": {"replicas": spec.nodes, "restartPolicy": "OnFailure",
                                    "template": _pod_template(spec, [worker])}}}}


def rayjob(spec: K8sSpec) -> dict[str, Any]:
    entrypoint = shlex.join(["meshpilot", "run", f"{JOB_MOUNT}/job.yaml", "--run-dir", spec.run_dir, "--no-progress"])
    head = {"name": "ray-head", "image": spec.image, "volumeMounts": _mounts_with_run(spec), "securityContext": _security(),
            "resources": {"limits": {"cpu": "2", "memory": "8Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}},
            "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}]}
    worker = {"name": "ray-worker", "image": spec.image, "env": _env(spec), "resources": _resources(spec),
              "volumeMounts": _mounts_with_run(spec), "securityContext": _security()}
    head_params = {"dashboard-host": "0.0.0.0", "num-gpus": "0"}
    return {"apiVersion": KINDS["rayjob"][0], "kind": "RayJob", "metadata": _metadata(spec, spec.kname),
            "spec": {"entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
                     "submissionMode": "K8sJobMode",
                     "rayClusterSpec": {
                         "headGroupSpec": {"rayStartParams": head_params,
                                           "template": _pod_template(spec, [head])},
                         "workerGroupSpecs": [{"groupName": "train", "replicas": spec.nodes, "minReplicas": spec.nodes,
                                               "maxReplicas": spec.nodes, "rayStartParams": {},
                                               "template": _pod_template(spec, [worker])}]}}}


_BUILD = {"trainjob": trainjob, "pytorchjob": pytorchjob, "mpijob": mpijob, "rayjob": rayjob}


def manifests(spec: K8sSpec, kind: str = "trainjob") -> list[dict[str, Any]]:
    """[ConfigMap with the job, the job's custom resource]."""
    if kind not in _BUILD:
        raise ConfigError("--kind", kind, allowed=list(_BUILD))
    spec.check()
    return [configmap(spec), _BUILD[kind](spec)]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order built (byte-stable)."""
    import yaml
    return "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=120) for d in docs)


# --- validation ----------------------------------------------------------------------------------------

def crd_dir() -> Optional[Path]:
    """Where the official CRD YAMLs are: MESHPILOT_K8S_CRDS, else ``shared/k8s-crds`` beside a source
    checkout of meshpilot (where this project's CI keeps them); None if neither exists."""
    beside_checkout = Path(__file__).resolve().parents[1].parent / "shared" / "k8s-crds"
    for p in (os.environ.get("MESHPILOT_K8S_CRDS"), str(beside_checkout)):
        if p and Path(p, KINDS["trainjob"][3]).is_file():
            return Path(p)
    return None


@functools.lru_cache(maxsize=None)
def _schema(crd_file: str, version: str) -> dict[str, Any]:
    import yaml
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(crd_file) as f:
        crd = yaml.load(f, Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _strict(copy.deepcopy(v["schema"]["openAPIV3Schema"]))
    raise ConfigError("CRD", crd_file, reason=f"has no version {version}")


def _strict(s: Any) -> Any:
    """Close every object schema that lists its properties (what the API server prunes, and
    ``--validate=strict`` rejects), unless it preserves unknown fields."""
    if isinstance(s, dict):
        for k, v in list(s.items()):
            if k in ("properties", "patternProperties", "definitions"):
                for sub in v.values():
                    _strict(sub)
            elif isinstance(v, (dict, list)):
                _strict(v)
        if ("properties" in s and "additionalProperties" not in s
                and not s.get("x-kubernetes-preserve-unknown-fields")):
            s["additionalProperties"] = False
    elif isinstance(s, list):
        for x in s:
            _strict(x)
    return s


def _metadata_errors(obj: dict[str, Any]) -> list[str]:
    errs = []
    md = obj.get("metadata")
    if not isinstance(md, dict):
        return ["metadata: missing"]
    name = md.get("name")
    if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name) or len(name) > 253:
        errs.append(f"metadata.name: {name!r} is not a DNS-1123 subdomain")
    ns = md.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not _DNS_LABEL.match(ns) or len(ns) > 63):
        errs.append(f"metadata.namespace: {ns!r} is not a DNS-1123 label")
    for where, labels in (("metadata.labels", md.get("labels") or {}),):
        if not isinstance(labels, dict):
            errs.append(f"{where}: must be a mapping")
            continue
        for k, v in labels.items():
            prefix, _, base = str(k).rpartition("/")
            if (prefix and (not _DNS_SUBDOMAIN.match(prefix) or len(prefix) > 253)) or not _LABEL_NAME.match(base) \
                    or len(base) > 63:
                errs.append(f"{where}: key {k!r} is not a label name")
            if not isinstance(v, str) or not _LABEL_VALUE.match(v) or len(v) > 63:
                errs.append(f"{where}[{k!r}]: value {v!r} is not a label value")
    return errs


def validate(obj: dict[str, Any], crds: Optional[Path] = None) -> list[str]:
    """Problems of one manifest ([] when valid): its metadata, and for a custom resource its CRD schema
    (strict). A ConfigMap is checked for string data only. Raises ConfigError when the CRD files are missing."""
    errs = _metadata_errors(obj)
    kind = obj.get("kind")
    if kind == "ConfigMap":
        if obj.get("apiVersion") != "v1":
            errs.append("apiVersion: a ConfigMap is v1")
        data = obj.get("data", {})
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            errs.append("data: must map strings to strings")
        return errs
    if kind not in _BY_KIND:
        return errs + [f"kind: {kind!r} is not one of {sorted(_BY_KIND)} or ConfigMap"]
    api, _, _, crd_file, version = KINDS[_BY_KIND[kind]]
    if obj.get("apiVersion") != api:
        errs.append(f"apiVersion: {obj.get('apiVersion')!r}, the CRD serves {api}")
    crds = crds or crd_dir()
    if crds is None:
        raise ConfigError("MESHPILOT_K8S_CRDS", reason="the official CRD YAMLs are not found",
                          fix="set MESHPILOT_K8S_CRDS to a folder holding the official CRD YAMLs")
    import jsonschema
    validator = jsonschema.Draft7Validator(_schema(str(Path(crds) / crd_file), version))
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        errs.append(f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}")
    return errs


def validate_all(docs: list[dict[str, Any]], crds: Optional[Path] = None) -> None:
    """ConfigError listing every problem of ``docs``; the CRD check is skipped when no CRD folder is found."""
    crds = crds or crd_dir()
    problems = []
    for d in docs:
        if crds is None and d.get("kind") != "ConfigMap":
            problems += [f"{d.get('kind')}: {e}" for e in _metadata_errors(d)]
            continue
        problems += [f"{d.get('kind')}: {e}" for e in validate(d, crds)]
    if problems:
        raise ConfigError("manifest", reason="fails its schema: " + "; ".join(problems[:10]))


# --- the API -------------------------------------------------------------------------------------------

# status.conditions types (training-operator v1, Trainer v2) -> state; checked in this order
_CONDITIONS = (("Succeeded", "succeeded"), ("Complete", "succeeded"), ("Failed", "failed"),
               ("Suspended", "suspended"), ("Restarting", "running"), ("Running", "running"), ("Created", "pending"))
_RAY_JOB = {"PENDING": "pending", "RUNNING": "running", "STOPPED": "cancelled", "SUCCEEDED": "succeeded",
            "FAILED": "failed"}


def map_status(kind: str, status: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A custom resource's ``status`` -> {state, native_state, reason}."""
    status = status or {}
    if kind == "RayJob":
        js, ds = status.get("jobStatus", ""), status.get("jobDeploymentStatus", "")
        reason = status.get("reason", "") or status.get("message", "")
        state = _RAY_JOB.get(js, "pending" if ds in ("", "Initializing", "Waiting") else "running")
        if ds == "Failed" and js not in ("SUCCEEDED",):
            state = "failed"
        if "DeadlineExceeded" in str(status.get("reason", "")):
            state = "timeout"
        return dict(state=state, native_state=f"{ds}/{js}".strip("/"), reason=reason)
    conds = {c.get("type"): c for c in status.get("conditions") or [] if str(c.get("status")) == "True"}
    for ctype, state in _CONDITIONS:
        if ctype in conds:
            reason = str(conds[ctype].get("reason", "") or "")
            if state == "failed" and "DeadlineExceeded" in reason:
                state = "timeout"
            if state == "failed" and "OOMKilled" in str(conds[ctype].get("message", "")):
                state = "out_of_memory"
            if state == "suspended" and conds[ctype].get("reason") in (None, "", "Suspended"):
                state = "pending"        # Kueue admits a suspended job when its quota allows
            return dict(state=state, native_state=ctype, reason=reason)
    return dict(state="pending", native_state="", reason="no conditions yet")


class KubeClient:
    """Create / read / delete the manifests through the kubernetes client. ``core`` is a CoreV1Api and
    ``custom`` a CustomObjectsApi (tests pass fakes)."""

    def __init__(self, core: Any, custom: Any):
        self.core, self.custom = core, custom

    @classmethod
    def from_config(cls, context: Optional[str] = None) -> "KubeClient":
        try:
            from kubernetes import client, config
        except ImportError:
            raise ConfigError("--to", "k8s", reason="the kubernetes package is not installed",
                              fix="pip install kubernetes") from None
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
                config.load_incluster_config()
            else:
                config.load_kube_config(context=context)
        except Exception as e:
            raise ConfigError("kubeconfig", context or os.environ.get("KUBECONFIG", "~/.kube/config"),
                              reason=f"cannot load it: {e}",
                              fix="configure kubectl (KUBECONFIG), or use --dry-run and `kubectl apply -f`") from None
        return cls(client.CoreV1Api(), client.CustomObjectsApi())

    @staticmethod
    def _ref(obj: dict[str, Any]) -> dict[str, str]:
        group, _, version = obj["apiVersion"].rpartition("/")
        kind = obj["kind"]
        return dict(group=group, version=version, kind=kind, plural=KINDS[_BY_KIND[kind]][2],
                    namespace=obj["metadata"]["namespace"], name=obj["metadata"]["name"])

    def submit(self, docs: list[dict[str, Any]]) -> dict[str, str]:
        """Create the ConfigMap (replacing an older one of the same name) and the custom resource."""
        cm, job = docs[0], docs[1]
        ns = cm["metadata"]["namespace"]
        try:
            self.core.create_namespaced_config_map(ns, cm)
        except Exception as e:
            if getattr(e, "status", None) != 409:
                raise ConfigError("--to", "k8s", reason=f"cannot create ConfigMap {cm['metadata']['name']}: {e}") from None
            self.core.replace_namespaced_config_map(cm["metadata"]["name"], ns, cm)
        ref = self._ref(job)
        try:
            self.custom.create_namespaced_custom_object(ref["group"], ref["version"], ns, ref["plural"], job)
        except Exception as e:
            if getattr(e, "status", None) == 409:
                raise ConfigError("--to", "k8s", reason=f"{ref['kind']} {ns}/{ref['name']} already exists",
                                  fix="--cancel it first, or change the job") from None
            raise ConfigError("--to", "k8s", reason=f"cannot create {ref['kind']} {ns}/{ref['name']}: {e}") from None
        return ref

    def status(self, ref: dict[str, str]) -> dict[str, Any]:
        try:
            obj = self.custom.get_namespaced_custom_object(ref["group"], ref["version"], ref["namespace"],
                                                           ref["plural"], ref["name"])
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return dict(state="unknown", native_state="NotFound", reason="deleted (cancelled or expired)")
            raise
        return map_status(ref["kind"], obj.get("status"))

    def cancel(self, ref: dict[str, str]) -> bool:
        """Delete the custom resource (its pods get SIGTERM and the grace period) and the ConfigMap."""
        gone = False
        try:
            self.custom.delete_namespaced_custom_object(ref["group"], ref["version"], ref["namespace"], ref["plural"],
                                                        ref["name"], body={"propagationPolicy": "Foreground"})
        except Exception as e:
            if getattr(e, "status", None) != 404:
                raise
            gone = True
        try:
            self.core.delete_namespaced_config_map(f"{ref['name']}-job", ref["namespace"])
        except Exception as e:
            if getattr(e, "status", None) != 404:
                raise
        return not gone

    def logs(self, ref: dict[str, str]) -> dict[str, str]:
        pods = self.core.list_namespaced_pod(ref["namespace"], label_selector=f"{RUN_LABEL}={ref['name']}")
        out = {}
        for pod in getattr(pods, "items", []):
            name = pod.metadata.name
            out[name] = self.core.read_namespaced_pod_log(name, ref["namespace"])
        return out

"""``meshpilot submit --to k8s``: TrainJob (Kubeflow Trainer v2, the default), PyTorchJob v1, MPIJob
v2beta1 and RayJob manifests for the k8s-h100 preset.

* every generated manifest validates against the official CRD schema (the upstream YAMLs in
  MESHPILOT_K8S_CRDS, default shared/k8s-crds beside the checkout; skipped when absent, an error under CI) with jsonschema, made
  strict (unknown fields rejected), and deliberately broken manifests are rejected by the same check;
  the pod templates are checked by those schemas (they embed the core PodSpec); CEL rules and the
  ClusterTrainingRuntime the TrainJob names are not checked;
* what every training pod must carry: GPU limits (requests equal), a memory-backed /dev/shm, the
  preset's tolerations and node selector, the checkpoint volume (PVC), the Kueue queue label, no
  privileged container;
* submission, status, cancel and logs go through the kubernetes client's CoreV1Api and
  CustomObjectsApi. No API server can run here: these tests use a FAKE API object (an in-memory
  stand-in with the same method names) in place of the kubernetes client.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import QUICKSTART, meshpilot  # noqa: E402

from meshpilot.launch import kubernetes as k8s  # noqa: E402
from meshpilot.orchestrator.errors import ConfigError  # noqa: E402

CRDS = k8s.crd_dir()
if CRDS is None and os.environ.get("CI"):
    raise RuntimeError("CI must validate manifests against the official CRDs: shared/k8s-crds beside the checkout "
                       "or MESHPILOT_K8S_CRDS")
needs_crds = pytest.mark.skipif(CRDS is None, reason="the official CRD YAMLs are not here (set MESHPILOT_K8S_CRDS)")
H100 = ["cluster=k8s-h100", "plan.dp=16", "train.global_batch=32", "--image", "ghcr.io/acme/meshpilot:0.1",
        "--queue", "team-a", "--pvc", "ckpt"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """{kind: [ConfigMap, custom resource]} written by `meshpilot submit --to k8s --dry-run`."""
    tmp = tmp_path_factory.mktemp("k8s")
    out = {}
    for kind in k8s.KINDS:
        r = meshpilot(["submit", QUICKSTART, "--to", "k8s", "--kind", kind, "--dry-run", "--out", tmp / kind,
                       f"train.output_dir={tmp}", *H100], tmp)
        assert r.returncode == 0, r.stdout + r.stderr
        cm = list(yaml.safe_load_all((tmp / kind / "configmap.yaml").read_text()))
        job = list(yaml.safe_load_all((tmp / kind / f"{kind}.yaml").read_text()))
        out[kind] = cm + job
        out[kind + "/text"] = (tmp / kind / f"{kind}.yaml").read_text()
    return out


def _pod_specs(obj):
    """Every training pod spec (and its main container) of a manifest."""
    s = obj["spec"]
    if obj["kind"] == "TrainJob":
        patch = s["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        return [patch["template"]["spec"]["template"]["spec"]]
    if obj["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in s["pytorchReplicaSpecs"].values()]
    if obj["kind"] == "MPIJob":
        return [s["mpiReplicaSpecs"]["Worker"]["template"]["spec"]]
    return [g["template"]["spec"] for g in s["rayClusterSpec"]["workerGroupSpecs"]]


@needs_crds
@pytest.mark.parametrize("kind", list(k8s.KINDS))
def test_manifests_validate_against_the_official_crds(generated, kind):
    cm, job = generated[kind]
    assert cm["kind"] == "ConfigMap" and job["kind"] == k8s.KINDS[kind][1]
    assert k8s.validate(cm, CRDS) == [] and k8s.validate(job, CRDS) == []
    assert job["apiVersion"] == k8s.KINDS[kind][0] and job["metadata"]["namespace"] == "ml-training"


@needs_crds
@pytest.mark.parametrize("kind,break_it,message", [
    ("trainjob", lambda j: j["spec"]["trainer"].__setitem__("numNodes", "2"), "is not of type 'integer'"),
    ("trainjob", lambda j: j["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
    ("trainjob", lambda j: j["spec"]["trainer"].__setitem__("gpus", 8), "'gpus' was unexpected"),
    ("pytorchjob", lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
     .__setitem__("volumeMount", []), "'volumeMount' was unexpected"),
    ("mpijob", lambda j: j["spec"].__setitem__("mpiImplementation", "LAM"), "is not one of"),
    ("rayjob", lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required"),
    ("rayjob", lambda j: j["metadata"].__setitem__("name", "Not_A_Name"), "not a DNS-1123 subdomain"),
    ("trainjob", lambda j: j["metadata"]["labels"].__setitem__("kueue.x-k8s.io/queue-name", "bad queue"),
     "not a label value"),
])
def test_broken_manifests_are_rejected(generated, kind, break_it, message):
    job = copy.deepcopy(generated[kind][1])
    break_it(job)
    errors = k8s.validate(job, CRDS)
    assert any(message in e for e in errors), errors
    with pytest.raises(ConfigError, match="fails its schema"):
        k8s.validate_all([generated[kind][0], job], CRDS)


@pytest.mark.parametrize("kind", list(k8s.KINDS))
def test_training_pods_carry_gpus_shm_scheduling_checkpoints_and_no_privilege(generated, kind):
    cm, job = generated[kind]
    assert job["metadata"]["labels"][k8s.QUEUE_LABEL] == "team-a"
    assert "job.yaml" in cm["data"] and "dp: 16" in cm["data"]["job.yaml"]
    for pod in _pod_specs(job):
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        assert vols["run"]["persistentVolumeClaim"]["claimName"] == "ckpt"
        assert vols["job"]["configMap"]["name"] == cm["metadata"]["name"]
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        for c in pod["containers"]:
            assert c["securityContext"]["privileged"] is False
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/dev/shm", "/etc/meshpilot", "/checkpoints"} <= mounts
    resources = (job["spec"]["trainer"]["resourcesPerNode"] if kind == "trainjob"
                 else [c for p in _pod_specs(job) for c in p["containers"]][0]["resources"])
    assert resources["limits"]["nvidia.com/gpu"] == "8" and resources["requests"] == resources["limits"]
    assert "privileged: true" not in generated[kind + "/text"]


def test_trainjob_refers_to_a_runtime_and_runs_the_worker(generated):
    job = generated["trainjob"][1]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    t = job["spec"]["trainer"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 8 and t["command"] == ["torchrun"]
    assert t["args"][:2] == ["-m", "meshpilot.orchestrator.worker"]
    assert t["args"][-1].startswith("/checkpoints/tiny-llama-")
    pt = generated["pytorchjob"][1]["spec"]
    assert pt["pytorchReplicaSpecs"]["Master"]["replicas"] == 1 and pt["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    mpi = generated["mpijob"][1]["spec"]
    assert mpi["slotsPerWorker"] == 8 and mpi["mpiReplicaSpecs"]["Worker"]["replicas"] == 2
    assert "meshpilot run /etc/meshpilot/job.yaml" in generated["rayjob"][1]["spec"]["entrypoint"]


def test_dry_run_is_byte_stable(tmp_path):
    texts = []
    for i in range(2):
        r = meshpilot(["submit", QUICKSTART, "--to", "k8s", "--dry-run", "--out", tmp_path / str(i),
                       f"train.output_dir={tmp_path}", *H100], tmp_path)
        assert r.returncode == 0, r.stderr
        texts.append([(tmp_path / str(i) / f).read_bytes() for f in ("configmap.yaml", "trainjob.yaml", "job.yaml")])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("kind", list(k8s.KINDS))
def test_queue_and_checkpoint_volume_from_the_preset_the_command_line_wins(tmp_path, kind):
    """The cluster preset's kubernetes.queue and kubernetes.checkpoint_pvc give the Kueue label and the
    run directory's PVC (validated as above); --queue/--pvc override them."""
    base = ["cluster=k8s-h100", "plan.dp=16", "train.global_batch=32", "--image", "ghcr.io/acme/meshpilot:0.1",
            "cluster.kubernetes.queue=team-b", "cluster.kubernetes.checkpoint_pvc=ckpt-b", "--kind", kind]

    def manifest(out, *extra):
        r = meshpilot(["submit", QUICKSTART, "--to", "k8s", "--dry-run", "--out", tmp_path / out,
                       f"train.output_dir={tmp_path}", *base, *extra], tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no --pvc" not in r.stdout
        docs = list(yaml.safe_load_all((tmp_path / out / f"{kind}.yaml").read_text()))
        if CRDS is not None:
            k8s.validate_all(docs, CRDS)
        return docs[-1]

    for job, (queue, pvc) in ((manifest("preset"), ("team-b", "ckpt-b")),
                              (manifest("cli", "--queue", "team-a", "--pvc", "ckpt"), ("team-a", "ckpt"))):
        assert job["metadata"]["labels"][k8s.QUEUE_LABEL] == queue
        for pod in _pod_specs(job):
            assert {v["name"]: v for v in pod["volumes"]}["run"]["persistentVolumeClaim"]["claimName"] == pvc


def test_bad_queue_or_volume_in_the_preset_names_the_preset_key(tmp_path):
    base = ["submit", QUICKSTART, "--to", "k8s", "--dry-run", "cluster=k8s-h100", "plan.dp=16",
            "train.global_batch=32", "--image", "x:1"]
    r = meshpilot([*base, "cluster.kubernetes.queue=bad queue"], tmp_path)
    assert r.returncode == 2 and "cluster.kubernetes.queue" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = meshpilot([*base, "cluster.kubernetes.checkpoint_pvc=Bad_PVC"], tmp_path)
    assert r.returncode == 2 and "cluster.kubernetes.checkpoint_pvc" in r.stderr, r.stderr
    r = meshpilot([*base, "cluster.kubernetes.queue=bad queue", "--queue", "ok"], tmp_path)   # the CLI wins
    assert r.returncode == 0, r.stderr


def test_bad_inputs_are_config_errors(tmp_path):
    r = meshpilot(["submit", QUICKSTART, "--to", "k8s", "--dry-run", "cluster=k8s-h100", "plan.dp=16",
                   "train.global_batch=32", "--image", "x:1", "--namespace", "Bad_NS"], tmp_path)
    assert r.returncode == 2 and "--namespace" in r.stderr, r.stderr
    r = meshpilot(["submit", QUICKSTART, "--to", "k8s", "--dry-run"], tmp_path)   # local preset: no image
    assert r.returncode == 2 and "--image" in r.stderr, r.stderr


# --- submission through a FAKE API object ---------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


class FakeApi:
    """In-memory stand-in for kubernetes.client.CoreV1Api + CustomObjectsApi (same method names and
    arguments); objects are stored as given. Not an API server: nothing runs the pods."""

    def __init__(self):
        self.configmaps, self.objects, self.deleted = {}, {}, []

    # CoreV1Api
    def create_namespaced_config_map(self, ns, body):
        key = (ns, body["metadata"]["name"])
        if key in self.configmaps:
            raise ApiError(409)
        self.configmaps[key] = body

    def replace_namespaced_config_map(self, name, ns, body):
        self.configmaps[(ns, name)] = body

    def delete_namespaced_config_map(self, name, ns):
        if self.configmaps.pop((ns, name), None) is None:
            raise ApiError(404)

    def list_namespaced_pod(self, ns, label_selector):
        key, _, value = label_selector.partition("=")

        class Pod:
            def __init__(self, name):
                self.metadata = type("M", (), {"name": name})()
        return type("L", (), {"items": [Pod(f"{value}-node-0-0"), Pod(f"{value}-node-0-1")]})()

    def read_namespaced_pod_log(self, name, ns):
        return f"log of {name}\n"

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        key = (group, version, ns, plural, body["metadata"]["name"])
        if key in self.objects:
            raise ApiError(409)
        self.objects[key] = copy.deepcopy(body)

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        try:
            return self.objects[(group, version, ns, plural, name)]
        except KeyError:
            raise ApiError(404) from None

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, body=None):
        if self.objects.pop((group, version, ns, plural, name), None) is None:
            raise ApiError(404)
        self.deleted.append((plural, name, body))


@pytest.fixture
def fake_api(monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(k8s.KubeClient, "from_config", classmethod(lambda cls, context=None: cls(api, api)))
    return api


def _cli(args, home, capsys):
    from meshpilot.orchestrator.cli.main import main
    os.environ["MESHPILOT_HOME"] = str(home)
    try:
        rc = main([str(a) for a in args])
    finally:
        del os.environ["MESHPILOT_HOME"]
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("kind", list(k8s.KINDS))
def test_submit_status_logs_cancel_through_the_api(fake_api, tmp_path, capsys, kind):
    """FAKE API object (no API server here): `meshpilot submit --to k8s` creates the ConfigMap and the
    custom resource, --status maps its conditions, --logs reads the run's pods, --cancel deletes both."""
    rc, out, err = _cli(["submit", QUICKSTART, "--to", "k8s", "--kind", kind, f"train.output_dir={tmp_path}", *H100],
                        tmp_path, capsys)
    assert rc == 0, err
    handle = [ln for ln in out.splitlines() if ln.startswith("submitted: ")][0].split(": ")[1]
    plural = k8s.KINDS[kind][2]
    assert handle.startswith(f"k8s:ml-training/{k8s.KINDS[kind][1].lower()}/tiny-llama-")
    (key, obj), = [(k, v) for k, v in fake_api.objects.items() if k[3] == plural]
    assert obj["kind"] == k8s.KINDS[kind][1] and len(fake_api.configmaps) == 1
    if CRDS is not None:
        assert k8s.validate(obj, CRDS) == []

    def state():
        rc, out, err = _cli(["submit", "--status", handle, "--json"], tmp_path, capsys)
        assert rc == 0, err
        return json.loads(out)

    assert state()["state"] == "pending"
    if kind == "rayjob":
        obj["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    else:
        obj["status"] = {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}
    assert state()["state"] == "running"
    if kind == "rayjob":
        obj["status"] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    else:
        obj["status"]["conditions"].append({"type": "Succeeded" if kind != "trainjob" else "Complete", "status": "True"})
    assert state()["state"] == "succeeded"
    # `meshpilot status/logs/cancel` take the handle (or the run id) as they take a run id
    rc, out, err = _cli(["status", handle, "--json"], tmp_path, capsys)
    assert rc == 0 and json.loads(out)["state"] == "succeeded" and json.loads(out)["backend"] == "k8s", err
    run_id = json.loads(out)["run_id"]
    rc, out, err = _cli(["status", run_id], tmp_path, capsys)
    assert rc == 0 and handle in out and "succeeded" in out, out + err
    rc, out, err = _cli(["status", "--json"], tmp_path, capsys)
    assert rc == 0 and [(s["handle"], s["backend"], s["state"]) for s in json.loads(out)] == [(handle, "k8s", "succeeded")]
    rc, out, err = _cli(["status"], tmp_path, capsys)
    assert rc == 0 and "submitted jobs" in out and "succeeded" in out, out

    rc, out, err = _cli(["submit", "--logs", handle], tmp_path, capsys)
    assert rc == 0 and "log of tiny-llama-" in out
    rc, out, err = _cli(["logs", handle, "--rank", "0"], tmp_path, capsys)     # the pod holding rank 0
    assert rc == 0 and "log of tiny-llama-" in out and out.count("==> ") == 1, out + err
    rc, out, err = _cli(["logs", handle, "--follow"], tmp_path, capsys)        # ends: the job succeeded
    assert rc == 0 and "log of tiny-llama-" in out, out + err
    rc, out, err = _cli(["cancel", handle], tmp_path, capsys)
    assert rc == 0 and "cancel requested" in out
    assert not fake_api.objects and not fake_api.configmaps
    assert fake_api.deleted[0][2] == {"propagationPolicy": "Foreground"}
    rc, out, err = _cli(["cancel", handle], tmp_path, capsys)                  # idempotent
    assert rc == 0 and "nothing to cancel" in out
    rc, out, err = _cli(["submit", "--cancel", handle], tmp_path, capsys)      # the alias
    assert rc == 0 and "nothing to cancel" in out
    assert state()["state"] == "unknown"


def test_status_mapping_keeps_failure_kinds_apart():
    f = lambda t, **kw: {"conditions": [{"type": t, "status": "True", **kw}]}  # noqa: E731
    assert k8s.map_status("PyTorchJob", f("Failed", reason="DeadlineExceeded"))["state"] == "timeout"
    assert k8s.map_status("PyTorchJob", f("Failed", message="container OOMKilled"))["state"] == "out_of_memory"
    assert k8s.map_status("TrainJob", f("Failed"))["state"] == "failed"
    assert k8s.map_status("TrainJob", f("Suspended"))["state"] == "pending"        # queued by Kueue
    assert k8s.map_status("RayJob", {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"})["state"] == "failed"
    assert k8s.map_status("RayJob", {"jobStatus": "STOPPED"})["state"] == "cancelled"
    assert k8s.map_status("MPIJob", None)["state"] == "pending"


def test_names_are_dns_labels():
    assert k8s.k8s_name("Tiny_LLaMA.v2-0123abcd") == "tiny-llama-v2-0123abcd"
    long = k8s.k8s_name("x" * 80 + "-0123abcd")
    assert len(long) <= 50 and long.endswith("-0123abcd")
    assert k8s.k8s_name("7b-model-0123abcd")[0].isalpha()


def test_submission_without_kubeconfig_is_a_config_error(tmp_path):
    r = meshpilot(["submit", QUICKSTART, "--to", "k8s", f"train.output_dir={tmp_path}", *H100], tmp_path,
                  KUBECONFIG=str(tmp_path / "none"))
    assert r.returncode == 2 and "kubeconfig" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (Path(tmp_path) / "submissions").exists()

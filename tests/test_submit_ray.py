"""``meshpilot submit --to ray``: job submission (Ray's JobSubmissionClient) to an existing cluster: a local
Ray head with its dashboard (the job server), started by this module in a child process. The job runs
``meshpilot run`` on the cluster (the gang controller, driven from the head) and ends with the same
final loss as the same job under ``meshpilot run`` here; ``--cancel`` stops a running job (STOPPED ->
``cancelled``)."""
from __future__ import annotations

import json

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import (ONE_NODE, QUICKSTART, STEPS, TRAIN, cli_env, last_metrics, meshpilot,  # noqa: E402
                                 reference_run, submit_handle, wait_for)

from meshpilot.comm.ports import free_port  # noqa: E402
from ray_cluster import held_ray_cluster  # noqa: E402

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with the dashboard (the job submission API); yields its http address."""
    home = tmp_path_factory.mktemp("ray-head")
    with held_ray_cluster(home, 3, dashboard_port=free_port(), env=cli_env(home)) as address:
        assert address.startswith("http://"), "the Ray head did not start"
        yield address


@pytest.mark.timeout(600)
def test_ray_job_matches_meshpilot_run(ray_head, tmp_path, tmp_path_factory):
    ref = reference_run(tmp_path_factory)
    r = meshpilot(["submit", QUICKSTART, "--to", "ray", "--address", ray_head, "--python", sys.executable, *TRAIN,
                   *ONE_NODE, f"train.output_dir={tmp_path}"], tmp_path)
    handle = submit_handle(r)
    assert handle.startswith("ray:meshpilot-tiny-llama-")
    st = wait_for(handle, tmp_path, lambda s: s["state"] in ("succeeded", "failed", "cancelled"), timeout=400, every=2)
    logs = meshpilot(["submit", "--logs", handle, "--tail", "120"], tmp_path).stdout   # the run summary tables end it
    assert st["state"] == "succeeded" and st["native_state"] == "SUCCEEDED", (st, logs)
    m = last_metrics(Path(st["run_dir"]))
    assert m["step"] == STEPS and m["loss"] == pytest.approx(ref["final_loss"], rel=1e-6, abs=1e-7)
    assert "succeeded" in logs


@pytest.mark.timeout(300)
def test_cancel_stops_a_ray_job(ray_head, tmp_path):
    r = meshpilot(["submit", QUICKSTART, "--to", "ray", "--address", ray_head, "--python", sys.executable,
                   "train.steps=10000000", "train.checkpoint_every=0", *ONE_NODE, f"train.output_dir={tmp_path}"],
                  tmp_path)
    handle = submit_handle(r)
    wait_for(handle, tmp_path, lambda s: (s.get("step") or 0) >= 1 or s["state"] not in ("pending", "running"),
             timeout=240, every=1)
    # `meshpilot status/cancel` take the handle and the run id (`meshpilot submit --status/--cancel` are aliases)
    r = meshpilot(["status", handle, "--json"], tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["backend"] == "ray", r.stdout + r.stderr
    r = meshpilot(["status", json.loads(r.stdout)["run_id"]], tmp_path)
    assert r.returncode == 0 and handle in r.stdout, r.stdout + r.stderr
    r = meshpilot(["cancel", handle], tmp_path)
    assert r.returncode == 0 and "cancel requested" in r.stdout, r.stdout + r.stderr
    st = wait_for(handle, tmp_path, lambda s: s["state"] not in ("pending", "running"), timeout=120, every=1)
    assert st["state"] == "cancelled" and st["native_state"] == "STOPPED", st
    assert meshpilot(["cancel", handle], tmp_path).returncode == 0                 # idempotent

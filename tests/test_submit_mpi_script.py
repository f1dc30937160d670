"""``meshpilot submit --to mpi --dry-run`` and the worker's MPI rendezvous, without running mpirun: the
hostfile (``localhost``, ``--hosts`` names, or placeholders that submission refuses), the mpirun line
quoting what users type, and ``env_rank_info`` under Open MPI variables without MASTER_ADDR/MASTER_PORT
(rank 0's host and port broadcast through mpi4py; a fake ``mpi4py.MPI`` stands in here)."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_submit_helpers import QUICKSTART, TWO_NODES, meshpilot  # noqa: E402

from meshpilot.launch.mpi import MpiSpec, hostfile, mpirun_argv, mpirun_script  # noqa: E402
from meshpilot.orchestrator.errors import ConfigError  # noqa: E402


def test_hostfile_from_hosts_and_placeholders(tmp_path):
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", "--dry-run", "--out", tmp_path / "a", *TWO_NODES,
                   "--hosts", "node1,node2", f"train.output_dir={tmp_path}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "hostfile").read_text().splitlines()[1:] == ["node1 slots=1", "node2 slots=1"]
    assert "--map-by ppr:1:node" in (tmp_path / "a" / "mpirun.sh").read_text()
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", "--dry-run", "--out", tmp_path / "b", *TWO_NODES,
                   f"train.output_dir={tmp_path}"], tmp_path)
    assert r.returncode == 0 and "placeholder" in r.stdout, r.stdout
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", "--out", tmp_path / "b", *TWO_NODES,
                   f"train.output_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2 and "--hosts" in r.stderr and not (tmp_path / "b" / "submission.json").exists()
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", "--dry-run", *TWO_NODES, "--hosts", "a,b,c"], tmp_path)
    assert r.returncode == 2 and "names 3 host(s)" in r.stderr
    r = meshpilot(["submit", QUICKSTART, "--to", "mpi", "--dry-run", *TWO_NODES, "--hosts", "a,$(id)"], tmp_path)
    assert r.returncode == 2 and "not a host name" in r.stderr


def test_mpirun_line_quotes_paths(tmp_path):
    evil = str(tmp_path / "a b 'c' $(touch PWNED) `touch PWNED2`")
    spec = MpiSpec(name="x", run_dir=evil, job_file=evil + "/job.yaml", hostfile=evil + "/hostfile",
                   python="/opt/my env/python", nodes=1, procs_per_node=2, cpu_workers=True)
    s = mpirun_script(spec)
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
    # run the script with mpirun replaced by a function printing its arguments one per line
    out = subprocess.run(["bash", "-c", "mpirun() { printf '%s\\n' \"$@\"; }; " + s.replace("#!/bin/bash\n", "")],
                         capture_output=True, text=True)
    assert out.stdout.splitlines() == mpirun_argv(spec)[1:]
    assert not list(tmp_path.glob("PWNED*"))
    assert (tmp_path / "a b 'c' $(touch PWNED) `touch PWNED2`" / "mpirun.exit").read_text().strip() == "0"
    assert hostfile(spec).endswith("localhost slots=2\n")
    with pytest.raises(ConfigError):
        MpiSpec(name="x", run_dir="/a\nb", job_file="/j", hostfile="/h", python="p", nodes=1, procs_per_node=1).check()


def test_env_rank_info_finds_rank0_over_mpi4py(monkeypatch):
    from meshpilot.orchestrator.train import worker
    sent = []

    class Comm:
        def bcast(self, obj, root=0):
            sent.append(obj)
            return ("rank0-host", 29123)        # what rank 0 broadcast

    fake = types.ModuleType("mpi4py.MPI")
    fake.COMM_WORLD = Comm()
    pkg = types.ModuleType("mpi4py")
    pkg.MPI = fake
    monkeypatch.setitem(sys.modules, "mpi4py", pkg)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake)
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    info = worker.env_rank_info(ompi)
    assert info == dict(rank=1, world_size=2, local_rank=1, master_addr="rank0-host", master_port=29123)
    assert sent == [None]                                       # only rank 0 contributes
    info = worker.env_rank_info({**ompi, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert isinstance(sent[-1][0], str) and isinstance(sent[-1][1], int)
    # exported MASTER_* win; mpirun inside an sbatch allocation: OMPI_* before the batch step's SLURM_PROCID=0
    info = worker.env_rank_info({**ompi, "MASTER_ADDR": "h", "MASTER_PORT": "1", "SLURM_PROCID": "0",
                                 "SLURM_NTASKS": "1"})
    assert (info["rank"], info["world_size"], info["master_addr"]) == (1, 2, "h") and len(sent) == 2


def test_env_rank_info_without_mpi4py_is_a_config_error(monkeypatch):
    from meshpilot.orchestrator.train import worker
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ConfigError, match="needs mpi4py"):
        worker.env_rank_info({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
